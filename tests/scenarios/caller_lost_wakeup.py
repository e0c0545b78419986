import json
import os
import sys
import threading
import time

import anyfork
from anyfork import _reports

tpl = anyfork.new_exec().eval("def slow(s):\n    s.recv(1)\ndef quick(s):\n    pass\n")
a = tpl.fork()
sa = a.run("slow")  # runs until it gets a byte
b = tpl.fork()
reports = tpl._tpl.reports
real_read = _reports.ReportChannel.read_now
hook = {"hit": False}
def read_now(self):
    if threading.current_thread().name == "Y" and not hook["hit"]:
        hook["hit"] = True
        deadline = time.monotonic() + 5
        while b._child.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_read(self)
_reports.ReportChannel.read_now = read_now
x = threading.Thread(target=a.wait, name="X", daemon=True)
x.start()
deadline = time.monotonic() + 5
while reports.shared._waiters == 0 and time.monotonic() < deadline:
    time.sleep(0.01)  # until X waits on the channel
y = threading.Thread(target=b.wait, name="Y", daemon=True)
y.start()
sb = b.run("quick")  # b exits at once: X (or this thread) dispatches its status
y.join(3)
facts = {"hook_hit": hook["hit"], "b_status": b._child.returncode, "y_blocked": y.is_alive()}
sa.send(b"x")  # a exits: one more report, to let the threads go
x.join(3)
y.join(3)
print(json.dumps(facts))
sys.stdout.flush()
os._exit(0)

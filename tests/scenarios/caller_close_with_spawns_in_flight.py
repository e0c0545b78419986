import ctypes
import json
import os
import signal
import time

import anyfork
import anyfork.early  # first, on purpose

ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans become ours

def live_children():
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.append(int(d))
    return sorted(out)

tpl = anyfork.early.process
p = anyfork.new()  # the early process becomes the default template: SPAWNs in flight
p.close()
tpl.close()
status = tpl.wait(5)
deadline = time.monotonic() + 2
while (left := live_children()) and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in left:
    os.kill(pid, signal.SIGKILL)  # clean up what the test started
print(json.dumps({"status": status, "left": left}))

import json
import os
import signal
import sys
import threading
import time

import anyfork
import helpers

q = anyfork.new_exec().eval("import time\ndef f(s):\n    time.sleep(60)\n")
s = q.run("f")
rescued = []
def rescue():
    if not helpers.wait_exited(q.pid, 5):
        rescued.append(True)
        os.kill(q.pid, signal.SIGKILL)
threading.Thread(target=rescue, daemon=True).start()
signal.signal(signal.SIGALRM, lambda signum, frame: q.kill())
signal.setitimer(signal.ITIMER_REAL, 0.3)
t0 = time.monotonic()
try:
    status = q.wait(10)
except anyfork.TimeoutExpired:
    status = None
print(json.dumps({"status": status, "elapsed": time.monotonic() - t0, "rescued": bool(rescued)}))
sys.stdout.flush()
os._exit(0)

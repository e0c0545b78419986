import json
import os
import signal
import sys
import threading
import time

import anyfork
import helpers

p = anyfork.new_exec().eval("import time\ndef f(s):\n    time.sleep(60)\n")
s = p.run("f")
statuses = []
waiter = threading.Thread(target=lambda: statuses.append(p.wait()), daemon=True)
waiter.start()
time.sleep(0.3)  # the waiter is in wait() now
killer = threading.Thread(target=p.kill, daemon=True)
killer.start()
killer.join(3)
facts = {"kill_returned": not killer.is_alive(), "exited": helpers.wait_exited(p.pid, 3)}
if not facts["exited"]:
    os.kill(p.pid, signal.SIGKILL)  # by hand, to let the waiter go
waiter.join(5)
facts["status"] = statuses[0] if statuses else None
print(json.dumps(facts))
sys.stdout.flush()
os._exit(0)

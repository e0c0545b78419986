import json
import os
import signal
import time

import anyfork
import helpers
from anyfork import _process, _runtime

anyfork.new().close()
tpl = _runtime.runtime.default

def fill_pool():
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    return len(tpl._tpl.state.pool)

before = fill_pool()
killed = [child.pid for child, _ in tpl._tpl.state.pool.values()]
for pid in killed:
    os.kill(pid, signal.SIGKILL)
for pid in killed:
    helpers.wait_exited(pid, 5)
deadline = time.monotonic() + 5
while tpl._tpl.state.pool and time.monotonic() < deadline:
    helpers.pump(tpl, 0.1)  # their exit reports take them out of the pool
emptied = not tpl._tpl.state.pool
for _ in range(5):
    p = anyfork.new()
    p.run("builtins:id").close()
    p.wait(5)
after = fill_pool()
p = anyfork.new()
from_pool = p._child.pid is not None  # a process forked ahead comes with its pid
p.close()
p.wait(5)
print(json.dumps({"before": before, "killed": len(killed), "emptied": emptied, "after": after,
                  "from_pool": from_pool}))

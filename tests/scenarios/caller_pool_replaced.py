import gc
import json
import os
import signal
import time

import anyfork
import helpers
from anyfork import _process, _runtime


def fill_pool(tpl):
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    return [child.pid for child, _ in tpl._tpl.state.pool.values()]

def template_fds(tpl):
    return tpl._descriptors()

def still_alive(pids):
    deadline = time.monotonic() + 3
    alive = [pid for pid in pids if not helpers.wait_exited(pid, max(0, deadline - time.monotonic()))]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # clean up what the test started
    return alive

before = helpers.open_fds()
anyfork.new().close()

spares = []
for _ in range(5):
    tpl = _runtime.runtime.default
    spares += fill_pool(tpl)
    os.kill(tpl.pid, signal.SIGKILL)
    helpers.wait_exited(tpl.pid, 5)
    del tpl
    anyfork.new().close()  # replaces the template
fill_pool(_runtime.runtime.default)
deadline = time.monotonic() + 3
while True:
    gc.collect()
    _runtime.runtime.reap_directs()
    allowed = template_fds(_runtime.runtime.default)
    leaked = {fd: t for fd, t in helpers.open_fds().items() if fd not in allowed and before.get(fd) != t}
    if not leaked or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": leaked}))

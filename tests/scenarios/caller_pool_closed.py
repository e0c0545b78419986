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

tpl = _runtime.runtime.default
spares = fill_pool(tpl)
tpl.close()
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": {}}))

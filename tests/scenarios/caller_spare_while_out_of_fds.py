import json
import os
import resource
import select
import time

import anyfork
import helpers
from anyfork import _process, _runtime

anyfork.new().close()
tpl = _runtime.runtime.default
deadline = time.monotonic() + 5
while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
    helpers.pump(tpl, 0.1)
p = anyfork.new()  # takes a process forked ahead; a SPAWN asks for its replacement
s = p.eval("def f(s):\n    s.recv(1)\n").run("f")
queued = bool(select.select([tpl._tpl.reports.fileno()], [], [], 5)[0])
time.sleep(0.2)  # the replacement's SPARE, with its descriptor, waits for us
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # restored below
hog = helpers.exhaust_descriptors(64)
try:
    p.wait(0.2)
    during = "returned"
except Exception as e:
    during = type(e).__name__
for fd in hog:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
ended = tpl._tpl.state.ended
s.close()
try:
    after = p.wait(5)
except Exception as e:
    after = type(e).__name__
print(json.dumps({"queued": queued, "during": during, "ended": ended, "after": after}))

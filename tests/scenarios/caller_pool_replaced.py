import gc
import json
import os
import signal
import time

from caller_pool import fill_pool, start, still_alive, template_fds

import anyfork
import helpers
from anyfork import _runtime

before = start()

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

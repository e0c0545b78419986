import gc
import json
import resource
import sys

import anyfork
import helpers

tpl = anyfork.new_exec()
gc.collect()
before = helpers.open_fds()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
free = [n for n in range(max(before) + int(sys.argv[1]) + 2) if n not in before]
resource.setrlimit(resource.RLIMIT_NOFILE, (free[int(sys.argv[1])], hard))  # that many numbers left
try:
    tpl.fork()
    raised, is_error = None, False
except Exception as e:
    raised, is_error = type(e).__name__, isinstance(e, anyfork.Error)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
gc.collect()
leaked = {fd: t for fd, t in helpers.open_fds().items() if before.get(fd) != t}
tpl.close()
tpl.wait(5)
print(json.dumps({"raised": raised, "is_error": is_error, "leaked": leaked}))

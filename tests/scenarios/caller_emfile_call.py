import json
import os
import resource
import sys

import anyfork
import helpers

call = getattr(anyfork, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # restored below
hog = helpers.exhaust_descriptors(64)
os.close(hog.pop())  # one free descriptor: not enough for a socketpair
made = None
try:
    made = call()
    raised, is_error = None, False
except Exception as e:
    raised, is_error = type(e).__name__, isinstance(e, anyfork.Error)
for fd in hog:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if made is not None:
    made.close()
    made.wait(5)
print(json.dumps({"raised": raised, "is_error": is_error}))

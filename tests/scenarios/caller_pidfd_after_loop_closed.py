import asyncio
import gc
import json
import os

import anyfork


def pidfds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "pidfd" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(int(fd))
        except OSError:
            pass
    return sorted(out)

loop = asyncio.new_event_loop()
before = pidfds()
for _ in range(3):
    p = anyfork.new_exec().eval("def f(s):\n    s.recv(1)\n")
    s = loop.run_until_complete(p.run_async("f"))
    s.close()
    p.wait(5)  # reaped here, outside the loop
loop.close()
del p
gc.collect()
print(json.dumps({"before": before, "after": pidfds()}))

"""Call a function in a worker process: results, errors and events, blocking and asyncio.

The handler lives in a module the worker imports (examples/_rpc_handlers.py).
Run it from the repository root:

    .venv/bin/python examples/rpc.py
"""

import asyncio
import os
import sys

import anyfork
from anyfork import rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def progress(what, i, word):
    print(f"event: {what} {i} {word!r}")


# Blocking: events go to on_event, in the thread that reads the reply.
with rpc.run(anyfork.new(), "_rpc_handlers:count_words", on_event=progress) as client:
    print("result:", client("the quick brown fox"))
    try:
        client("")
    except ValueError as e:  # the handler's own exception type
        print("error:", e)
    print("worker pid", client.process.pid, "caller pid", os.getpid())
print("worker exited with status", client.process.returncode)


# asyncio: two calls at once; events come through client.events().
async def main():
    async with await rpc.run_async(anyfork.new(), "_rpc_handlers:count_words") as client:
        print("async results:", await asyncio.gather(client("a b"), client("c d e")))
    print("async events:", len([event async for event in client.events()]))
    print("async worker exited with status", client.process.returncode)


asyncio.run(main())

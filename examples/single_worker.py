"""Create a single new process and tell it to run a worker function.

The seed's first example.  The function lives in a module the new process
imports (examples/_worker.py); the caller and the worker then talk over the
socket ``run()`` returns.  Run it from the repository root:

    .venv/bin/python examples/single_worker.py
"""

import os
import sys

import anyfork

# The new process sees the caller's sys.path, so it can import what the
# caller can: make this directory importable whatever the current directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

proc = anyfork.new().require("_worker")
sock = proc.run("_worker:worker")  # returns once the commands are written

with sock, sock.makefile("rwb") as f:
    for word in (b"hello", b"world"):
        f.write(word + b"\n")
        f.flush()
        print("worker said:", f.readline().decode().strip())
    print(f"worker pid {proc.pid}, caller pid {os.getpid()}")
# Closing our end is the worker's EOF: its function returns and it exits 0.
print("worker exited with status", proc.wait(timeout=10))

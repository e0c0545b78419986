"""anyfork as a faster fork+exec.

The seed's third example: runs ``/bin/echo hi`` with stdout redirected to a
file and stderr to the communications socket.  The new process is forked
from the small template, not from this program, and can still prepare the
environment before it execs.  Run it from the repository root:

    .venv/bin/python examples/fork_exec.py
"""

import os
import tempfile

import anyfork

CODE = """
import os

def run(sock, output, *cmd):
    # os.dup2 makes the new descriptors inheritable, so they survive the exec.
    os.dup2(output.fileno(), 1)
    os.dup2(sock.fileno(), 2)
    os.execvp(cmd[0], cmd)
"""

with tempfile.TemporaryDirectory() as tmp:
    log = os.path.join(tmp, "log")
    with open(log, "wb") as output:
        proc = anyfork.new().eval(CODE).send_fh(output).send_arg("/bin/echo", "hi")
    # anyfork duplicated the file when it was queued, so closing ours was fine.
    stderr = proc.run("run")

    with stderr:
        errors = b"".join(iter(lambda: stderr.recv(4096), b""))  # EOF once echo exits
    print("echo exited with status", proc.wait(timeout=10))
    print("stderr:", errors.decode() or "(empty)")
    with open(log) as f:
        print(f"{log} contains: {f.read()!r}")

"""The worker function of examples/single_worker.py (the seed's ``MyModule::worker``).

It runs in the new process: ``sock`` is its end of the socketpair whose
other end ``run()`` returned to the caller.
"""

import os
import socket


def worker(sock: socket.socket) -> None:
    """Answer each line with the line in capitals and this process's pid, until EOF."""
    with sock, sock.makefile("rwb") as f:
        for line in f:
            f.write(b"%s (from pid %d)\n" % (line.strip().upper(), os.getpid()))
            f.flush()

"""The server function of examples/server_pool.py (the seed's ``My::Server::run``).

Every worker runs ``run``, called as ``run(sock, listener, worker_id)``: its
end of the socketpair, then what the template was sent (the listening
socket, arriving as a ``socket.socket``), then what this worker was sent
(its id, arriving as the str it was sent as).
"""

import os
import socket


def run(sock: socket.socket, listener: socket.socket, worker_id: str) -> None:
    sock.close()  # we do not use the socket, so close it to save resources
    # Anything goes here, even things a process forked the usual way should
    # not do: start threads, run an asyncio loop, ...
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(f"hello from worker {worker_id} (pid {os.getpid()})\n".encode())
            # Serve this client until it hangs up, then accept the next one.
            while conn.recv(4096):
                pass

"""A pool of server processes, all accepting on the same listening socket.

The seed's second example: a template process imports the server code and
receives the listening socket; each worker is forked from it, gets its id
and runs the server function (examples/_pool_server.py).  Run it from the
repository root:

    .venv/bin/python examples/server_pool.py
"""

import os
import socket
import sys

import anyfork

WORKERS = 4

# The template imports _pool_server from this directory: the new processes
# see the caller's sys.path, so put the directory on it before anyfork.new().
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

listener = socket.create_server(("127.0.0.1", 0), backlog=16)
address = listener.getsockname()

# A template for the pool: import the server code, give it the socket.
template = anyfork.new().require("_pool_server").send_fh(listener)
listener.close()  # anyfork keeps its own duplicate for the template

# Now create identical workers; each is forked from the template, and tied
# to this program: if it dies, even of SIGKILL, they die too.
workers = []
for worker_id in range(1, WORKERS + 1):
    proc = template.fork().send_arg(str(worker_id)).tie_to_owner()
    proc.run("_pool_server:run").close()  # this demo does not use the socket
    workers.append(proc)
print("workers:", " ".join(str(p.pid) for p in workers))

# A worker serves one client at a time until that client hangs up, so as
# long as all these clients stay connected each one has its own worker.
clients = [socket.create_connection(address, timeout=10) for _ in range(WORKERS)]
for client in clients:
    with client.makefile("rb") as f:
        print("client got:", f.readline().decode().strip())
for client in clients:
    client.close()

# Shut the pool down: signal every worker (through the template, which is
# their parent, so never a recycled pid), collect their exit statuses, then
# drop the template, which makes it exit.
for proc in workers:
    proc.kill()
print("exit statuses:", [proc.wait(timeout=10) for proc in workers])
template.close()

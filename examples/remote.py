"""Processes on another host over ssh, with nothing installed there.

Give it a host ssh reaches without a password (keys, ~/.ssh/config):

    .venv/bin/python examples/remote.py HOST [--python python3] [--ssh "ssh -F my_config"]

It starts one ssh connection and a template on HOST, forks workers there,
calls functions of examples/_remote_handlers.py (a module only this side
has: anyfork sends its source on demand), and runs a pool over the remote
template and a local one.
"""

import argparse
import os
import shlex
import sys

import anyfork
from anyfork import pool, remote, rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _remote_handlers

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("host")
parser.add_argument("--python", default="python3", help="the Python on the far side")
parser.add_argument("--ssh", default="ssh", help="the ssh command, with its options")
args = parser.parse_args()
command = [*shlex.split(args.ssh), args.host, args.python]

# One ssh connection; every fork() below is a process on HOST over it.
# Results are unpickled restrictively (a compromised host must not run code
# here): a class of our own has to be allowed by name.
tpl = remote.template(command, allow=["_remote_handlers.Where"])
print("remote template pid", tpl.pid)

with rpc.run(tpl.fork(), "_remote_handlers:where") as client:
    far = client()
    print("a forked worker:", "its parent is the remote template" if far.ppid == tpl.pid else "?",
          "| same host as here" if far.host == os.uname().nodename else f"| on {far.host}")

try:
    send = tpl.fork()
    send.send_fh(0)
except anyfork.UnsupportedError as e:
    print("send_fh:", str(e).split(":")[0])
    send.close()

# A pool over the remote template and a local one: up to 2 workers each.
with pool.run([tpl, anyfork.new()], _remote_handlers.word_count, max=2) as p:
    texts = ["the quick brown fox", "jumps over", "the lazy dog"] * 4
    print("word counts:", [f.result(60) for f in [p.submit(t) for t in texts]])
print("done")

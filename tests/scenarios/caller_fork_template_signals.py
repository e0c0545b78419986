import json
import signal

import anyfork
import helpers


def on_term(signum, frame):
    pass  # the program's own: ignore SIGTERM
signal.signal(signal.SIGTERM, on_term)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
tpl = anyfork.fork_template()
p = tpl.fork().eval(
    "import signal, socket\n"
    "def probe(s):\n"
    "    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"
    "    mask = sorted(int(x) for x in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
    "    s.sendall(repr((default, mask)).encode())\n"
    "    s.shutdown(socket.SHUT_WR)\n"
    "    s.recv(1)\n")
s = p.run("probe")
default, mask = helpers.result(s)
p.kill()
try:
    status = p.wait(3)
except anyfork.TimeoutExpired:
    status = None
    p.kill(signal.SIGKILL)
    p.wait(5)
s.close()
tpl.close()
tpl.wait(5)
print(json.dumps({"sigterm_default": default, "mask": mask, "status": status}))

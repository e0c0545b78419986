"""A signal handler that raises at random moments of fork(), run() and
wait(), caught and carried on from, as a REPL does with Ctrl-C: no call
may hang, send a command twice, or corrupt the stream; afterwards the
template either works or says clearly that it was let go."""

import json
import random
import signal
import sys
import time

import anyfork


class Interrupt(Exception):  # noqa: N818 - named for what it stands for (Ctrl-C)
    pass


def handler(signum: int, frame: object) -> None:
    raise Interrupt


tpl = anyfork.new_exec().eval("def f(s, *a):\n    pass\n")
big = b"x" * (1 << 20)
signal.signal(signal.SIGALRM, handler)
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
interrupted = completed = 0
errors: dict[str, int] = {}
end = time.monotonic() + 2.0
while time.monotonic() < end and tpl._cmd.broken is None:
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0002, 0.003))
            c = tpl.fork()
            c.send_arg(big).run("f").close()
            c.wait(5)
            completed += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Interrupt:
        interrupted += 1
    except anyfork.Error as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
# A signal may still be pending from the last timer: let it go off here.
try:
    time.sleep(0.01)
except Interrupt:
    pass
poisoned = tpl._cmd.broken is not None
try:
    c = tpl.fork()
    c.run("f").close()
    after: object = c.wait(5)
except anyfork.Error as e:
    after = type(e).__name__
print(json.dumps({"interrupted": interrupted, "completed": completed, "errors": errors,
                  "poisoned": poisoned, "after": after}))

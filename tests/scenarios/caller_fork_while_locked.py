"""os.fork() while another thread is in the middle of writing to a template:
the child's inherited Process must refuse at once, never wait for that
thread (which does not exist in the child)."""

import json
import os
import signal
import threading
import time

import anyfork

MiB = 1 << 20
tpl = anyfork.new_exec().eval("import time\ntime.sleep(3)")
tpl.send_arg(b"x" * (32 * MiB))
writer = threading.Thread(target=lambda: tpl.fork().close(), daemon=True)
writer.start()  # writes 32 MiB while the template sleeps: busy for seconds
deadline = time.monotonic() + 5
while not tpl._cmd.writing and time.monotonic() < deadline:
    time.sleep(0.01)
facts: dict[str, object] = {"writing": tpl._cmd.writing}
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    # From this thread: a new thread here may get the writer's thread id
    # back, and then a reentrant lock would let it in.  SIGALRM bounds a hang.
    def hang(signum: int, frame: object) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(2)
    try:
        tpl.eval("pass")
        outcome = "returned"
    except TimeoutError:
        outcome = "hung"
    except BaseException as e:
        outcome = type(e).__name__
    signal.alarm(0)
    os.write(w, outcome.encode())
    os._exit(0)
os.close(w)
facts["child_eval"] = os.read(r, 100).decode()
os.waitpid(pid, 0)
writer.join(20)
print(json.dumps(facts))

"""fork_template(allow_threads=True) while other threads are inside anyfork
calls (forks, send_fh, close, new_exec): which descriptors does each
template inherit beyond the program's own?  (Threads that call run() would
hold the sockets it returns, which are the program's: they don't here.)"""

import gc
import json
import os
import sys
import threading
import warnings

import anyfork


def fds(sock):
    """Run in the template: its descriptors, as (number, what)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own
    sock.sendall(json.dumps(found).encode())
    sock.close()


def hammer(i, stop, errors, started):
    try:
        tpl = anyfork.new_exec() if i % 2 else None
        while not stop.is_set():
            started.release()
            p = anyfork.new() if tpl is None else tpl.fork()
            p.send_fh(0)
            p.close()
            if i == 3:
                anyfork.new_exec().close()
        if tpl is not None:
            tpl.close()
    except BaseException as e:
        errors.append(repr(e))


def main():
    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        # CPython 3.13t does not reset the interpreter's stop-the-world mutex
        # in a fork's child: forked while a thread was starting a collection,
        # the template hangs for good in its first one (gc.freeze).  README's
        # Supported Pythons says so; this program checks descriptors, so its
        # threads make no collections.
        gc.disable()
    rounds = int(sys.argv[1])
    baseline = {int(n) for n in os.listdir("/proc/self/fd")}
    stop = threading.Event()
    errors = []
    started = threading.Semaphore(0)
    threads = [threading.Thread(target=hammer, args=(i, stop, errors, started), daemon=True)
               for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(8):  # each thread is past its imports, in its loop
        if not started.acquire(timeout=20):
            break
    extra = []
    try:
        for _ in range(rounds):
            tpl = anyfork.fork_template(allow_threads=True)
            s = tpl.run("__main__:fds")
            s.settimeout(20)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            s.close()
            got = {int(k): v for k, v in json.loads(data).items()}
            # anyfork's kinds (another thread's import may hold a directory
            # open for a moment, which is not ours to close)
            mine = {k for k in set(got) - baseline if got[k].startswith(("socket:", "anon_inode:[pidfd]"))}
            if len(mine) > 1:  # the template's own socket is one
                extra.append({k: got[k] for k in sorted(mine)})
            tpl.wait(20)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    print(json.dumps({"rounds": rounds, "extra": extra, "errors": errors}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
    os._exit(0)

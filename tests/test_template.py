"""fork_template(): the calling program, forked on purpose, as a template.

Every scenario runs as its own main program (``[sys.executable, script]``),
because fork_template forks whatever calls it.  Each program prints one JSON
line of facts and the test checks them.  ``subprocess.run`` reads the
program's stdout to EOF, and a template or child left running would hold a
copy of it: so every test here also checks that nothing outlives the program.
"""

from __future__ import annotations

import asyncio  # noqa: F401
import os
import select  # noqa: F401
import signal
import struct  # noqa: F401
import threading
from pathlib import Path

import pytest

import anyfork
from anyfork import _protocol as wire  # noqa: F401
from anyfork._backend import deadline_after, run_blocking  # noqa: F401
from anyfork._caller import TemplateState  # noqa: F401
from anyfork._reports import ReportChannel  # noqa: F401
from helpers import Ran, read_all, run_program, run_source, wait_exited, zombie_children  # noqa: F401

_SRC = str(Path(anyfork.__file__).resolve().parent.parent)

_HAS_PROC = os.path.isdir("/proc/self/fd")

pytestmark = pytest.mark.usefixtures("check_leaks")


def run_template_program(tmp_path: Path, source: str, *python_args: str, quiet: bool = True) -> Ran:
    """Run ``source`` as a main program; it prints one JSON line of facts."""
    return run_source(tmp_path, source, *python_args, quiet=quiet)


def test_children_share_program_data_beside_new(tmp_path: Path) -> None:
    facts = run_template_program(tmp_path, """
        import json, os
        import anyfork

        BIG = {i: str(i) * 3 for i in range(300_000)}

        def work(sock, key):
            sock.sendall(json.dumps([os.getpid(), os.getppid(), len(BIG), BIG[int(key)]]).encode())

        t = anyfork.fork_template()
        seen = []
        for i in range(4):
            name = work if i % 2 else "work"  # a function object or a bare name in __main__
            s = t.fork().send_arg(str(i * 1000)).run(name)
            seen.append(json.loads(s.recv(4096)))
            s.close()
            # anyfork.new() keeps working beside the template
            n = anyfork.new().eval("import os\\ndef f(s): s.sendall(str(os.getppid()).encode())")
            s = n.run("f")
            seen.append(["new", int(s.recv(64))])
            s.close()
        t.close()
        print(json.dumps({"me": os.getpid(), "tpl": t.pid, "rc": t.wait(5), "seen": seen}))
    """)
    me, tpl = facts["me"], facts["tpl"]
    assert tpl != me
    assert facts["rc"] == 0
    seen = facts["seen"]
    assert isinstance(seen, list)
    kids = [x for x in seen if x[0] != "new"]
    assert [k[2:] for k in kids] == [[300_000, str(i * 1000) * 3] for i in range(4)]
    assert all(k[1] == tpl for k in kids)
    pids = [k[0] for k in kids]
    assert len(set(pids)) == 4
    assert not {me, tpl} & set(pids)
    news = [x[1] for x in seen if x[0] == "new"]
    assert len(news) == 4
    assert len(set(news)) == 1  # one default template, not ours
    assert news[0] not in (me, tpl)


@pytest.mark.skipif(not _HAS_PROC, reason="needs /proc/self/fd")
def test_template_inherits_no_anyfork_descriptors(tmp_path: Path) -> None:
    facts = run_template_program(tmp_path, """
        import json, os, socket
        import anyfork

        def fds(sock):
            sock.sendall(json.dumps(sorted(int(f) for f in os.listdir("/proc/self/fd"))).encode())

        a, b = socket.socketpair()
        p = anyfork.new_exec()          # a command socket and a pidfd of ours
        p.send_fh(a)                    # and a duplicate of a, queued, not yet sent
        a.close()
        first = anyfork.fork_template()
        t = anyfork.fork_template()     # a second one: must not hold the first one's socket
        first.close()
        first_rc = first.wait(3)        # only sees EOF if t holds no copy
        p.close()
        p_rc = p.wait(3)                # only sees EOF if neither template holds a copy
        b.settimeout(3)
        eof = b.recv(1)                 # only EOF if no template holds the duplicate of a
        got = []
        for proc in (t.fork(), t):      # a child of the template, then the template itself
            s = proc.run(fds)
            got.append(json.loads(s.recv(4096)))
            s.close()
        print(json.dumps({"first_rc": first_rc, "p_rc": p_rc, "eof": eof.decode(),
                          "fds": got, "b": b.fileno()}))
    """)
    assert facts["first_rc"] == 0
    assert facts["p_rc"] == 0
    assert facts["eof"] == ""
    for fds in facts["fds"]:
        # stdio, the program's own socket b, its command socket, and listdir's own descriptor
        assert len(fds) == 6, fds
        assert {0, 1, 2, facts["b"]} <= set(fds)


def test_program_atexit_and_destructors_not_run_again(tmp_path: Path) -> None:
    ran = run_template_program(tmp_path, """
        import atexit, json, os
        import anyfork

        class Resource:
            def __del__(self):
                os.write(1, f"DEL {os.getpid()}\\n".encode())  # one write: children run at once

        RESOURCE = Resource()
        atexit.register(lambda: os.write(1, f"ATEXIT-PROGRAM {os.getpid()}\\n".encode()))

        def work(sock):
            atexit.register(lambda: os.write(1, f"ATEXIT-CHILD {os.getpid()}\\n".encode()))

        def fail(sock):
            raise RuntimeError("expected")

        t = anyfork.fork_template()
        procs = [t.fork() for _ in range(3)]
        for p in procs:
            p.run(work).close()
        bad = t.fork()
        bad.run(fail).close()
        t2 = anyfork.fork_template()
        t2.run(work).close()            # a template can run a function itself
        rcs = [p.wait(5) for p in [*procs, bad, t2]]
        t.close()
        rcs.append(t.wait(5))
        print(json.dumps({"me": os.getpid(), "rcs": rcs}), flush=True)
    """, quiet=False)
    assert ran["rcs"] == [0, 0, 0, 1, 0, 0]
    assert "RuntimeError: expected" in ran.stderr
    me = ran["me"]
    assert [line for line in ran.stdout if line.startswith("ATEXIT-PROGRAM")] == [f"ATEXIT-PROGRAM {me}"]
    assert [line for line in ran.stdout if line.startswith("DEL")] in ([], [f"DEL {me}"])
    child_lines = [line for line in ran.stdout if line.startswith("ATEXIT-CHILD")]
    assert len(child_lines) == 4
    assert str(me) not in " ".join(child_lines)


def test_refuses_while_other_threads_run() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(anyfork.Error, match="allow_threads"):
            anyfork.fork_template()
    finally:
        stop.set()
        thread.join()


def test_allow_threads_forks_anyway_even_from_a_thread(tmp_path: Path) -> None:
    ran = run_template_program(tmp_path, """
        import json, os, threading
        import anyfork

        def work(sock):
            sock.sendall(json.dumps([os.getppid(), threading.active_count()]).encode())

        def use(t):
            s = t.fork().run(work)
            got = json.loads(s.recv(100))
            s.close()
            t.close()
            return [t.pid, got, t.wait(5)]

        stop = threading.Event()
        idle = threading.Thread(target=stop.wait)
        idle.start()
        results = [use(anyfork.fork_template(allow_threads=True))]
        # from a thread other than the main one: signal set-up in the child must still work
        def in_thread():
            results.append(use(anyfork.fork_template(allow_threads=True)))
        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join()
        stop.set()
        idle.join()
        print(json.dumps(results))
    """.replace("print(json.dumps(results))", 'print(json.dumps({"results": results}))'))
    for tpl, (ppid, threads), rc in ran["results"]:
        assert ppid == tpl
        assert threads == 1  # only the forking thread exists in the fork
        assert rc == 0


def test_heap_frozen_in_template_and_its_children(tmp_path: Path) -> None:
    ran = run_template_program(tmp_path, """
        import gc, json, weakref
        import anyfork

        DATA = [[i] for i in range(10_000)]  # lists stay tracked by the collector

        def frozen(sock):
            sock.sendall(str(gc.get_freeze_count()).encode())

        def ask(p):
            s = p.run(frozen)
            n = int(s.recv(32))
            s.close()
            return n

        class Node:
            pass

        at_start = gc.get_freeze_count()       # not 0 on every Python (3.12.1: 375)
        t = anyfork.fork_template()
        after = gc.get_freeze_count()          # the program's own view is left as it was
        child = ask(t.fork())
        itself = ask(anyfork.fork_template())  # frozen by fork_template, before any fork of its own
        gc.freeze()
        cycle = Node()
        cycle.me = cycle
        ref = weakref.ref(cycle)
        kept = anyfork.fork_template()
        still = gc.get_freeze_count()          # a freeze the program made itself is kept
        del cycle
        gc.collect()
        kept.close()
        t.close()
        print(json.dumps({"at_start": at_start, "after": after, "child": child, "itself": itself,
                          "still": still, "collected": ref() is None}))
    """)
    assert ran["after"] == ran["at_start"]
    assert ran["child"] >= 10_000
    assert ran["itself"] >= 10_000
    assert ran["still"] >= 10_000
    # Garbage made after the program's own freeze is still the program's to collect.
    assert ran["collected"]


def test_template_ignores_sigint_and_leaves_program_wakeup_fd_alone(tmp_path: Path) -> None:
    ran = run_template_program(tmp_path, """
        import json, os, signal
        import anyfork

        def handlers(sock):
            sock.sendall(json.dumps(signal.getsignal(signal.SIGINT) is signal.default_int_handler).encode())

        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        # A handler of the program's, for a signal whose default is to ignore it:
        # in the template it must be neither run nor wake the program's loop.
        signal.signal(signal.SIGWINCH, lambda *a: None)
        signal.set_wakeup_fd(w)                    # as an event loop's self-pipe does
        t = anyfork.fork_template()
        os.kill(t.pid, signal.SIGINT)              # Ctrl-C reaches the whole process group
        os.kill(t.pid, signal.SIGWINCH)
        s = t.fork().run(handlers)                 # a round trip: both signals handled by now
        default_in_run = json.loads(s.recv(100))
        s.close()
        try:
            woken = os.read(r, 100).hex()
        except BlockingIOError:
            woken = ""
        alive = t.returncode is None
        t.close()
        print(json.dumps({"alive": alive, "default_in_run": default_in_run, "woken": woken, "rc": t.wait(5)}))
    """)
    assert ran["alive"] is True
    assert ran["default_in_run"] is True
    assert ran["woken"] == ""  # the template's signals did not wake the program's loop
    assert ran["rc"] == 0


# --- regressions: what broke once, pinned (moved from test_regressions.py) -------------


# Pins d17: fork_template kept the program's signal handlers and mask in its children.


def test_function_forked_from_fork_template_has_fresh_signal_state() -> None:
    facts = run_program("caller_fork_template_signals.py", timeout=20).facts
    assert facts["sigterm_default"], f"the program's SIGTERM handler is still installed: {facts}"
    assert facts["mask"] == [], f"signals still blocked: {facts}"
    assert facts["status"] == -signal.SIGTERM, f"kill() (SIGTERM) did not terminate it: {facts}"


# Pins r2-handlers: a fork_template template kept the program's SIGTERM handler: kill() did nothing.


def test_fork_template_and_its_unrun_child_die_of_kill_despite_a_sigterm_handler() -> None:
    facts = run_program("caller_fork_template_flag_handler.py", timeout=30).facts
    assert facts["child"] == -signal.SIGTERM, f"the unrun child survived kill(): {facts}"
    assert facts["template"] == -signal.SIGTERM, f"the template survived kill(): {facts}"

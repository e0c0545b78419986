"""Helpers forked by user code (issue 15, item 2): a process that code eval'd
in a template forks (os.fork, a multiprocessing.Pool with the fork start
method) inherits the template's command socket and report channel, so the
caller never sees EOF on them once the template dies.  Its death must be
seen by its process: a template of the caller's own through its pidfd (or
waitpid where there is none), a template forked from a template through
that one's report of its exit.  Each wait here is bounded: a hang fails."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading

import pytest

import anyfork

BLOCK = "def block(s, *a):\n    s.recv(1)\n"

# Forks a helper that outlives the template (each test kills it at the end),
# and says its pid through a file, once it exists.
HELPER = """
import os, time
_pid = os.fork()
if _pid == 0:
    time.sleep(60)
    os._exit(0)
with open(args[0] + ".tmp", "w") as _f:
    _f.write(str(_pid))
os.rename(args[0] + ".tmp", args[0])
"""

# The same with a multiprocessing.Pool of the fork start method: its
# workers are the helpers.  An idle worker exits with the template (it reads
# EOF on the pool's task pipe); one busy with a task outlives it.
POOL = """
import multiprocessing, os, time
_pool = multiprocessing.get_context("fork").Pool(2)
_pool.apply_async(time.sleep, (60,))
with open(args[0] + ".tmp", "w") as _f:
    _f.write(" ".join(str(p.pid) for p in _pool._pool))
os.rename(args[0] + ".tmp", args[0])
"""

KINDS = ["direct", "direct-no-pidfd", "forked"]


def _template(kind: str, monkeypatch: pytest.MonkeyPatch) -> anyfork.Process:
    if kind == "direct-no-pidfd":  # the POSIX fallback: waitpid, polled
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    if kind == "forked":
        return anyfork.new_exec().fork()  # its template is kept alive by it
    return anyfork.new_exec()


def _with_helpers(h, tpl: anyfork.Process, tmp_path, code: str = HELPER) -> list[int]:
    """Make ``tpl`` fork helpers; their pids, once they run."""
    path = str(tmp_path / "helpers")
    tpl.fork().close()  # a template now: the helpers get its report channel too
    tpl.eval(code, path)
    tpl.fork().close()  # writes the EVAL
    h.until(lambda: os.path.exists(path), 30, "the helpers start")
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def _kill_all(h, pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        h.until(lambda pid=pid: h.gone(pid), 10, f"helper {pid} exits")


def _reap() -> bool:
    """Reap what exited (as any anyfork call does): a pidfd goes with it."""
    from anyfork._runtime import runtime

    runtime.reap_directs()
    return True


def _kill_soon(pid: int) -> threading.Timer:
    """SIGKILL ``pid`` in a moment: while the call under test waits."""
    t = threading.Timer(0.2, os.kill, (pid, signal.SIGKILL))
    t.start()
    return t


def _wait(proc: anyfork.Process, how: str) -> int:
    if how == "sync":
        return proc.wait()
    return asyncio.run(proc.wait_async())


def _run(tpl: anyfork.Process, how: str) -> object:
    if how == "sync":
        return tpl.fork().run("block")

    async def go() -> object:
        return await tpl.fork().run_async("block")

    return asyncio.run(go())


@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_wait_on_a_child_of_a_template_killed_while_a_helper_holds_its_sockets(
        h, tmp_path, monkeypatch, kind, how):
    before = h.fds()
    tpl = _template(kind, monkeypatch).eval(BLOCK)
    running = tpl.fork()
    rsock = running.run("block")
    helpers = _with_helpers(h, tpl, tmp_path)
    try:
        tpid = tpl.pid
        timer = _kill_soon(tpid)  # while wait() waits: its wait must see it
        _, err = h.call_with_deadline(lambda: _wait(running, how), 5, "wait() after the template died")
        timer.join()
        assert isinstance(err, anyfork.TemplateDiedError), repr(err)
        assert str(tpid) in str(err)
        # And a fork after it says so too, at once.
        _, err = h.call_with_deadline(tpl.fork, 5, "fork() from the dead template")
        assert isinstance(err, anyfork.TemplateDiedError), repr(err)
    finally:
        rsock.close()
        tpl.close()
        _kill_all(h, helpers + [running.pid])
    del tpl, running, err
    gc.collect()  # an error's traceback holds a cycle; the forked one's template goes with it
    h.until(lambda: _reap() and h.fds() <= before, 5, lambda: f"descriptors back: {h.fds() - before} left")


@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_fork_run_on_a_template_killed_while_a_helper_holds_its_sockets(
        h, tmp_path, monkeypatch, kind, how):
    tpl = _template(kind, monkeypatch).eval(BLOCK)
    helpers = _with_helpers(h, tpl, tmp_path)
    try:
        tpid = tpl.pid
        os.kill(tpid, signal.SIGKILL)
        h.until(lambda: h.gone(tpid), 5, f"template {tpid} dies")
        _, err = h.call_with_deadline(lambda: _run(tpl, how), 5, "fork().run() after the template died")
        assert isinstance(err, anyfork.TemplateDiedError), repr(err)
        assert str(tpid) in str(err)
    finally:
        tpl.close()
        _kill_all(h, helpers)


def test_fork_run_while_the_template_dies_with_a_multiprocessing_pool(h, tmp_path, monkeypatch):
    tpl = anyfork.new_exec().eval(BLOCK)
    workers = _with_helpers(h, tpl, tmp_path, POOL)
    try:
        # A fork the template never answers (it is busy, then killed):
        # run() waits for its pid.
        tpl.eval("import time; time.sleep(60)")
        timer = _kill_soon(tpl.pid)
        child = tpl.fork()
        _, err = h.call_with_deadline(lambda: child.run("block"), 5, "run() as the template dies")
        timer.join()
        assert isinstance(err, anyfork.TemplateDiedError), repr(err)
    finally:
        tpl.close()
        _kill_all(h, workers)


def test_a_full_command_socket_of_a_killed_template_raises(h, tmp_path, monkeypatch):
    """Writing to a template that is gone: the helper never reads, so the
    socket fills and never turns writable again."""
    tpl = anyfork.new_exec()
    helpers = _with_helpers(h, tpl, tmp_path)
    try:
        tpid = tpl.pid
        os.kill(tpid, signal.SIGKILL)
        h.until(lambda: h.gone(tpid), 5, f"template {tpid} dies")

        def fill() -> None:
            big = "x" * (1 << 20)
            for _ in range(64):  # far more than a socket buffer
                tpl.eval("pass", big)
                tpl.fork().close()  # fork() writes what is queued

        _, err = h.call_with_deadline(fill, 10, "writing to the dead template")
        assert isinstance(err, anyfork.TemplateDiedError), repr(err)
    finally:
        tpl.close()
        _kill_all(h, helpers)

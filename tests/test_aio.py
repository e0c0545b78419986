"""The asyncio driver: ``Process.run_async``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json  # noqa: F401
import os
import select
import signal
import socket
import struct  # noqa: F401
import time
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _process
from anyfork import _protocol as wire
from anyfork._backend import deadline_after, run_blocking  # noqa: F401
from anyfork._caller import TemplateState  # noqa: F401
from anyfork._reports import ReportChannel  # noqa: F401
from helpers import digest, run_program, small_socket_buffers, wait_exited, zombie_children

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20


async def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until EOF, within a deadline."""
    loop = asyncio.get_running_loop()

    async def read() -> bytes:
        chunks = []
        while data := await loop.sock_recv(sock, MiB):
            chunks.append(data)
        return b"".join(chunks)

    return await asyncio.wait_for(read(), timeout)


async def outcome(p: anyfork.Process, func: str) -> object:
    import ast

    sock = await p.run_async(func)
    with sock:
        return ast.literal_eval((await read_all(sock)).decode())


def test_run_async_returns_a_non_blocking_close_on_exec_socket(make: Make) -> None:
    async def main() -> None:
        p = make().send_arg(b"arg", "text")
        sock = await p.run_async("helpers:items")
        with sock:
            assert isinstance(sock, socket.socket)
            assert not sock.getblocking()
            assert not os.get_inheritable(sock.fileno())
            got = (await read_all(sock)).decode()
        assert got == repr([("socket", True, False), digest(b"arg"), digest("text")])
        assert p.pid > 0
        assert p.wait(5) == 0

    asyncio.run(main())


def test_bytes_after_run_async_reach_the_function_unchanged(make: Make) -> None:
    payload = b"".join(bytes(b) for b in wire.run_frame("evil")) + os.urandom(300_000)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        p = make()
        sock = await p.run_async("helpers:echo")
        with sock:
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            assert await read_all(sock) == payload
        assert p.wait(5) == 0

    asyncio.run(main())


def test_a_64_mib_argument_lets_other_tasks_run(make: Make) -> None:
    big = b"\xab" * (64 * MiB)

    async def main() -> None:
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        p = make().send_arg(big)
        try:
            sock = await p.run_async("helpers:items")
            ticks_during = ticks
        finally:
            stop = True
            await task
        with sock:
            got = (await read_all(sock, 10)).decode()
        assert got == repr([("socket", True, False), digest(big)])
        assert ticks_during > 20, "the event loop was blocked while writing"
        assert p.wait(5) == 0

    asyncio.run(main())


def test_run_async_of_many_processes_from_one_template_at_once() -> None:
    """Tasks awaiting pids on one report channel share it; none may be left
    without a reader (several rounds, since the interleaving varies)."""

    async def main() -> None:
        t = anyfork.new_exec()
        for round_ in range(8):
            procs = [t.fork().send_arg(str(i)) for i in range(6)] + [anyfork.new().send_arg("new")]
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(outcome(p, "helpers:items") for p in procs)), 2)
            except asyncio.TimeoutError:
                pytest.fail(f"run_async hung in round {round_}")
            for i, got in enumerate(results[:-1]):
                assert got[1:] == [digest(str(i))]
            assert results[-1][1:] == [digest("new")]
            assert len({p.pid for p in procs}) == len(procs)
            assert [p.wait(5) for p in procs] == [0] * len(procs)
        t.close()
        assert t.wait(5) == 0

    asyncio.run(main())


def test_run_async_spends_the_process(make: Make) -> None:
    async def main() -> None:
        p = make()
        sock = await p.run_async("helpers:wait_eof")
        with sock:
            with pytest.raises(anyfork.ProcessStateError):
                p.send_arg(b"late")
            with pytest.raises(anyfork.ProcessStateError):
                await p.run_async("helpers:pids")
            assert p.returncode is None
        assert p.wait(5) == 0

    asyncio.run(main())


def test_run_async_rejects_bad_functions_and_queues_nothing() -> None:
    async def main() -> None:
        p = anyfork.new()
        with pytest.raises(TypeError):
            await p.run_async(lambda sock: None)
        with pytest.raises(ValueError):
            await p.run_async("not a name")
        assert await outcome(p, "helpers:items") == [("socket", True, False)]

    asyncio.run(main())


def test_run_async_of_a_child_whose_template_died_before_forking_it_raises() -> None:
    async def main() -> None:
        t = anyfork.new_exec().eval("import os; os._exit(9)")
        child = t.fork()
        with pytest.raises(anyfork.Error, match="template"):
            await asyncio.wait_for(child.run_async("helpers:pids"), 5)
        assert t.wait(5) == 9

    asyncio.run(main())


def test_run_async_of_a_process_that_exited_early_raises_process_exited() -> None:
    async def main() -> None:
        p = anyfork.new_exec().eval("import os; os._exit(4)").send_arg(b"x" * (8 * MiB))
        with pytest.raises(anyfork.ProcessExitedError):
            await asyncio.wait_for(p.run_async("helpers:pids"), 5)
        assert p.wait(5) == 4

    asyncio.run(main())


def test_exited_new_exec_child_is_reaped_while_the_loop_runs() -> None:
    """No anyfork call after the child exits: the running loop reaps it."""

    async def main() -> int:
        p = anyfork.new_exec()
        pid = p.pid
        sock = await p.run_async("helpers:wait_eof")
        sock.close()
        del p
        gc.collect()
        assert wait_exited(pid)
        deadline = time.monotonic() + 1
        while pid in zombie_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return pid

    pid = asyncio.run(main())
    assert pid not in zombie_children(), "still a zombie after 1 s of a running loop"


# --- wait_async -------------------------------------------------------------------------


def test_wait_async_returns_the_status_of_every_kind_of_process(make: Make) -> None:
    async def main() -> tuple[int, int]:
        p = make().send_arg("1")
        sock = await p.run_async("helpers:exit_with")
        sock.close()
        q = make().send_arg("7")
        (await q.run_async("helpers:exit_with")).close()
        return await asyncio.wait_for(p.wait_async(), 5), await asyncio.wait_for(q.wait_async(5), 5)

    first, second = asyncio.run(main())
    assert second == 7
    assert first == 1  # (a failure before the function raises instead: see test_failures)


def test_wait_async_times_out_and_the_process_runs_on(make: Make) -> None:
    async def main() -> int:
        p = make()
        sock = await p.run_async("helpers:wait_eof")
        try:
            with pytest.raises(anyfork.TimeoutExpired):
                await p.wait_async(0.05)
            with pytest.raises(ValueError, match=">= 0"):
                await p.wait_async(-1)
        finally:
            sock.close()
        return await asyncio.wait_for(p.wait_async(float("inf")), 5)  # inf: no deadline

    assert asyncio.run(main()) == 0


# --- nothing on an async path blocks the loop --------------------------------------------

TICK = 0.01
MAX_STALL = 0.05  # the bound: a tick may come late by this much, no more


@pytest.mark.timing
def test_a_ticker_never_stalls_while_64_run_async_and_wait_async_calls_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tpl = anyfork.new_exec().eval(
        "import time\ndef quick(s):\n    pass\ndef pause(s):\n    time.sleep(0.2)\n")
    small_socket_buffers(monkeypatch)
    kids = [tpl.fork() for _ in range(64)]  # the first fork makes the (small) report channel
    monkeypatch.undo()
    first, second = kids[:32], kids[32:]
    for k in first:
        k.run("quick").close()
    for k in first:
        assert wait_exited(k.pid), "setup: a process did not exit"
    # Their exit reports, unread, fill the report channel: the template
    # keeps the rest in its backlog, waiting for the caller to read.
    rfd = tpl._tpl.reports.fileno()  # type: ignore[union-attr]
    assert select.select([rfd], [], [], 10)[0], "setup: no report is waiting"

    async def main() -> tuple[float, list[int]]:
        loop = asyncio.get_running_loop()
        stalls: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(TICK)
                now = loop.time()
                stalls.append(now - last - TICK)
                last = now

        async def run_and_wait(k: anyfork.Process) -> int:
            (await k.run_async("pause")).close()
            return await k.wait_async(10)  # 0.2 s: a wait that blocked would show

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(3 * TICK)  # the ticker is going
        try:
            # Started one per loop iteration: each call's first step is the
            # ticker's to wait for, not 64 of them back to back.
            calls = []
            for c in [*(k.wait_async(10) for k in first), *(run_and_wait(k) for k in second)]:
                calls.append(asyncio.ensure_future(c))
                await asyncio.sleep(0)
            statuses = await asyncio.wait_for(asyncio.gather(*calls), 20)
        finally:
            done.set()
            await tick
        return max(stalls), statuses

    try:
        worst, statuses = asyncio.run(main())
    finally:
        for k in kids:
            k.close()
        tpl.close()
    assert tpl.wait(5) == 0
    assert statuses == [0] * 64
    assert worst <= MAX_STALL, f"the loop stalled for {worst * 1000:.0f} ms"


def test_new_async_gives_a_process_of_the_default_template_in_any_loop() -> None:
    async def main() -> tuple[object, int]:
        p = await anyfork.new_async()
        assert p._parent is _process.runtime.default._tpl  # type: ignore[union-attr]
        got = await outcome(p.send_arg("x"), "helpers:items")
        return got, await p.wait_async(10)

    for _ in range(2):  # a loop of its own each time: its turns belong to that loop
        got, status = asyncio.run(main())
        assert got == [("socket", True, False), digest("x")]
        assert status == 0


@pytest.mark.timing
def test_a_ticker_never_stalls_while_300_jobs_launched_with_gather_await_new_async() -> None:
    """Issue 14: new() is synchronous; 300 jobs launched at once with gather
    stalled the loop for 165 ms when no process forked ahead was at hand."""

    async def main() -> tuple[float, list[int]]:
        loop = asyncio.get_running_loop()
        stalls: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(TICK)
                now = loop.time()
                stalls.append(now - last - TICK)
                last = now

        async def job() -> int:
            p = await anyfork.new_async()
            (await p.run_async("builtins:id")).close()  # id(sock): returns at once
            return await p.wait_async(30)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(3 * TICK)  # the ticker is going
        try:
            statuses = await asyncio.wait_for(asyncio.gather(*(job() for _ in range(300))), 60)
        finally:
            done.set()
            await tick
        return max(stalls), statuses

    worst, statuses = asyncio.run(main())
    assert statuses == [0] * 300
    assert worst <= MAX_STALL, f"the loop stalled for {worst * 1000:.0f} ms"


# --- regressions: what broke once, pinned (moved from test_regressions.py) -------------


# Pins d05: the report channel ended under an asyncio waiter left a stale reader.
def test_report_channel_ending_under_an_asyncio_waiter_leaves_no_stale_reader() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        # The sleep holds the fork back until fork() has returned, so run_async
        # is what reads its pid report.
        tpl = anyfork.new_exec().eval("import time\ntime.sleep(0.3)\ndef f(s):\n    pass\n")
        c = tpl.fork()
        rfd = tpl._tpl.reports.fileno()
        assert c._child.pid is None
        assert select.select([rfd], [], [], 5)[0], "setup: no pid report within 5 s"
        os.kill(tpl.pid, signal.SIGKILL)
        tpl.wait(5)
        (await asyncio.wait_for(c.run_async("f"), 5)).close()  # reads the pid, then EOF
        if tpl._tpl.state.ended is None:
            # Under load the child may still hold its inherited copy of the
            # template's end when run_async reads the pid: then EOF comes
            # later, and waiting for the child (another asyncio reader) reads it.
            with contextlib.suppress(anyfork.Error):
                await asyncio.wait_for(c.wait_async(), 5)
        assert tpl._tpl.state.ended is not None, "setup: the report channel never ended"
        pairs: list[tuple[socket.socket, socket.socket]] = []
        try:
            for _ in range(256):  # until a new socket reuses the channel's number
                pairs.append(socket.socketpair())
                if rfd in (pairs[-1][0].fileno(), pairs[-1][1].fileno()):
                    break
            else:
                pytest.fail(f"setup: descriptor {rfd} was never reused")
            r, w = pairs[-1] if pairs[-1][0].fileno() == rfd else pairs[-1][::-1]
            r.setblocking(False)
            loop.call_later(0.2, w.send, b"hello")
            try:
                return await asyncio.wait_for(loop.sock_recv(r, 5), 3)
            except asyncio.TimeoutError:
                pytest.fail(f"sock_recv on reused descriptor {rfd} never completed: a stale reader")
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    assert asyncio.run(main()) == b"hello"


# Pins d13: run_async cancelled mid-write left RUN queued; a later run() sent a second one.
def test_cancelled_run_async_leaves_the_process_spent(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    p = anyfork.new_exec().eval(
        "def f(s, *a):\n"
        f"    open({str(seen)!r}, 'wb').write(s.recv(100))\n")
    p.send_arg(b"x" * (64 * MiB))

    async def main() -> None:
        task = asyncio.ensure_future(p.run_async("f"))
        await asyncio.sleep(0)  # the task writes what the socket takes, then waits
        assert not task.done(), "setup: the write was not in progress"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    try:
        sock = p.run("f")
    except anyfork.ProcessStateError:
        pass
    else:
        sock.sendall(b"hello")
        sock.close()
        p.wait(5)
        pytest.fail("run() after a cancelled run_async went ahead; the function first read "
                    f"{seen.read_bytes() if seen.exists() else None!r}")
    assert isinstance(p.wait(5), int), "the process did not exit"
    assert not seen.exists() or seen.read_bytes() == b"", "a RUN frame reached the function as data"


# Pins r2-pidfd: a run_async process reaped once its loop was closed leaked its pidfd.


def test_run_async_process_reaped_after_its_loop_closed_leaves_no_pidfd() -> None:
    facts = run_program("caller_pidfd_after_loop_closed.py", timeout=30).facts
    assert facts["after"] == facts["before"], f"pidfds left open: {facts}"

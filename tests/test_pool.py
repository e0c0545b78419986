"""anyfork.pool: workers forked from a template, over rpc (the policy itself: test_pool_core)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

import pytest

import anyfork
import pool_handlers as h
from anyfork import pool
from helpers import wait_exited

if TYPE_CHECKING:
    from concurrent.futures import Future
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("check_leaks")


def _all_exited(pids: list[int]) -> bool:
    return all(wait_exited(p, 10) for p in pids)


def test_calls_return_results_and_raise_their_exceptions() -> None:
    with pool.run(None, "pool_handlers:square", max=2) as p:
        assert p(7) == 49
        assert p.call(3) == 9
        assert [f.result(10) for f in [p.submit(i) for i in range(50)]] == [i * i for i in range(50)]
        workers = p.workers
        assert 1 <= len(workers) <= 2
    assert _all_exited(workers)  # join: every worker gone


def test_a_pools_worker_gets_each_burst_in_one_write() -> None:
    # The pool sizes the bursts it sends a worker (its pipeline); rpc's own
    # early batches (_HOLD_BATCH) split them, and cost the pool's caller
    # 10-20% of its throughput.
    from anyfork import rpc

    with pool.run(None, h.square, max=1) as p:
        assert p.submit(3).result(30) == 9
        cores = [w.client._core for w in p._workers if w.client is not None]
        assert cores, "no worker"
        assert all(core.hold_batch == rpc._NO_BATCH for core in cores)
    client = rpc.run(anyfork.new(), h.square)
    try:
        assert client._core.hold_batch == rpc._HOLD_BATCH  # (a Client of its own batches early)
    finally:
        client.close()
        client.wait(30)


def test_an_exception_keeps_its_type() -> None:
    with pool.run(None, "pool_handlers:boom", max=1) as p, pytest.raises(KeyError, match="nope"):
        p("nope")


def test_a_dead_worker_fails_only_its_call_and_the_pool_goes_on() -> None:
    with pool.run(None, "pool_handlers:die", max=1) as p:
        first = p.workers
        with pytest.raises(anyfork.WorkerDiedError) as info:
            p(7)
        assert info.value.returncode == 7
        assert info.value.pid == first[0] if first else info.value.pid > 0
        with pytest.raises(anyfork.WorkerDiedError):  # a new worker took the next call
            p(3)


def test_a_stuck_call_times_out_with_its_stack_and_its_children_go_too(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    with pool.run(None, "pool_handlers:stuck_with_a_child", max=1, timeout=1.0) as p:
        with pytest.raises(pool.TaskTimeoutError) as info:
            p(str(pidfile))
        assert isinstance(info.value, TimeoutError)
        assert "stuck_with_a_child" in info.value.stack  # where it was stuck
        assert wait_exited(int(pidfile.read_text()), 10)  # the kill reached its process group
        p2 = pool.run(None, "pool_handlers:square", max=1)  # (a pool goes on, too: see the next test)
        p2.close()
        p2.join(10)


def test_after_a_timeout_the_worker_is_replaced() -> None:
    with pool.run(None, "pool_handlers:sleep", max=1, timeout=0.5) as p:
        with pytest.raises(pool.TaskTimeoutError):
            p(30)
        assert p(0.01) == 0.01


def test_max_tasks_replaces_each_worker_with_a_new_fork() -> None:
    with pool.run(None, "pool_handlers:pid", max=1, max_tasks=1) as p:
        pids = [p() for _ in range(5)]
    assert len(set(pids)) == 5


def test_a_recycled_worker_runs_no_boot_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # The template imported the worker modules before it forked: an eval per
    # worker would compile and run that boot again after every fork.
    from anyfork._process import Process

    evals: list[Process] = []
    real = Process.eval
    monkeypatch.setattr(Process, "eval", lambda self, *a: evals.append(self) or real(self, *a))
    tpl = anyfork.new()
    with pool.run(tpl, "pool_handlers:pid", max=1, max_tasks=1) as p:
        pids = [p() for _ in range(3)]
    assert len(set(pids)) == 3
    assert evals == [tpl], f"{len(evals) - 1} evals went to workers"


def test_a_worker_imports_nothing_of_anyfork_but_the_worker_modules() -> None:
    """A new worker runs its init (the user's too, and the hook that finds
    the caller's main module) without importing the package, which would
    load all of anyfork (~8 ms) after every fork: with max_tasks=1, per call."""
    with pool.run(None, "pool_handlers:loaded", max=1, max_tasks=1, init="pool_handlers:record_init") as p:
        assert [p("anyfork", "inspect") for _ in range(2)] == [[], []]


def test_calls_queued_behind_the_one_a_worker_died_in_run_on_another() -> None:
    # They reached the worker, but it runs a call at a time: they never started.
    with pool.run(None, "pool_handlers:square_or_die", max=1, load=4) as p:
        assert p(0) == 0
        first = p.workers
        futures = [p.submit(x) for x in (-5, 2, 3, 4)]
        with pytest.raises(anyfork.WorkerDiedError) as info:
            futures[0].result(20)
        assert info.value.returncode == 5
        assert [f.result(20) for f in futures[1:]] == [4, 9, 16]
        assert p.workers != first  # a new worker ran them


def test_the_replies_before_the_call_a_worker_died_in_are_not_lost() -> None:
    # The calls after the slow first one reach the worker in one batch; the
    # quick one's reply must be out before the next call starts, or it dies
    # with the worker (and the call that killed it looks like it never ran).
    with pool.run(None, "pool_handlers:square_or_die", max=1, load=4) as p:
        futures = [p.submit(x) for x in (0.3, 2, -5, 3)]
        assert futures[0].result(20) == 0.3
        assert futures[1].result(20) == 4
        with pytest.raises(anyfork.WorkerDiedError):
            futures[2].result(20)
        assert futures[3].result(20) == 9


@pytest.mark.timing  # how quickly calls answer decides the pipelining
def test_tiny_calls_are_pipelined_and_slow_ones_are_not() -> None:
    # The Executor lets a worker that answers quickly hold more than load
    # calls (they travel many to a write); one whose calls take long keeps load.
    with anyfork.Executor(max_workers=1) as ex:
        for f in [ex.submit(h.square, i) for i in range(3000)]:
            f.result(20)
        (fast,) = ex._pool._workers
        assert fast.rec is not None and fast.rec.limit > 2
    with anyfork.Executor(max_workers=1) as ex:
        for f in [ex.submit(h.sleep, 0.03) for _ in range(8)]:
            f.result(20)
        (slow,) = ex._pool._workers
        assert slow.rec is not None and slow.rec.limit == 2


@pytest.mark.timing  # how quickly calls answer decides the pipelining
def test_a_slow_call_stops_its_worker_from_taking_a_pipelines_worth_behind_it() -> None:
    with anyfork.Executor(max_workers=2) as ex:
        for f in [ex.submit(h.square, i) for i in range(3000)]:
            f.result(20)
        assert all(w.rec is not None and w.rec.limit > 2 for w in ex._pool._workers)
        slow = ex.submit(h.sleep_pid, 1.5)
        time.sleep(0.2)  # it has been running for longer than a pipeline's worth of work
        shorts = [ex.submit(h.sleep_pid, 0.05) for _ in range(6)]
        pid = slow.result(20)
        behind = [f.result(20) for f in shorts].count(pid)
    assert behind <= 1  # load=2: one more at most, as without pipelining


def test_max_tasks_with_many_calls_waiting_starts_every_replacement() -> None:
    # Every worker is retiring once it has its one call, and the replacement
    # is asked for when a call is placed or a worker goes, by whichever thread
    # read the reply: the manager must be woken for it each time.
    with pool.run(None, "pool_handlers:pid", max=2, max_tasks=1) as p:
        futures = [p.submit() for _ in range(12)]
        pids = [f.result(20) for f in futures]
    assert len(set(pids)) == 12


def test_a_call_queued_while_the_last_worker_retires_gets_a_new_one(tmp_path: Path) -> None:
    # The first call's done-callback submits the second in the moment between
    # the answer and the retiring worker's exit: the call queues, and the
    # worker's exit must wake the manager to start its replacement.  (On
    # free-threaded 3.13t the caller's next call raced into that moment.)
    fifo, plain = tmp_path / "fifo", tmp_path / "plain"
    os.mkfifo(fifo)
    plain.write_text("second")
    with pool.run(None, "pool_handlers:read_file", max=1, max_tasks=1) as p:
        first = p.submit(str(fifo))  # its worker waits for the fifo's writer
        second: list[Future[str]] = []
        first.add_done_callback(lambda _: second.append(p.submit(str(plain))))
        fifo.write_text("first")
        assert first.result(20) == "first"
        assert second[0].result(20) == "second"


def test_a_worker_that_retires_is_replaced_and_nothing_is_lost() -> None:
    with pool.run(None, "pool_handlers:retiring", max=1, load=4) as p:
        results = [f.result(20) for f in [p.submit(i) for i in range(6)]]
    assert [x for _, x in results] == list(range(6))  # every call ran, once
    assert len({pid for pid, _ in results}) == 6  # each in a worker of its own


def test_events_reach_on_event() -> None:
    got: list[tuple[object, ...]] = []
    with pool.run(None, "pool_handlers:progress", max=1, on_event=lambda *a: got.append(a)) as p:
        assert p(3) == 3
    assert got == [("step", 0), ("step", 1), ("step", 2)]


def test_calls_from_asyncio() -> None:
    async def main() -> list[int]:
        with pool.run(None, "pool_handlers:square", max=2) as p:
            return list(await asyncio.gather(*(p.call_async(i) for i in range(10))))

    assert asyncio.run(main()) == [i * i for i in range(10)]


def test_workers_are_forks_of_the_template_sharing_what_it_loaded() -> None:
    tpl = anyfork.new().require("pool_handlers").eval(
        "import os\nTEMPLATE_PID = os.getpid()\ndef parent(*_):\n    return os.getppid(), TEMPLATE_PID\n")
    with pool.run(tpl, "parent", max=2) as p:
        ppid, template_pid = p()
    assert ppid == template_pid  # forked from the template, which loaded what it was given


def test_init_gets_the_templates_items() -> None:
    tpl = anyfork.new().send_arg("a", b"b")
    with pool.run(tpl, "pool_handlers:init_seen", max=1, init="pool_handlers:record_init") as p:
        assert p() == repr(("a", b"b"))


def test_an_init_that_fails_breaks_the_pool_saying_why() -> None:
    with pool.run(None, "pool_handlers:square", max=1, init="pool_handlers:fail_init") as p:
        with pytest.raises(pool.BrokenPoolError, match="this init always fails"):
            p(2)
        with pytest.raises(pool.BrokenPoolError):
            p.submit(3)
    assert issubclass(pool.BrokenPoolError, anyfork.Error)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max": 0}, ValueError), ({"load": 0}, ValueError), ({"load": "2"}, TypeError),
    ({"idle": -1}, ValueError), ({"timeout": 0}, ValueError), ({"max_tasks": 1.5}, TypeError),
    ({"serializer": "nonsense"}, ValueError), ({"on_event": 3}, TypeError),
])
def test_bad_arguments_fail_at_the_call(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        pool.run(None, "pool_handlers:square", **kwargs)  # type: ignore[arg-type]


def test_a_closed_pool_takes_no_calls_and_join_is_bounded() -> None:
    p = pool.run(None, "pool_handlers:sleep", max=1)
    fut = p.submit(0.2)
    p.close()
    with pytest.raises(anyfork.ProcessStateError):
        p.submit(0)
    p.join(20)
    assert fut.result(0) == 0.2  # what was queued finished first


def test_idle_keeps_workers_ready_and_stop_retires_the_rest() -> None:
    with pool.run(None, "pool_handlers:pid", max=2, idle=1, stop=0.2) as p:
        deadline = time.monotonic() + 10
        while not p.workers and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(p.workers) == 1  # started with no call at all


def test_a_worker_killed_while_idle_is_found_and_replaced() -> None:
    with pool.run(None, "pool_handlers:pid", max=1) as p:
        first = p()
        os.kill(first, signal.SIGKILL)
        assert wait_exited(first, 10)
        second = p()  # never ran on the dead one: placed again on a new one
        assert second != first

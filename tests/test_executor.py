"""anyfork.Executor: a drop-in for ProcessPoolExecutor, on an anyfork pool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import anyfork
import pool_handlers as h
from helpers import wait_exited

pytestmark = pytest.mark.usefixtures("check_leaks")


def test_submit_and_map_as_processpoolexecutor_does() -> None:
    with anyfork.Executor(max_workers=2) as ex:
        assert isinstance(ex, cf.Executor)
        assert ex.submit(h.square, 9).result(10) == 81
        assert list(ex.map(h.square, range(20))) == [i * i for i in range(20)]
        assert list(ex.map(h.square, range(20), chunksize=6)) == [i * i for i in range(20)]
        assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]  # several iterables


def test_map_with_buffersize_keeps_at_most_that_many_calls_ahead() -> None:
    # Python 3.14's ProcessPoolExecutor.map(buffersize=...), on every Python.
    with anyfork.Executor(max_workers=2) as ex:
        submitted = []
        real = ex._submit

        def counting(fn: object, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
            submitted.append(args)
            return real(fn, args, kwargs)

        ex._submit = counting  # type: ignore[method-assign,assignment]
        results = ex.map(h.square, range(20), buffersize=3)
        assert len(submitted) == 3, "buffersize calls are submitted at once, no more"
        taken = []
        for value in results:
            taken.append(value)
            assert len(submitted) <= len(taken) + 3
        assert taken == [i * i for i in range(20)] and len(submitted) == 20
        assert list(ex.map(h.square, range(7), chunksize=2, buffersize=1)) == [i * i for i in range(7)]


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), ("2", TypeError),
                                              (1.5, TypeError)])
def test_map_refuses_a_bad_buffersize_at_the_call(value: object, error: type[Exception]) -> None:
    with anyfork.Executor(max_workers=1) as ex, pytest.raises(error, match="buffersize"):
        ex.map(h.square, range(3), buffersize=value)  # type: ignore[arg-type]


def test_a_map_result_that_raises_cancels_the_calls_not_started() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        futures: list[cf.Future[object]] = []
        real = ex._submit

        def keeping(fn: object, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
            futures.append(real(fn, args, kwargs))
            return futures[-1]

        ex._submit = keeping  # type: ignore[method-assign,assignment]
        results = ex.map(h.sleep, [0.0, "not a number", *[2.0] * 6])
        assert next(results) == 0.0
        with pytest.raises(TypeError):
            next(results)
        # Those out to the worker run on (at most two: it is not pipelining
        # yet); the others are cancelled.
        assert sum(f.cancelled() for f in futures[2:]) >= 4, [f._state for f in futures]  # type: ignore[attr-defined]


def test_map_with_a_timeout_raises_timeouterror() -> None:
    with anyfork.Executor(max_workers=1) as ex, pytest.raises(cf.TimeoutError):  # TimeoutError from 3.11
        list(ex.map(h.sleep, [5], timeout=0.3))


def test_an_exception_keeps_its_type_and_the_executor_goes_on() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        with pytest.raises(KeyError, match="missing"):
            ex.submit(h.boom, "missing").result(10)
        assert ex.submit(h.square, 4).result(10) == 16


@pytest.mark.parametrize("crash", ["exit", "segfault", "sigkill"])
def test_a_crash_fails_only_its_task_and_the_next_submit_works(crash: str) -> None:
    with anyfork.Executor(max_workers=2) as ex:
        if crash == "exit":
            fut = ex.submit(h.die, 5)
            expected = 5
        elif crash == "segfault":
            fut = ex.submit(h.segfault)
            expected = -signal.SIGSEGV
        else:
            victim = ex.submit(h.pid).result(10)
            fut = ex.submit(h.sleep, 30)
            os.kill(victim, signal.SIGKILL)
            expected = -signal.SIGKILL
        with pytest.raises(BrokenProcessPool) as info:  # what PPE code catches
            fut.result(20)
        assert isinstance(info.value, anyfork.WorkerDiedError)
        assert info.value.returncode == expected
        assert ex.submit(h.square, 5).result(10) == 25  # not broken: replaced


def test_initializer_runs_in_each_worker_and_a_failing_one_breaks_the_executor() -> None:
    with anyfork.Executor(max_workers=1, initializer=h.record_init, initargs=("x", 1)) as ex:
        assert ex.submit(h.init_seen).result(10) == repr(("x", 1))
    with anyfork.Executor(max_workers=1, initializer=h.fail_init) as ex:
        with pytest.raises(BrokenProcessPool, match="this init always fails"):
            ex.submit(h.square, 2).result(10)
        with pytest.raises(BrokenProcessPool):
            ex.submit(h.square, 2)


def test_max_tasks_per_child_recycles_by_forking() -> None:
    with anyfork.Executor(max_workers=1, max_tasks_per_child=1) as ex:
        pids = [ex.submit(h.pid).result(10) for _ in range(5)]
    assert len(set(pids)) == 5


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max_workers": 0}, ValueError), ({"max_workers": -1}, ValueError), ({"max_workers": "2"}, TypeError),
    ({"max_tasks_per_child": 0}, ValueError), ({"initializer": 3}, TypeError),
])
def test_bad_arguments_fail_at_the_call(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        anyfork.Executor(**kwargs)  # type: ignore[arg-type]


def test_mp_context_is_accepted_and_unused() -> None:
    import multiprocessing

    with anyfork.Executor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert ex.submit(h.square, 3).result(10) == 9


def test_no_submit_after_shutdown() -> None:
    ex = anyfork.Executor(max_workers=1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(h.square, 1)


def test_shutdown_with_cancel_futures_ends_as_completed() -> None:
    ex = anyfork.Executor(max_workers=1)
    ex.submit(h.square, 1).result(10)  # a worker is ready: the next call starts at once
    running = ex.submit(h.sleep, 0.5)
    queued = [ex.submit(h.sleep, 0.2) for _ in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    done = list(cf.as_completed([running, *queued], timeout=20))  # every one is done, and says so
    assert len(done) == 6
    assert running.result() == 0.5
    # What was already given to the worker (the pool's load, as PPE's call
    # queue) ran; the rest was cancelled.
    assert sum(f.cancelled() for f in queued) >= 3
    assert all(f.cancelled() or f.result() == 0.2 for f in queued)


def test_shutdown_waits_out_a_stuck_task_when_it_has_a_timeout() -> None:
    ex = anyfork.Executor(max_workers=1, task_timeout=0.5)
    fut = ex.submit(h.sleep, 60)
    ex.shutdown(wait=True)  # bounded by the task's timeout
    with pytest.raises(anyfork.pool.TaskTimeoutError):
        fut.result(0)


def test_shutdown_returns_only_after_a_timed_out_tasks_future_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    # The manager thread used to end as soon as no worker held a call; the
    # thread that took the timed-out one out set its future a moment later,
    # so shutdown(wait=True) could return with it still pending (seen as a
    # flaky test above).  Setting a future is made slow to open that moment.
    import time

    from anyfork import pool

    def slow(name: str) -> object:
        original = getattr(cf.Future, name)

        def setter(self: cf.Future[object], value: object) -> None:
            time.sleep(2)
            original(self, value)
        return setter
    monkeypatch.setattr(pool._Task, "set_exception", slow("set_exception"))
    ex = anyfork.Executor(max_workers=1, task_timeout=0.5)
    fut = ex.submit(h.sleep, 60)
    ex.shutdown(wait=True)
    assert fut.done()
    assert isinstance(fut.exception(0), anyfork.pool.TaskTimeoutError)


def test_a_tasks_systemexit_and_keyboardinterrupt_are_its_futures_exceptions() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        with pytest.raises(SystemExit):
            ex.submit(h.raise_system_exit).result(10)
        with pytest.raises(KeyboardInterrupt):
            ex.submit(h.raise_keyboard_interrupt).result(10)
        assert ex.submit(h.square, 2).result(10) == 4


@pytest.mark.skipif("cloudpickle" in sys.modules or __import__("importlib").util.find_spec("cloudpickle")
                    is not None, reason="cloudpickle installed: lambdas are sent by value")
def test_a_lambda_without_cloudpickle_fails_its_future_with_the_pickling_error() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        with pytest.raises(Exception, match=r"(?i)pickle") as info:
            ex.submit(lambda: 1).result(10)
        assert not isinstance(info.value, BrokenProcessPool)
        assert ex.submit(h.square, 2).result(10) == 4


def test_run_in_executor() -> None:
    async def main() -> int:
        with anyfork.Executor(max_workers=1) as ex:
            return await asyncio.get_running_loop().run_in_executor(ex, h.square, 12)  # type: ignore[no-any-return]

    assert asyncio.run(main()) == 144


def test_an_executor_dropped_without_shutdown_leaves_no_worker() -> None:
    ex = anyfork.Executor(max_workers=1)
    worker = ex.submit(h.pid).result(10)
    del ex
    gc.collect()
    assert wait_exited(worker, 10)


@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers(how: str) -> None:
    ex = anyfork.Executor(max_workers=1)
    worker = ex.submit(h.pid).result(10)
    fut = ex.submit(h.sleep, 30)
    getattr(ex, how)()
    with pytest.raises(BaseException):  # noqa: B017 - cancelled or WorkerDiedError, as PPE
        fut.result(20)
    assert wait_exited(worker, 10)
    ex.shutdown()


# --- a failure at each stage of a task: its future's error; the executor goes on -------------


def _goes_on(ex: anyfork.Executor, workers: list[int]) -> None:
    assert [ex.submit(h.square, i).result(10) for i in range(4)] == [0, 1, 4, 9]
    assert sorted(ex._pool.workers) == workers  # nobody died or was replaced for it


def _started(ex: anyfork.Executor) -> list[int]:
    ex.submit(h.square, 0).result(10)
    ex.submit(h.square, 0).result(10)
    return sorted(ex._pool.workers)


def test_a_call_that_wont_pickle_fails_its_future_and_the_executor_goes_on() -> None:
    import threading

    with anyfork.Executor(max_workers=1) as ex:
        workers = _started(ex)
        fut = ex.submit(h.square, threading.Lock())
        with pytest.raises(TypeError, match="pickle"):
            fut.result(10)
        _goes_on(ex, workers)


def test_a_call_that_wont_unpickle_in_the_worker_fails_its_future_and_the_executor_goes_on() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        workers = _started(ex)
        fut = ex.submit(h.square, h.LoadsOnlyIn(os.getpid()))
        with pytest.raises(ValueError, match="unpickles only in process"):
            fut.result(10)
        _goes_on(ex, workers)


def test_a_result_that_wont_pickle_in_the_worker_fails_its_future_and_the_executor_goes_on() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        workers = _started(ex)
        with pytest.raises(anyfork.rpc.RemoteError, match="the result can't be serialized") as info:
            ex.submit(h.returns_a_lock).result(10)
        assert info.value.type_name == "builtins.TypeError"
        _goes_on(ex, workers)


def test_a_result_that_wont_unpickle_in_the_caller_fails_its_future_and_the_executor_goes_on() -> None:
    with anyfork.Executor(max_workers=1) as ex:
        workers = _started(ex)
        with pytest.raises(ValueError, match="does not unpickle in process"):
            ex.submit(h.returns_unloadable, os.getpid()).result(10)
        _goes_on(ex, workers)


def test_a_forked_caller_gets_a_dead_executor_and_leaves_the_parents_alone() -> None:
    from helpers import run_program

    facts = run_program("executor_forked_caller.py", timeout=60)
    for how in ("fork", "mp"):
        child = facts[how]
        assert child["submit"] == ["raised", "ProcessStateError"], how
        assert child["inherited_result"] == ["raised", "ProcessStateError"], how
        assert child["inherited_done"] == ["value", 1], how  # wait() sees it done: no hang
        assert child["shutdown"] == ["value", None], how
    assert facts["fork_status"] == 0
    assert facts["mp_status"] == 0
    assert facts["parent_pending"] == [0.5, 0.5]
    assert facts["parent_after"] == [0, 1, 4, 9]
    assert facts["same_workers"]  # the children's exits closed none of the parent's workers


def test_a_result_made_of_the_main_scripts_classes_unpickles_in_the_caller(tmp_path: Path) -> None:
    # The worker imports the script as __anyfork_main__, so what it makes of
    # the script's classes pickles under that name: the caller must resolve it.
    from helpers import run_source

    ran = run_source(tmp_path, """
        import json

        import anyfork


        class Point:
            def __init__(self, x):
                self.x = x


        def make(x):
            return Point(x)


        if __name__ == "__main__":
            with anyfork.Executor(max_workers=1) as ex:
                p = ex.submit(make, 7).result(10)
            print(json.dumps({"type": type(p).__name__, "same_class": type(p) is Point, "x": p.x}))
        """)
    assert ran.facts == {"type": "Point", "same_class": True, "x": 7}

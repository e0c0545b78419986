"""anyfork._futures: a Future without a Condition until somebody waits."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import warnings

import pytest

from anyfork import _futures
from anyfork._futures import LazyFuture

TIMEOUT = 20.0


def _has_condition(f: concurrent.futures.Future[object]) -> bool:
    return getattr(f, "_anyfork_cond", None) is not None or "_condition" in vars(f)


def test_a_future_set_and_read_by_one_thread_never_makes_a_condition() -> None:
    f = LazyFuture()
    assert f.set_running_or_notify_cancel()
    f.set_result(7)
    assert f.done() and not f.running() and not f.cancelled()
    assert f.result() == 7 and f.exception() is None
    assert not _has_condition(f)
    g = LazyFuture()
    assert g.cancel() and g.cancelled()
    assert not g.set_running_or_notify_cancel()
    assert not _has_condition(g)


def test_an_executor_round_trip_makes_no_condition() -> None:
    # The reason for the class: 8 tracked objects per future, walked by the
    # collector while thousands of tasks are in flight.
    import anyfork

    with anyfork.Executor(1) as ex:
        futures = []
        for i in range(20):
            f = ex.submit(abs, -i)
            assert f.result() == i
            futures.append(f)
        # (A result that came while result() was already waiting for it
        # makes one, rightly: allow a few.)
        made = sum(_has_condition(f) for f in futures)
        assert made <= 5, f"{made} of 20 round trips made a condition"


def test_it_keeps_the_future_contract() -> None:
    f = LazyFuture()
    f.set_running_or_notify_cancel()
    assert not f.cancel(), "a running future can't be cancelled"
    f.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        f.result()
    assert isinstance(f.exception(), ValueError)
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_exception(ValueError())
    g = LazyFuture()
    g.set_running_or_notify_cancel()
    with pytest.raises(RuntimeError, match="unexpected state"):
        g.set_running_or_notify_cancel()
    h = LazyFuture()
    assert h.cancel() and h.cancel(), "cancelling twice says True twice"
    with pytest.raises(concurrent.futures.CancelledError):
        h.result()
    seen: list[object] = []
    k = LazyFuture()
    k.add_done_callback(seen.append)
    k.set_running_or_notify_cancel()
    k.set_result(1)
    k.add_done_callback(seen.append)  # done already: called at once
    assert seen == [k, k]


def test_a_waiter_that_comes_before_the_result_is_woken() -> None:
    f = LazyFuture()
    f.set_running_or_notify_cancel()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(f.result(timeout=TIMEOUT)))
    t.start()
    while not _has_condition(f):  # it waits: its condition is made
        threading.Event().wait(0.001)
    f.set_result("late")
    t.join(TIMEOUT)
    assert got == ["late"]


def test_as_completed_and_wait_see_results_and_cancels() -> None:
    done, cancelled, pending = LazyFuture(), LazyFuture(), LazyFuture()
    done.set_running_or_notify_cancel()
    out = []

    def finish() -> None:
        done.set_result(1)
        cancelled.cancel()
        cancelled.set_running_or_notify_cancel()  # (what an executor does with a cancelled one)
        pending.set_running_or_notify_cancel()
        pending.set_exception(KeyError("k"))

    timer = threading.Timer(0.05, finish)
    timer.start()
    for f in concurrent.futures.as_completed([done, cancelled, pending], timeout=TIMEOUT):
        out.append(f)
    timer.join()
    assert set(out) == {done, cancelled, pending} and len(out) == 3
    finished, not_done = concurrent.futures.wait([done, cancelled, pending], timeout=0)
    assert not not_done and len(finished) == 3


def test_settle_all_finishes_each_with_its_value_or_error_and_makes_no_condition() -> None:
    # rpc settles a batch of replies at once (one lock for those nobody waits on).
    a, b = LazyFuture("RUNNING"), LazyFuture("RUNNING")
    waited = LazyFuture("RUNNING")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(waited.result(timeout=TIMEOUT)))
    t.start()
    while not _has_condition(waited):
        threading.Event().wait(0.001)
    error = KeyError("k")
    _futures.settle_all([(a, 1, None), (waited, "w", None), (b, None, error)])
    t.join(TIMEOUT)
    assert a.result() == 1 and b.exception() is error and got == ["w"]
    assert not _has_condition(a) and not _has_condition(b)


@pytest.mark.parametrize("setter", ["set_result", "cancel", "settle", "settle_all"])
def test_a_waiter_racing_the_setter_is_never_left_waiting(setter: str) -> None:
    # Each round: one thread waits (result, as_completed, or a callback),
    # another changes the state at the same moment.  Every waiter must
    # see the change; the bound is the test's, not a sleep.
    for i in range(2000):
        f = LazyFuture("RUNNING" if setter.startswith("settle") else "PENDING")
        if setter == "set_result":
            f.set_running_or_notify_cancel()
        go = threading.Barrier(2)
        called = threading.Event()
        errors: list[BaseException] = []
        kind = i % 3

        def wait(f: LazyFuture, go: threading.Barrier, called: threading.Event, kind: int) -> None:
            go.wait()
            if kind == 0:
                try:
                    f.result(timeout=TIMEOUT)
                except concurrent.futures.CancelledError:
                    pass
            elif kind == 1:
                try:  # (told twice, it would raise KeyError)
                    got = list(concurrent.futures.as_completed([f], timeout=TIMEOUT))
                except BaseException as e:
                    errors.append(e)
                    return
                if got != [f]:
                    errors.append(AssertionError(got))
            else:
                f.add_done_callback(lambda _: called.set())
                assert called.wait(TIMEOUT)

        t = threading.Thread(target=wait, args=(f, go, called, kind))
        t.start()
        go.wait()
        if setter == "set_result":
            f.set_result(i)
        elif setter == "settle":
            f.settle(i, None)
        elif setter == "settle_all":
            _futures.settle_all([(f, i, None)])
        else:
            f.cancel()
            f.set_running_or_notify_cancel()
        t.join(TIMEOUT)
        assert not t.is_alive(), f"round {i}: the waiter was left waiting"
        assert not errors, f"round {i}: {errors}"


def test_a_fork_while_another_thread_holds_the_transition_lock_leaves_the_child_free() -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _futures._transition:
            held.set()
            release.wait(TIMEOUT)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(TIMEOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (3.12+: a fork with threads)
        pid = os.fork()
    if pid == 0:  # the child: its futures don't wait for the parent's thread
        code = 1
        try:
            signal.alarm(10)  # stuck: killed, and the test fails rather than hangs
            f = LazyFuture()
            code = 0 if f.cancel() else 2
        finally:
            os._exit(code)
    release.set()
    t.join(TIMEOUT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

"""The backend interface: one operation, run by the blocking and the asyncio backend."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from anyfork import _backend as B

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    Runner = Callable[[B.Op[Any]], Any]


def _run_async(op: B.Op[Any]) -> Any:
    return asyncio.run(B.run_async(op))


@pytest.fixture(params=["blocking", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    return B.run_blocking if request.param == "blocking" else _run_async


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        yield a, b


def recv_op(sock: socket.socket, log: list[str]) -> B.Op[bytes]:
    """Read what is there, waiting until something is."""
    try:
        while True:
            try:
                return sock.recv(100)
            except BlockingIOError:
                log.append("wait")
                ready = yield B.Wait(reads=(sock.fileno(),))
                log.append(f"ready {list(ready) == [sock.fileno()]}")
    finally:
        log.append("finally")


def test_an_operation_waits_until_readable(run: Runner, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    log: list[str] = []

    def send_once_it_waits() -> None:
        # (Not on a timer: under load the operation may start after it.)
        for _ in range(2000):
            if "wait" in log:
                break
            time.sleep(0.005)
        b.send(b"hi")

    sender = threading.Thread(target=send_once_it_waits)
    sender.start()
    assert run(recv_op(a, log)) == b"hi"
    sender.join(10)
    assert log == ["wait", "ready True", "finally"]


def test_an_operation_that_never_blocks_never_waits(run: Runner,
                                                    pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"now")
    log: list[str] = []
    assert run(recv_op(a, log)) == b"now"
    assert log == ["finally"]


def test_writable_and_readable_at_once(run: Runner, pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair

    def op() -> B.Op[tuple[int, ...]]:
        return (yield B.Wait(reads=(a.fileno(),), writes=(a.fileno(),)))

    assert run(op()) == (a.fileno(),)  # writable, though nothing to read


def test_a_deadline_ends_the_wait_with_nothing_ready(run: Runner,
                                                     pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair

    def op() -> B.Op[tuple[tuple[int, ...], bool]]:
        deadline = B.deadline_after(0.05)
        ready = yield B.Wait(reads=(a.fileno(),), deadline=deadline)
        assert deadline is not None
        return ready, time.monotonic() >= deadline

    assert run(op()) == ((), True)


def test_huge_timeouts_mean_no_deadline() -> None:
    for timeout in (None, float("inf"), 1e10, 3e300):
        assert B.deadline_after(timeout) is None
    assert B.time_left(None) is None
    finite = B.deadline_after(3e6)
    assert finite is not None
    assert finite > time.monotonic()
    assert B.time_left(time.monotonic() - 5) == 0.0


@pytest.mark.parametrize("with_fds", [False, True])
def test_another_thread_wakes_a_waiter(run: Runner, pair: tuple[socket.socket, socket.socket],
                                       with_fds: bool) -> None:
    a, _ = pair
    notifier = B.Notifier()
    state: list[str] = []

    def op() -> B.Op[list[str]]:
        while True:
            epoch = notifier.epoch
            if state:
                return state
            yield B.Wait(reads=(a.fileno(),) if with_fds else (), notifier=notifier, epoch=epoch,
                         deadline=B.deadline_after(20))

    def change() -> None:
        state.append("changed")
        notifier.notify()

    threading.Timer(0.05, change).start()
    assert run(op()) == ["changed"]
    assert not notifier._waiters


def test_a_notification_between_check_and_wait_is_not_lost(run: Runner) -> None:
    notifier = B.Notifier()
    waits: list[int] = []

    def op() -> B.Op[int]:
        epoch = notifier.epoch
        notifier.notify()  # as if another thread changed the state right after our check
        yield B.Wait(notifier=notifier, epoch=epoch)  # no deadline: would hang if lost
        waits.append(1)
        return len(waits)

    assert run(op()) == 1
    assert not notifier._waiters


def test_a_signal_handler_exception_reaches_the_operations_finally(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    log: list[str] = []

    class AlarmError(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise AlarmError

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(AlarmError):
            B.run_blocking(recv_op(a, log))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert log == ["wait", "finally"]


def test_cancellation_reaches_the_operations_finally_and_unregisters(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    log: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(B.run_async(recv_op(a, log)))
        await asyncio.sleep(0.02)
        assert B._watches_of(loop).readers  # registered while it waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not B._watches_of(loop).readers
        # Nothing left with the loop's selector for that descriptor.
        selector = loop._selector  # type: ignore[attr-defined]
        assert a.fileno() not in selector.get_map()

    asyncio.run(main())
    assert log == ["wait", "finally"]


def test_an_operation_may_catch_the_cancellation_and_go_on(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    def op() -> B.Op[str]:
        try:
            yield B.Wait(reads=(a.fileno(),))
        except asyncio.CancelledError:
            b.send(b"x")
            yield B.Wait(reads=(a.fileno(),))
            return "cleaned up"
        return "not cancelled"

    async def main() -> str:
        task = asyncio.ensure_future(B.run_async(op()))
        await asyncio.sleep(0.02)
        task.cancel()
        return await task

    assert asyncio.run(main()) == "cleaned up"


def test_tasks_waiting_on_one_descriptor_all_wake(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    def op() -> B.Op[tuple[int, ...]]:
        return (yield B.Wait(reads=(a.fileno(),)))

    async def main() -> list[tuple[int, ...]]:
        tasks = [asyncio.ensure_future(B.run_async(op())) for _ in range(5)]
        await asyncio.sleep(0.02)
        b.send(b"x")
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert asyncio.run(main()) == [(a.fileno(),)] * 5


def test_the_loop_keeps_running_while_operations_wait(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    async def main() -> float:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        waiter = asyncio.ensure_future(B.run_async(recv_op(a, [])))
        await asyncio.sleep(0.2)
        b.send(b"x")
        await waiter
        t.cancel()
        return len(ticks)

    assert asyncio.run(main()) >= 5  # the ticker ran while the operation waited


def test_a_closed_loop_is_no_error_for_a_late_notify() -> None:
    notifier = B.Notifier()

    def op() -> B.Op[None]:
        yield B.Wait(notifier=notifier, epoch=notifier.epoch, deadline=B.deadline_after(0.01))

    asyncio.run(B.run_async(op()))
    notifier.notify()  # nobody waits: nothing to do, and nothing raises


def test_operations_can_be_run_from_many_threads() -> None:
    notifier = B.Notifier()
    done: list[int] = []
    target = 16

    def op(i: int) -> B.Op[None]:
        while True:
            epoch = notifier.epoch
            if len(done) >= i:
                return
            yield B.Wait(notifier=notifier, epoch=epoch, deadline=B.deadline_after(20))

    def worker(i: int) -> None:
        B.run_blocking(op(i))
        done.append(i)
        notifier.notify()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(target)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == list(range(target))
    assert not notifier._waiters

"""The backend interface: how anyfork's caller side waits.

Theory of operation
-------------------
Every caller-side operation that may have to wait (flush a command queue,
wait for a report, wait for an exit, an rpc call) is written once, as a
generator.  It makes non-blocking calls only, and when one would block it
yields a :class:`Wait` that says what it needs: descriptors to become
readable or writable, a wake-up from another thread (a :class:`Notifier`),
and until when.  A *backend* runs the generator to its end and sends back,
at each wait, the descriptors that became ready (empty when the deadline
passed or another thread woke it: the operation checks its own state
again either way)::

    def op() -> Op[int]:
        while True:
            try:
                return sock.recv_into(buf, n, MSG_DONTWAIT)
            except BlockingIOError:
                yield Wait(reads=(sock.fileno(),))

    n = run_blocking(op())          # this thread waits, in poll()
    n = await run_async(op())       # the running asyncio loop waits

So the logic of each operation exists once, and a backend is only the three
primitives of waiting: until readable, until writable, until woken.  The
blocking one is ``run_blocking``; the asyncio one is ``run_async``; a trio
one (through anyio) would be one more short function of the same shape.

An exception raised while a backend waits (KeyboardInterrupt from a signal
handler, an asyncio cancellation) is thrown into the operation at its
``yield``, so that its ``finally`` blocks restore what it had taken (a
reader role, a lock-free flag) before the exception goes on to the caller.

Lost wake-ups: an operation reads ``notifier.epoch`` *before* it checks the
state it is waiting for and puts that number in its ``Wait``; a backend
that finds the epoch moved on by the time it has registered returns at
once.  So a notification between the check and the wait is never missed.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

T = TypeVar("T")

_POLLIN, _POLLOUT = 1, 4  # POSIX values, the same on every platform poll exists on
_POLLERR_HUP = 0x8 | 0x10 | 0x20  # POLLERR | POLLHUP | POLLNVAL: ready, the call will say why
# How often a blocking wait on descriptors *and* a notifier looks at the
# notifier again.  Only contended waits combine the two (one thread flushes
# to a template while another reads its reports); a pipe per thread to make
# those wake-ups instant would cost every thread a descriptor.
_NOTIFY_SLICE = 0.02


class Notifier:
    """Something other threads (or tasks of other loops) can wait to change.

    Whoever changes the state calls ``notify()``; the waiters, whatever their
    backend, then look at the state again.  ``epoch`` counts notifications.
    """

    __slots__ = ("_lock", "_waiters", "epoch")

    def __init__(self) -> None:
        self.epoch = 0
        self._lock = threading.Lock()
        self._waiters: dict[object, tuple[Callable[[], None], Callable[[], bool] | None]] = {}

    def notify(self) -> None:
        with self._lock:
            self.epoch += 1
            waiters = list(self._waiters.items()) if self._waiters else ()
        for key, (wake, until) in waiters:
            # A waiter whose condition is still false would only look and wait
            # again; with hundreds of tasks waiting on one template's reports,
            # waking them all for every report swamped the event loop.  One
            # woken is done with this wait: later notifications skip it.
            if until is None or until():
                with self._lock:
                    woken = self._waiters.pop(key, None) is not None
                if woken:
                    wake()

    def _add(self, key: object, wake: Callable[[], None], epoch: int,
             until: Callable[[], bool] | None = None) -> bool:
        """Register ``wake`` (called on ``notify`` if ``until`` is None or
        true then); False (and nothing registered) if ``epoch`` is stale."""
        with self._lock:
            if self.epoch != epoch:
                return False
            self._waiters[key] = (wake, until)
            return True

    def _remove(self, key: object) -> None:
        with self._lock:
            self._waiters.pop(key, None)


class Wait:
    """What an operation waits for; any one of them ends the wait.

    Args:
        reads: descriptors to wait on until readable (or in error: then the
            call the operation makes next says what is wrong).
        writes: descriptors to wait on until writable.
        deadline: ``time.monotonic()`` value after which to give up, or None.
        notifier: wake when it is notified ...
        epoch: ... or if it already was since ``epoch`` was read.
        until: if given, a notification wakes only if this says so then (a
            cheap check of the state the operation waits for; it runs in the
            notifying thread, and the operation checks again when woken).
    """

    __slots__ = ("deadline", "epoch", "notifier", "reads", "until", "writes")

    def __init__(
        self,
        reads: tuple[int, ...] = (),
        writes: tuple[int, ...] = (),
        deadline: float | None = None,
        notifier: Notifier | None = None,
        epoch: int = 0,
        *,
        until: Callable[[], bool] | None = None,
    ) -> None:
        self.reads = reads
        self.writes = writes
        self.deadline = deadline
        self.notifier = notifier
        self.epoch = epoch
        self.until = until

    def __repr__(self) -> str:
        return (f"Wait(reads={self.reads}, writes={self.writes}, deadline={self.deadline}, "
                f"notifier={self.notifier is not None})")


#: What an operation is: a generator that yields waits, is sent the ready
#: descriptors, and returns its result.
Op = Generator[Wait, tuple[int, ...], T]


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now; None waits for ever.

    A timeout too large to mean anything (inf, 1e300) is no deadline at all,
    never an OverflowError further down.
    """
    if timeout is None or timeout > 1e9:
        return None
    return time.monotonic() + max(0.0, timeout)


def sooner(deadline: float | None, seconds: float) -> float:
    """``deadline``, or ``seconds`` from now if that comes first."""
    soon = time.monotonic() + seconds
    return soon if deadline is None else min(deadline, soon)


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# --- the blocking backend ---------------------------------------------------------------


def run_blocking(op: Op[T]) -> T:
    """Run ``op`` to its end on this thread, waiting in ``poll()``.

    Returns:
        What the operation returns.
    """
    try:
        wait = op.send(None)  # type: ignore[arg-type]
        while True:
            try:
                ready = _block(wait)
            except BaseException as e:
                wait = op.throw(e)  # its finally blocks run; usually it re-raises
                continue
            wait = op.send(ready)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _block(wait: Wait) -> tuple[int, ...]:
    notifier = wait.notifier
    if notifier is None:
        return _poll(wait.reads, wait.writes, time_left(wait.deadline))
    if not wait.reads and not wait.writes:
        return _block_on_notifier(notifier, wait)
    # Descriptors and a notifier: poll in slices, looking at the epoch between.
    while True:
        left = time_left(wait.deadline)
        ready = _poll(wait.reads, wait.writes, _NOTIFY_SLICE if left is None else min(left, _NOTIFY_SLICE))
        if ready or notifier.epoch != wait.epoch or left == 0 or (left is not None and left <= _NOTIFY_SLICE):
            return ready


def _block_on_notifier(notifier: Notifier, wait: Wait) -> tuple[int, ...]:
    lock = threading.Lock()
    lock.acquire()

    def wake() -> None:
        try:
            lock.release()
        except RuntimeError:  # woken twice
            pass

    key = object()
    if not notifier._add(key, wake, wait.epoch, wait.until):
        return ()
    try:
        left = time_left(wait.deadline)
        lock.acquire(timeout=-1 if left is None else left)
    finally:
        notifier._remove(key)
    return ()


def _poll(reads: tuple[int, ...], writes: tuple[int, ...], timeout: float | None) -> tuple[int, ...]:
    """The descriptors among ``reads`` and ``writes`` that are ready.

    poll, not select: a big program's descriptors can be numbered past
    select's FD_SETSIZE (1024).
    """
    import select

    poller = select.poll()
    for fd in reads:
        poller.register(fd, _POLLIN)
    for fd in writes:
        if fd in reads:
            poller.modify(fd, _POLLIN | _POLLOUT)
        else:
            poller.register(fd, _POLLOUT)
    # Round up: a wait of 0.4 ms must not become a busy poll(0).
    ms = None if timeout is None else int(timeout * 1000 + 0.999)
    return tuple(fd for fd, _ in poller.poll(ms))


# --- the asyncio backend ----------------------------------------------------------------


async def run_async(op: Op[T]) -> T:
    """Run ``op`` to its end in the running asyncio loop, never blocking it.

    A cancellation while it waits is thrown into the operation, which cleans
    up and lets it go on.

    Returns:
        What the operation returns.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        wait = op.send(None)  # type: ignore[arg-type]
        while True:
            try:
                ready = await _await(loop, wait)
            except BaseException as e:
                wait = op.throw(e)
                continue
            wait = op.send(ready)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class _Watches:
    """One loop's registrations: asyncio takes one reader and one writer per
    descriptor, and several tasks may wait on the same one (two ``wait_async``
    calls on one process), so each (descriptor, direction) gets one callback
    that wakes every future waiting on it."""

    __slots__ = ("loop", "readers", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.readers: dict[int, set[asyncio.Future[tuple[int, ...]]]] = {}
        self.writers: dict[int, set[asyncio.Future[tuple[int, ...]]]] = {}

    def add(self, fd: int, write: bool, fut: asyncio.Future[tuple[int, ...]]) -> None:
        table = self.writers if write else self.readers
        futs = table.get(fd)
        if futs is None:
            futs = table[fd] = set()
            try:
                if write:
                    self.loop.add_writer(fd, self._fire, table, fd)
                else:
                    self.loop.add_reader(fd, self._fire, table, fd)
            except BaseException:
                del table[fd]
                raise
        futs.add(fut)

    def remove(self, fd: int, write: bool, fut: asyncio.Future[tuple[int, ...]]) -> None:
        table = self.writers if write else self.readers
        futs = table.get(fd)
        if futs is None:
            return
        futs.discard(fut)
        if not futs:
            del table[fd]
            if write:
                self.loop.remove_writer(fd)
            else:
                self.loop.remove_reader(fd)

    @staticmethod
    def _fire(table: dict[int, set[asyncio.Future[tuple[int, ...]]]], fd: int) -> None:
        for fut in list(table.get(fd, ())):
            if not fut.done():
                fut.set_result((fd,))


_watches: weakref.WeakKeyDictionary[Any, _Watches] = weakref.WeakKeyDictionary()
_watches_lock = threading.Lock()


def _watches_of(loop: asyncio.AbstractEventLoop) -> _Watches:
    w = _watches.get(loop)
    if w is None:
        with _watches_lock:
            w = _watches.get(loop)
            if w is None:
                w = _watches[loop] = _Watches(loop)
    return w


def _resolve(fut: asyncio.Future[tuple[int, ...]]) -> None:
    if not fut.done():
        fut.set_result(())


async def _await(loop: asyncio.AbstractEventLoop, wait: Wait) -> tuple[int, ...]:
    fut: asyncio.Future[tuple[int, ...]] = loop.create_future()
    watches = _watches_of(loop)
    added: list[tuple[int, bool]] = []
    notifier = wait.notifier
    key = object()
    timer = None
    try:
        if notifier is not None:

            def wake() -> None:
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # the loop is closed; its task is gone
                    pass

            if not notifier._add(key, wake, wait.epoch, wait.until):
                return ()
        for fd in wait.reads:
            watches.add(fd, False, fut)
            added.append((fd, False))
        for fd in wait.writes:
            watches.add(fd, True, fut)
            added.append((fd, True))
        left = time_left(wait.deadline)
        if left is not None:
            timer = loop.call_later(left, _resolve, fut)
        return await fut
    finally:
        if timer is not None:
            timer.cancel()
        if notifier is not None:
            notifier._remove(key)
        for fd, write in added:
            watches.remove(fd, write, fut)

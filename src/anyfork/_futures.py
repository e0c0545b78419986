"""A ``concurrent.futures.Future`` that makes its ``Condition`` only when
somebody waits on it: rpc's and the pool's futures.

A ``Future`` makes a ``threading.Condition`` in ``__init__`` (with its
RLock, a deque and five bound methods: eight objects the cycle collector
tracks) and takes it in every method.  Most of our futures are asked for
their result after it came, by the thread that set it or one that found it
done: neither needs a lock.  With 10,000 tasks in flight, those objects were
most of what the collector walked, and its passes about 40% of the caller's
time per task.

The rules that keep it correct:

- Whoever waits (``result()`` before the result, ``wait``, ``as_completed``,
  ``add_done_callback``) goes through ``_condition``, which makes the
  condition (and the lists of waiters and callbacks) under
  ``_transition``, then looks at the state under it.
- Every change of state (cancel, set running, set the result) takes
  ``_transition`` and looks for a condition there: with none, it changes
  the state alone (nobody can be waiting, and whoever comes next makes the
  condition and sees the new state); with one, it does what the base class
  does, under the condition.
- ``settle`` (rpc's futures, which are never cancelled: RUNNING from the
  start, and set once by one thread) is the same change without the base
  class's checks.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, InvalidStateError, _base
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_transition = threading.Lock()


def _new_lock() -> None:
    # A thread of the parent may have held it at the fork; the child's
    # futures (the pool fails those it inherited) must not wait for it.
    global _transition
    _transition = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


class LazyFuture(Future):  # type: ignore[type-arg]
    # Until a condition is made: nobody waits and no callback is added (both
    # happen under it), so the lists are made with it.
    _waiters: list[Any] = ()  # type: ignore[assignment]
    _done_callbacks: list[Any] = ()  # type: ignore[assignment]  # (as _waiters)
    # (A class default, not a look into ``__dict__``, which would make each
    # instance a dict of its own: one more object per future.)
    _anyfork_cond: threading.Condition | None = None

    def __init__(self, state: str = PENDING) -> None:  # not super's: no condition yet
        self._state = state
        self._result: Any = None
        self._exception: BaseException | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._anyfork_cond
        if cond is None:
            with _transition:
                cond = self._anyfork_cond
                if cond is None:
                    self._waiters = []
                    self._done_callbacks = []
                    cond = self._anyfork_cond = threading.Condition()
        return cond

    # --- asking: no lock ---------------------------------------------------------------

    def __repr__(self) -> str:
        state = self._state
        head = f"<{type(self).__name__} at {id(self):#x} state={_base._STATE_TO_DESCRIPTION_MAP[state]}"
        if state != FINISHED:
            return head + ">"
        if self._exception is not None:
            return f"{head} raised {type(self._exception).__name__}>"
        return f"{head} returned {type(self._result).__name__}>"

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> Any:
        if self._state != FINISHED:
            return super().result(timeout)
        exc = self._exception
        if exc is None:
            return self._result
        del self  # the traceback keeps this frame: no cycle through it
        try:
            raise exc
        finally:
            del exc

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            return super().exception(timeout)
        return self._exception

    # --- changing state ----------------------------------------------------------------

    def cancel(self) -> bool:
        with _transition:
            if self._anyfork_cond is None:
                if self._state == PENDING:
                    self._state = CANCELLED
                    return True
                return self._state not in (RUNNING, FINISHED)
        return super().cancel()

    def set_running_or_notify_cancel(self) -> bool:
        with _transition:
            if self._anyfork_cond is None:
                state = self._state
                if state == PENDING:
                    self._state = RUNNING
                    return True
                if state == CANCELLED:
                    self._state = CANCELLED_AND_NOTIFIED
                    return False
                raise RuntimeError(f"Future in unexpected state: {state}")
        return super().set_running_or_notify_cancel()

    def set_result(self, result: Any) -> None:
        if not self._set_alone("_result", result):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._set_alone("_exception", exception):
            super().set_exception(exception)

    def _set_alone(self, field: str, value: object) -> bool:
        """Finish with ``value`` in ``field`` if nobody waits (True), as the
        base class would (InvalidStateError once done); False: somebody
        made the condition, so the base class does it, under it."""
        with _transition:
            if self._anyfork_cond is not None:
                return False
            done = self._state in _DONE
            if not done:
                setattr(self, field, value)
                self._state = FINISHED
                return True
        raise InvalidStateError(f"{self._state}: {self!r}")

    def settle(self, value: Any, error: BaseException | None) -> None:
        """Set the result (or ``error``) of a future nobody else sets or
        cancels (rpc's: RUNNING from the start, set once)."""
        cond = self._anyfork_cond
        if cond is None:
            with _transition:
                cond = self._anyfork_cond
                if cond is None:  # nobody waits: nobody to tell
                    self._finish(value, error)
                    return
        # Somebody waits: the state changes under the condition, as the base
        # class has it, so that a waiter that comes meanwhile (as_completed,
        # wait) either finds it finished or is told, never both.
        with cond:
            self._finish(value, error)
            for waiter in self._waiters:
                if error is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if error is None:
            self._result = value
        else:
            self._exception = error
        self._state = FINISHED


def settle_all(items: list[tuple[LazyFuture, Any, BaseException | None]]) -> None:
    """``settle`` each (future, value, error), taking the module's lock once
    for all of those nobody waits on: a batch of replies read at once."""
    waited = []
    with _transition:
        for fut, value, error in items:
            if fut._anyfork_cond is not None:
                waited.append((fut, value, error))
            elif error is None:
                fut._result = value
                fut._state = FINISHED
            else:
                fut._exception = error
                fut._state = FINISHED
    for fut, value, error in waited:
        fut.settle(value, error)


def wait_left(end: float | None) -> float | None:
    """What is left of a wait that ends at ``end`` (monotonic; None: no end)."""
    return None if end is None else max(0.0, end - time.monotonic())


__all__ = ("FINISHED", "LazyFuture", "settle_all", "wait_left")

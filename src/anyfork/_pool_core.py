"""The pool's scheduling, as data: which worker takes a call, when to start and retire workers.

Theory of operation
-------------------
This is AnyEvent::Fork::Pool's policy with no processes, no sockets and no
clock of its own: the driver (``pool.py``) tells it what happened, with the
time it happened, and does what it answers.

- A call goes to the ready worker with the fewest outstanding calls, if
  that worker has fewer than ``load``; otherwise it queues.
- Queued calls start a worker when none exists (at once), or when they have
  waited ``start`` seconds and fewer than ``max`` workers exist (one more
  each ``start`` seconds while the queue stays).  At least ``idle`` workers
  are kept.  ``max`` counts every process: one retiring after its last
  call still holds its place until it is gone.
- A worker idle for ``stop`` seconds is retired, down to ``idle`` workers.
- A worker's own ``limit`` (``load`` unless the driver sets another; it
  takes effect at the next placement) is what "fewer than ``load``" means
  for it: the Executor lets a worker that answers tiny calls quickly hold
  more of them, so that they travel in batches (see ``pool.py``).
- A worker that has been given ``max_tasks`` calls takes no more: once its
  last one is answered it is retired, and a new one started if needed.

States of a worker: ``STARTING`` (asked for, not ready for calls yet),
``READY``, ``RETIRING`` (takes no more calls; the driver closes it once its
``load`` is 0) and ``GONE``.  Every call the driver is told to send is
counted in that worker's ``load`` until the driver says it is ``finished``
(answered, failed, or lost with the worker).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

C = TypeVar("C")

STARTING, READY, RETIRING, GONE = "starting", "ready", "retiring", "gone"


class Worker:
    """The scheduler's record of one worker; ``key`` is the driver's own handle."""

    __slots__ = ("assigned", "idle_since", "key", "limit", "load", "state")

    def __init__(self, key: object, now: float, limit: int) -> None:
        self.key = key
        self.state = STARTING
        self.load = 0  # calls sent and not yet finished
        self.limit = limit  # most calls it may have outstanding
        self.assigned = 0  # calls ever sent to it (for max_tasks)
        self.idle_since = now

    def __repr__(self) -> str:
        return f"<Worker {self.key!r} {self.state} load={self.load}>"


class Scheduler(Generic[C]):
    """Decides where calls go and how many workers there should be.

    Args:
        max: most workers at once (starting ones included), >= 1.
        idle: fewest workers to keep, even with nothing to do.
        load: most outstanding calls per worker, >= 1.
        start: seconds calls wait in the queue before another worker starts.
        stop: seconds a worker may stay idle before it is retired.
        max_tasks: calls a worker takes before it is replaced, or None.
    """

    def __init__(self, *, max: int, idle: int = 0, load: int = 2, start: float = 0.1, stop: float = 10.0,
                 max_tasks: int | None = None) -> None:
        self.max = max
        self.idle = idle
        self.load = load
        self.start = start
        self.stop = stop
        self.max_tasks = max_tasks
        self.workers: list[Worker] = []  # every worker not GONE
        self.queue: deque[C] = deque()
        self.queued_since: float | None = None  # when the queue last became non-empty, or last started one
        self.to_start = 0  # workers the driver should start (read and reset by take_starts)
        # Workers take_starts handed out that the driver has not ``added``
        # yet: it starts them outside its lock, and until it has, they hold
        # their places under ``max`` as much as started ones do.
        self.pending = 0

    # --- what the driver tells ------------------------------------------------------

    def submit(self, call: C, now: float) -> Worker | None:
        """A new call: the worker to send it to now, or None (queued)."""
        best = None
        for w in self.workers:
            if w.state == READY and w.load < w.limit and (best is None or w.load < best.load):
                best = w
                if not w.load:
                    break
        if best is not None and not self.queue:
            self._assign(best)
            return best
        if not self.queue:
            self.queued_since = now
        self.queue.append(call)
        if not self.workers and not self.to_start and not self.pending:
            self.to_start = 1  # the first worker starts at once
        return None

    def added(self, key: object, now: float) -> Worker:
        """The driver started a worker (it is STARTING until ``ready``)."""
        w = Worker(key, now, self.load)
        self.workers.append(w)
        if self.pending:
            self.pending -= 1
        return w

    def ready(self, w: Worker, now: float) -> list[tuple[Worker, C]]:
        """The worker can take calls; what to send it now."""
        if w.state != STARTING:
            return []
        w.state = READY
        w.idle_since = now
        return self._drain(now)

    def finished(self, w: Worker, now: float) -> list[tuple[Worker, C]]:
        """A call sent to ``w`` is over; what to send now (to ``w`` or others).

        A RETIRING worker whose load is now 0 is the driver's to close.
        """
        w.load -= 1
        if not w.load:
            w.idle_since = now
        return self._drain(now)

    def retire(self, w: Worker) -> None:
        """``w`` takes no more calls (the worker asked to retire, or it timed out)."""
        if w.state in (STARTING, READY):
            w.state = RETIRING

    def gone(self, w: Worker, now: float) -> list[tuple[Worker, C]]:
        """The worker exited or was closed.  Its outstanding calls are the
        driver's to fail; they count as finished.  What to send now."""
        if w.state == GONE:
            return []
        w.state = GONE
        w.load = 0
        self.workers.remove(w)
        if self.queue and not self._alive() and not self.to_start and not self.pending \
                and self._count() < self.max:
            self.to_start = 1  # calls wait and nobody will take them: at once
            self.queued_since = now
        return self._drain(now)

    def cancel(self, call: C) -> bool:
        """Take a queued call back (its future was cancelled); False if it was sent."""
        try:
            self.queue.remove(call)
        except ValueError:
            return False
        if not self.queue:
            self.queued_since = None
        return True

    # --- timers ------------------------------------------------------------------------

    def due(self, now: float) -> list[Worker]:
        """Run the timers: count workers to start (``take_starts``); the idle
        workers to retire now (already marked RETIRING)."""
        total = self._count()
        if (self.queue and self.queued_since is not None and now - self.queued_since >= self.start
                and total < self.max):
            self.to_start += 1
            total += 1
            self.queued_since = now  # the next one after another ``start`` seconds
        usable = self._alive() + self.to_start + self.pending
        if usable < self.idle and total < self.max:
            self.to_start += min(self.idle - usable, self.max - total)
        retire = []
        if not self.queue:
            spare = self._alive() - self.idle
            for w in self.workers:
                if spare <= 0:
                    break
                if w.state == READY and not w.load and now - w.idle_since >= self.stop:
                    w.state = RETIRING
                    retire.append(w)
                    spare -= 1
        return retire

    def next_deadline(self) -> float | None:
        """When ``due`` next has something to do, or None."""
        times = []
        if self.queue and self.queued_since is not None and self._count() < self.max:
            times.append(self.queued_since + self.start)
        if not self.queue and self._alive() > self.idle:
            times.extend(w.idle_since + self.stop for w in self.workers if w.state == READY and not w.load)
        return min(times) if times else None

    def take_starts(self) -> int:
        """How many workers the driver should start now (counted once)."""
        n, self.to_start = self.to_start, 0
        self.pending += n
        return n

    # --- inside ----------------------------------------------------------------------

    def _assign(self, w: Worker) -> None:
        w.load += 1
        w.assigned += 1
        if self.max_tasks is not None and w.assigned >= self.max_tasks:
            # Its last call is on its way; then it goes.  Its replacement is
            # started now, so that it is ready by the time it is needed.
            w.state = RETIRING
            if self._count() < self.max:
                self.to_start += 1

    def _count(self) -> int:
        """Workers under ``max``: every one not gone, and those asked for."""
        return len(self.workers) + self.to_start + self.pending

    def _alive(self) -> int:
        """Workers that take calls now or soon (``max`` counts every worker)."""
        return sum(1 for w in self.workers if w.state in (STARTING, READY))

    def _drain(self, now: float) -> list[tuple[Worker, C]]:
        out: list[tuple[Worker, C]] = []
        queue = self.queue
        while queue:
            best = None
            for w in self.workers:
                if w.state == READY and w.load < w.limit and (best is None or w.load < best.load):
                    best = w
            if best is None:
                break
            self._assign(best)
            out.append((best, queue.popleft()))
        if not queue:
            self.queued_since = None
        return out

"""Worker pools: ``anyfork.pool.run`` (AnyEvent::Fork::Pool, in Python).

A pool is a template the user prepared (``require``, ``eval``, ``send_fh``,
``send_arg``) and a handler named as for ``rpc.run``; its workers are forks
of the template, each an :mod:`anyfork.rpc` worker running the handler.
Calls go to the least-loaded worker, queue when every worker is at ``load``,
and start workers as the queue waits (``_pool_core`` holds that policy as
data; this module does what it answers).

Theory of operation
-------------------
Three kinds of thread touch a pool, and one lock (``_lock``) orders them:

- callers' threads submit calls;
- whoever completes an rpc future (the thread that reads a worker's
  replies: a caller in ``result()``, or rpc's shared reader) runs
  ``_rpc_done``, which settles the pool's future and sends the next queued
  calls;
- one manager thread per pool does the slow or timed work: it starts
  workers (a fork and an rpc handshake), retires idle ones, and stops calls
  that ran past ``timeout``.  It sleeps on ``_wake`` until the next deadline
  the scheduler or a running call has, or until someone has work for it.

Nothing is sent to a worker, and no future is settled, while ``_lock`` is
held: both can run callbacks that come back into the pool.

A pool belongs to the process that made it.  In a child forked from that
process (``os.fork``, multiprocessing's fork) its workers are the parent's:
the child's copy is dead from the fork on (``_after_fork_in_child``), so that
it never writes to the parent's workers, reads their replies, or closes them
when it exits.  Its calls raise ProcessStateError, and the futures it
inherited unfinished fail with it; the parent's pool goes on untouched.

A worker that dies fails the calls it held with ``WorkerDiedError`` and is
replaced; the pool breaks as a whole only when no worker can be made at all
(then every waiting call fails with ``BrokenPoolError``, saying why).  A
call that never ran (its worker was found dead, or retired, before it
started it) is placed again, first in line.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from . import _fds, _pool_core
from ._errors import Error, ProcessStateError, TimeoutExpired
from ._futures import FINISHED, LazyFuture, wait_left

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import Future
    from typing import Self

    from . import rpc as _rpc
    from ._process import Process

__all__ = ("BrokenPoolError", "Pool", "TaskTimeoutError", "retire", "run")

# How long a stuck call's worker gets to dump its stack, then to exit after
# SIGTERM, before it is killed outright.
_DUMP_WAIT = 0.5
_GRACE = 1.0
# The signal a worker dumps its Python stack on (see _pool_worker).
DUMP_SIGNAL = signal.SIGUSR1
_WORKER_INIT = "anyfork._pool_worker:init"
# Pipelining (the Executor): the work a worker may have waiting for it, in seconds.
_PIPELINE_BUDGET = 0.01
_BOOT_MODULES = ("anyfork._rpc_worker", "anyfork._pool_worker", "anyfork._mainmod")


class TaskTimeoutError(Error, TimeoutError):
    """A call ran longer than the pool's ``timeout``: its worker was killed.

    ``stack`` holds the worker's Python stack (every thread) as faulthandler
    dumped it just before the kill, or "" if it could not.
    """

    def __init__(self, message: str, stack: str = "", pid: int | None = None) -> None:
        super().__init__(message + (f"\nThe worker's stack when it was stopped:\n{stack}" if stack else ""))
        self.stack = stack
        self.pid = pid


class BrokenPoolError(Error, BrokenProcessPool):
    """No worker can be made (the template can't fork, ``init`` or the
    initializer fails): the pool takes no more calls.  A BrokenProcessPool
    too, so code written for ProcessPoolExecutor catches it."""


def retire() -> None:
    """In a worker: finish the current call, then exit; the pool replaces it
    if it needs to.  Calls the worker had been given but not started go to
    other workers: they never ran.  (For handlers that run a call at a time.)"""
    from ._rpc_worker import retire as retire_worker

    retire_worker()


class _Task(LazyFuture):
    """A pool call's future, without a ``Condition`` until somebody waits on
    it (see ``_futures``).  Once the call is out, its ``result()`` drives
    the worker's socket itself (as an rpc future does), so that
    ``submit(...).result()`` needs no other thread to read the reply."""

    _rpc: Future[Any] | None = None

    def result(self, timeout: float | None = None) -> Any:
        if self._state != FINISHED:
            end = None if timeout is None else time.monotonic() + timeout
            self._drive(timeout)
            timeout = wait_left(end)  # (one timeout for both waits)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            end = None if timeout is None else time.monotonic() + timeout
            self._drive(timeout)
            timeout = wait_left(end)
        return super().exception(timeout)

    def _drive(self, timeout: float | None) -> None:
        inner = self._rpc
        if inner is not None and not self.done() and not inner.done():
            drive = getattr(inner, "_drive", None)
            if drive is not None:
                drive(timeout)  # completes inner, and so (its callback) this one


class _Call:
    __slots__ = ("args", "deadline", "future", "kwargs", "timed_out", "worker")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], future: _Task) -> None:
        self.args = args
        self.kwargs = kwargs
        self.future = future
        self.worker: _Worker | None = None
        self.deadline: float | None = None
        self.timed_out: str | None = None  # the stack, once the pool stopped it


class _Worker:
    """The driver's side of one worker: its process, its rpc client, its calls."""

    __slots__ = ("busy_time", "calls", "client", "closed", "dump", "last_done", "proc", "rec", "tpl")

    def __init__(self) -> None:
        self.proc: Process | None = None
        self.tpl = -1  # which of the pool's templates it was forked from
        self.client: _rpc.Client | None = None
        self.rec: _pool_core.Worker | None = None
        self.calls: set[_Call] = set()
        self.dump = -1  # read end of the pipe its stack is dumped to
        self.closed = False
        self.last_done = 0.0  # when its last call was answered
        self.busy_time = 0.0  # a moving average of the time it takes per call, when busy

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _check(name: str, value: object, minimum: float, *, whole: bool = False, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            whole and not isinstance(value, int)):
        raise TypeError(f"{name} must be {'a whole number' if whole else 'a number'}, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


_TOKEN = object()


class Pool:
    """Workers forked from one template, each running the same handler.

    Made by :func:`run`.  Call it like the handler (``pool(*args)``, or
    ``pool.call``), or ``submit`` for a future, or ``await call_async``.
    """

    def __init__(self, token: object, templates: list[Process | None], func: str | Callable[..., Any], *,
                 max: int | None, idle: int, load: int, start: float, stop: float,
                 serializer: Any, init: str | Callable[..., Any] | None,
                 on_event: Callable[..., Any] | None, max_tasks: int | None, timeout: float | None,
                 boot: str, pipeline: int | None = None) -> None:
        if token is not _TOKEN:
            raise TypeError("Pool objects come from anyfork.pool.run()")
        self._func = func
        self._serializer = serializer
        self._init = init
        self._on_event = on_event
        self._boot = boot
        self._timeout = timeout
        self._pipeline = pipeline
        # max is per template: the scheduler counts them all, _fork places each.
        self._max = max or _cpus()
        self._sched: _pool_core.Scheduler[_Call] = _pool_core.Scheduler(
            max=self._max * len(templates), idle=idle, load=load, start=start, stop=stop,
            max_tasks=max_tasks)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._workers: list[_Worker] = []
        self._closed = False
        self._broken: BaseException | None = None
        self._templates = templates
        self._dead: set[int] = set()  # templates that could not fork: out of the rotation
        self._forking_ahead: set[int] = set()
        self._manager: threading.Thread | None = None
        self._closing: list[_Worker] = []  # let go, their exit not yet collected
        self._finishing = 0  # calls out of their worker, their future not yet done (see _finished)
        self._forked = False  # this is a forked child's copy: dead (see the module's doc)
        from . import rpc
        from ._errors import WorkerDiedError

        # What rpc raises for a call it could not write: it goes elsewhere (see _send).
        self._not_written: tuple[type[BaseException], ...] = (WorkerDiedError, rpc.RetiredError)
        self._on_reply = self._rpc_done  # (bound once: see _send)
        _pools.add(self)

    def __repr__(self) -> str:
        state = "broken" if self._broken else "closed" if self._closed else "running"
        return f"<anyfork.pool.Pool {state} workers={self.workers}>"

    # --- calls ---------------------------------------------------------------------

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue a call of the handler; its future.

        Raises:
            anyfork.ProcessStateError: the pool was closed.
            BrokenPoolError: no worker can be made; says why.
        """
        if self._forked:
            raise _forked_error()
        fut = _Task()
        call = _Call(args, kwargs, fut)
        with self._lock:
            if self._closed:
                raise ProcessStateError("the pool was closed: it takes no more calls")
            if self._broken is not None:
                raise BrokenPoolError(f"the pool is broken: {self._broken}") from self._broken
            now = time.monotonic()
            if self._pipeline is not None:
                self._unpipeline_stuck(now)
            rec = self._sched.submit(call, now)
            if rec is None:
                if self._sched.to_start:
                    self._ensure_manager()
                    self._wake.notify()
                return fut
            worker: _Worker = rec.key  # type: ignore[assignment]
            self._bind(call, worker)
            self._kick()
        self._send([(worker, call)])
        return fut

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler in a worker; its result (or its exception, raised here)."""
        return self.submit(*args, **kwargs).result()

    __call__ = call

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """``call`` for asyncio: the loop runs on while the call is out."""
        import asyncio

        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    # --- inside: placing and finishing calls ---------------------------------------

    def _bind(self, call: _Call, worker: _Worker) -> None:
        """(under _lock) ``call`` goes to ``worker``."""
        call.worker = worker
        if self._pipeline is not None and worker.rec is not None and worker.rec.load == 1:
            worker.last_done = time.monotonic()  # idle until now: its clock starts here
        worker.calls.add(call)
        if self._timeout is not None:
            call.deadline = time.monotonic() + self._timeout
            self._ensure_manager()
            self._wake.notify()

    def _send(self, pairs: list[tuple[_Worker, _Call]]) -> None:
        """Write each call to its worker (never under _lock)."""
        if not pairs:
            return
        not_written = self._not_written
        for worker, call in pairs:
            fut = call.future
            # (running: placed again after its first worker went without
            # running it.)  Running before it is written, so that a cancel
            # can't come between the write and the worker's reply.
            if not fut.running() and not fut.set_running_or_notify_cancel():
                self._finished(call, None, cancelled=True)  # (which told as_completed and wait)
                continue
            client = worker.client
            assert client is not None
            try:
                rpc_fut = client._submit(call.args, call.kwargs, self._on_reply, call)
            except not_written:
                # It died or retired before this call was written: the call
                # never ran, so it goes to another worker.
                self._replace(worker, call)
                continue
            except BaseException as e:
                if client.broken is not None and client.broken is e:
                    self._failed_to_start(worker, e, call)  # its init failed: never ran
                else:
                    self._finished(call, e)  # an argument that won't serialize, say
                continue
            fut._rpc = rpc_fut

    def _replace(self, worker: _Worker, call: _Call) -> None:
        """``call`` never ran on ``worker``, which is gone: place it again, first in line."""
        now = time.monotonic()
        with self._lock:
            worker.calls.discard(call)
            call.worker = None
            call.deadline = None
            pairs = self._gone(worker, now)
            rec = self._sched.submit(call, now)
            if rec is not None:
                self._bind(call, rec.key)  # type: ignore[arg-type]
                pairs.append((rec.key, call))  # type: ignore[arg-type]
            else:
                self._sched.queue.rotate(1)  # from the back of the queue to its front
            self._ensure_manager()
            self._wake.notify()
        self._close_worker(worker)
        self._send(pairs)

    def _rpc_done(self, rpc_fut: Future[Any]) -> None:
        call: _Call = rpc_fut._anyfork_tag  # type: ignore[attr-defined]  # (see _send)
        exc = rpc_fut._exception  # (settled: what exception() returns)
        if exc is None:
            self._finished(call, None, result=rpc_fut._result)
            return
        WorkerDiedError, RetiredError = self._not_written  # noqa: N806 - the classes

        worker = call.worker
        if isinstance(exc, RetiredError) and worker is not None:
            self._replace(worker, call)  # never ran: it goes to another worker
            return
        if isinstance(exc, WorkerDiedError) and worker is not None and call.timed_out is None \
                and not self._was_running(worker, rpc_fut, exc):
            self._replace(worker, call)  # queued behind the call it died in: never ran
            return
        if worker is not None and worker.client is not None and worker.client.broken is exc \
                and not isinstance(exc, WorkerDiedError) and call.timed_out is None:
            # Not this call's failure: the worker could not start (its init raised).
            self._failed_to_start(worker, exc, call)
            return
        if call.timed_out is not None:
            exc = TaskTimeoutError(f"the call ran longer than the pool's timeout of {self._timeout} s",
                                   call.timed_out, worker.pid if worker else None)
        if worker is not None and isinstance(exc, (WorkerDiedError, TaskTimeoutError)):
            with self._lock:
                pairs = self._gone(worker, time.monotonic())
                self._finishing += 1  # (the manager waits for its future: see _finished)
                self._ensure_manager()
                self._wake.notify()
            try:
                self._close_worker(worker)
                self._send(pairs)
            finally:  # counted above: it must be finished, whatever happens
                self._finished(call, exc, counted=True)
            return
        self._finished(call, exc)

    @staticmethod
    def _was_running(worker: _Worker, rpc_fut: Future[Any], exc: BaseException) -> bool:
        """``worker`` died: may the call of ``rpc_fut`` have started?  A
        worker that runs a call at a time runs them in the order they were
        written, and writes each reply before it starts the next call (see
        ``_pool_worker``), so of the calls it held, all but the one written
        first (rpc names it on the error) never started.  A worker that runs
        several at once: any may have."""
        client = worker.client
        if client is None or not client._core.sequential:
            return True
        oldest = getattr(exc, "_anyfork_oldest", None)
        return oldest is None or getattr(rpc_fut, "_anyfork_id", None) == oldest

    def _finished(self, call: _Call, exc: BaseException | None, result: Any = None,
                  cancelled: bool = False, counted: bool = False) -> None:
        """``call`` is over: out of its worker, and its future done.  Once
        the pool is closed, a call being finished is counted in
        ``_finishing`` from the moment it leaves its worker until its
        future is done, so that the manager (and ``join``) does not end in
        between (``counted``: the caller counted it already)."""
        now = time.monotonic()
        close: _Worker | None = None
        pairs: list[tuple[_Worker, _Call]] = []
        with self._lock:
            worker = call.worker
            if worker is not None and call in worker.calls:
                worker.calls.discard(call)
                rec = worker.rec
                if rec is not None and rec.state != _pool_core.GONE:
                    if self._pipeline is not None:
                        if exc is None and not cancelled:
                            self._measure(worker, rec, now)
                        self._unpipeline_stuck(now)
                    pairs = self._placed(self._sched.finished(rec, now))
                    if rec.state == _pool_core.RETIRING and not rec.load:
                        close = worker
            if self._closed and not counted:
                self._finishing += 1
                counted = True
        try:
            if not cancelled and not call.future.done():
                if exc is None:
                    call.future.set_result(result)
                else:
                    call.future.set_exception(exc)
        finally:
            if counted:
                with self._lock:
                    self._finishing -= 1
                    self._wake.notify()
        if close is not None:
            self._close_worker(close)
        self._send(pairs)

    def _measure(self, worker: _Worker, rec: _pool_core.Worker, now: float) -> None:
        """(under _lock; pipelining) How long ``worker`` takes per call,
        and so how many it may hold: enough for ``_PIPELINE_BUDGET`` seconds
        of work, between ``load`` and ``pipeline``.  Tiny calls then travel
        many to a write and a read, and a slow call keeps at most ``load``
        waiting behind it, as without pipelining."""
        if rec.load >= 2 and worker.last_done:  # the next call was waiting: the gap is its time
            gap = now - worker.last_done
            worker.busy_time = gap if not worker.busy_time else 0.8 * worker.busy_time + 0.2 * gap
            assert self._pipeline is not None
            want = self._sched.load if worker.busy_time >= _PIPELINE_BUDGET else int(
                _PIPELINE_BUDGET / max(worker.busy_time, 1e-7))
            limit = max(self._sched.load, min(self._pipeline, want))
            if limit != rec.limit:
                rec.limit = limit  # (what it lets through is drained by ``finished``, next)
        worker.last_done = now

    def _unpipeline_stuck(self, now: float) -> None:
        """(under _lock; pipelining) A worker that has not answered for
        ``_PIPELINE_BUDGET`` seconds is on a slow call: it takes no more than
        ``load`` again until its replies come quickly, so that calls placed
        from now on don't queue behind that one."""
        load = self._sched.load
        for w in self._workers:
            rec = w.rec
            if rec is not None and rec.limit > load and rec.load and now - w.last_done > _PIPELINE_BUDGET:
                rec.limit = load
                w.busy_time = now - w.last_done

    def _gone(self, worker: _Worker, now: float) -> list[tuple[_Worker, _Call]]:
        """(under _lock) ``worker`` takes no more calls: out of the schedule; what to send now."""
        if worker in self._workers:
            self._workers.remove(worker)
        if worker.rec is None or worker.rec.state == _pool_core.GONE:
            return []
        pairs = self._placed(self._sched.gone(worker.rec, now))
        self._kick()
        return pairs

    def _placed(self, pairs: list[tuple[_pool_core.Worker, _Call]]) -> list[tuple[_Worker, _Call]]:
        """(under _lock) What the scheduler placed, bound to the driver's workers."""
        out = []
        for rec, call in pairs:
            worker: _Worker = rec.key  # type: ignore[assignment]
            self._bind(call, worker)
            out.append((worker, call))
        self._kick()
        return out

    def _kick(self) -> None:
        """(under _lock) Wake the manager if the scheduler wants workers
        started.  After every scheduler step that may ask for one: placing a
        call can (its worker reached max_tasks: its replacement starts now),
        and so can a worker going (calls wait and nobody else takes them)."""
        if self._sched.to_start:
            self._ensure_manager()
            self._wake.notify()

    # --- the manager thread ----------------------------------------------------------

    def _ensure_manager(self) -> None:
        """(under _lock) Start the manager thread on first need."""
        if self._manager is None:
            self._manager = threading.Thread(target=self._manage, name="anyfork pool manager", daemon=True)
            self._manager.start()

    def _manage(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                retire = self._sched.due(now)
                starts = self._sched.take_starts()
                stuck = [c for w in self._workers for c in w.calls
                         if c.deadline is not None and c.deadline <= now and c.timed_out is None]
                for c in stuck:
                    c.timed_out = ""
                    if c.worker is not None and c.worker.rec is not None:
                        self._sched.retire(c.worker.rec)
                held = self._finishing or any(w.calls for w in self._workers)
                if self._closed and not starts and not self._sched.queue and not held:
                    break
                if self._broken is not None and not held:
                    break
                if not starts and not retire and not stuck:
                    deadlines = [d for d in (self._sched.next_deadline(),) if d is not None]
                    deadlines += [c.deadline for w in self._workers for c in w.calls
                                  if c.deadline is not None and c.timed_out is None]
                    wait = None if not deadlines else max(0.0, min(deadlines) - now)
                    if self._closed:
                        wait = 0.05 if wait is None else min(wait, 0.05)
                    self._wake.wait(wait)
                    continue
            try:
                for _ in range(starts):
                    self._start_worker()
                for rec in retire:
                    self._close_worker(rec.key)  # type: ignore[arg-type]
                for call in stuck:
                    self._stop_stuck(call)
            except Exception:
                # A bug of ours: say so, and keep managing, or every call
                # waiting for a worker would wait for ever.
                import sys

                sys.excepthook(*sys.exc_info())
        self._shutdown_workers()

    def _start_worker(self) -> None:
        from . import _mainmod, rpc
        from ._process import host_of

        worker = _Worker()
        now = time.monotonic()
        with self._lock:
            worker.rec = self._sched.added(worker, now)
            self._workers.append(worker)
        try:
            proc = self._fork(worker)
            worker.proc = proc
            main = _mainmod.describe()
            proc.send_arg("" if self._init is None else rpc._name(self._init, "init"),
                          "" if main is None else ":".join(main))
            if host_of(proc) is not None:
                proc.send_arg("")  # no pipe to another host: it dumps its stack on its stderr
            else:
                r, w = os.pipe()  # its stack dump comes back on this
                os.set_blocking(r, False)
                worker.dump = r
                try:
                    proc.send_fh(w)
                finally:
                    os.close(w)
            worker.client = rpc._run(proc, self._func, self._serializer, _WORKER_INIT, self._on_event,
                                     max(self._sched.load, self._pipeline or 0), boot="",
                                     hold_batch=rpc._NO_BATCH)
        except BaseException as e:
            self._failed_to_start(worker, e)
            return
        with self._lock:
            pairs: list[tuple[_Worker, _Call]] = []
            if self._broken is None and worker.rec.state != _pool_core.GONE:
                pairs = self._placed(self._sched.ready(worker.rec, time.monotonic()))
        self._send(pairs)

    def _fork(self, worker: _Worker) -> Process:
        """A new worker's process, from the template (of several, on several
        hosts maybe) with the fewest workers and room for one more.  One
        that can't fork (its host is gone) is left out from then on, and
        the others take its share."""
        while True:
            with self._lock:
                counts = [0] * len(self._templates)
                for w in self._workers:
                    if w.tpl >= 0:
                        counts[w.tpl] += 1
                room = [i for i, n in enumerate(counts) if n < self._max and i not in self._dead]
                if not room:
                    raise Error("no template of the pool can fork: "
                                + ("every one failed" if self._dead else "each has max workers"))
                i = worker.tpl = min(room, key=counts.__getitem__)
                tpl = self._templates[i]
            if tpl is None:
                import anyfork

                tpl = self._templates[i] = anyfork.new()
            try:
                if i not in self._forking_ahead:
                    # The rpc and pool worker modules are imported once, in the
                    # template, not again in every worker after its fork (whose
                    # rpc start-up then has no boot to run: see _start_worker).
                    tpl.eval(self._boot)
                    fork_ahead = getattr(tpl, "fork_ahead", None)
                    if fork_ahead is not None:
                        fork_ahead(1)  # the next worker is forked before it is asked for
                    self._forking_ahead.add(i)
                return tpl.fork()
            except Error:
                if len(self._templates) == 1:
                    raise  # the pool's only one: as it was, tried again on the next start
                with self._lock:
                    self._dead.add(i)
                    left = len(self._templates) - len(self._dead)
                    self._sched.max = self._max * left or 1
                if not left:
                    raise

    def _failed_to_start(self, worker: _Worker, e: BaseException, call: _Call | None = None) -> None:
        """``worker`` can't serve (its fork, its rpc handshake or its init
        failed).  If no worker serves at all, the pool is broken: every call
        waiting fails, saying why.  ``call``: one that went to it, and never ran."""
        queued: list[_Call] = []
        with self._lock:
            stranded = list(worker.calls)
            worker.calls.clear()
            for c in stranded:
                c.worker = None
                c.deadline = None
            self._gone(worker, time.monotonic())
            for c in reversed(stranded):
                self._sched.queue.appendleft(c)
            if call is not None and call not in stranded:
                call.worker = None
                self._sched.queue.appendleft(call)
            serving = any(w.client is not None and w.client.broken is None for w in self._workers)
            if serving:
                self._ensure_manager()
                self._wake.notify()
            else:
                self._broken = e
                queued = list(self._sched.queue)
                self._sched.queue.clear()
                self._wake.notify()
        self._close_worker(worker)
        if serving:
            return
        error = BrokenPoolError(f"the pool can't start a worker: {e}")
        error.__cause__ = e
        for c in queued:
            fut = c.future
            # (running: a call that went to a worker that could not serve it, and never ran.)
            if not fut.done() and (fut.running() or fut.set_running_or_notify_cancel()):
                fut.set_exception(error)

    def _close_worker(self, worker: _Worker) -> None:
        """Let a worker go: it finishes what it holds (nothing, here) and exits."""
        with self._lock:
            if worker.closed:
                return
            worker.closed = True
            self._gone(worker, time.monotonic())
        client = worker.client
        if client is not None:
            try:
                client.close()
            except Error:
                pass  # dead already
            if client.broken is not None and not isinstance(client.broken, ProcessStateError):
                client._core.dispose()  # dead (or broken): nothing more will come on its socket
            else:
                with self._lock:
                    self._closing.append(worker)  # its exit is collected at shutdown
        elif worker.proc is not None:
            worker.proc.close()
        if worker.dump >= 0:
            os.close(worker.dump)
            worker.dump = -1

    def _stop_stuck(self, call: _Call) -> None:
        """Dump a stuck call's worker's stack, then kill its process group."""
        worker = call.worker
        if worker is None or worker.proc is None:
            return
        proc = worker.proc
        stack = ""
        try:
            proc.kill(DUMP_SIGNAL)
            if worker.dump >= 0:
                stack = _read_dump(worker.dump, _DUMP_WAIT)
        except Error:
            pass
        call.timed_out = stack
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(_GRACE)
        except Error:
            _kill_group(proc, signal.SIGKILL)

    def _shutdown_workers(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            self._close_worker(worker)
        with self._lock:
            workers, self._closing = self._closing, []
        for worker in workers:
            if worker.client is not None:
                try:
                    worker.client.wait(5)
                except Error:
                    if worker.proc is not None:
                        _kill_group(worker.proc, signal.SIGKILL)
        for tpl in self._templates:
            if tpl is not None:
                tpl.close()
                try:
                    # A closed template stays alive for the workers it forked that
                    # are still on their way out; collect them, briefly.
                    tpl.wait(1.0)
                except Error:
                    pass  # still running: it goes when they do, or when dropped

    def _signal_workers(self, sig: int) -> None:
        """Signal every live worker (through its template: never a recycled pid)."""
        if self._forked:
            return
        with self._lock:
            procs = [w.proc for w in self._workers if w.proc is not None]
        for proc in procs:
            try:
                proc.kill(sig)
            except Error:
                pass

    # --- lifetime --------------------------------------------------------------------

    @property
    def workers(self) -> list[int]:
        """The pids of the live workers."""
        with self._lock:
            return [w.proc.pid for w in self._workers
                    if w.proc is not None and w.client is not None and w.client.broken is None]

    def close(self) -> None:
        """Take no more calls; the workers finish what is queued, then exit."""
        if self._forked:
            return  # the workers are the parent's
        with self._lock:
            self._closed = True
            self._ensure_manager()
            self._wake.notify()
        self._drop_cancelled()

    def _held(self) -> list[_Task]:
        """The futures of the calls not yet done: queued, or out to a
        worker (shutdown(cancel_futures=True) cancels those not running)."""
        with self._lock:
            held = [c.future for c in self._sched.queue]
            held += [c.future for w in self._workers for c in w.calls]
        return held

    def _drop_cancelled(self) -> None:
        """Take the queued calls whose futures were cancelled out of the
        queue, and say so to whoever waits on them (as_completed, wait)."""
        with self._lock:
            dropped = [c for c in self._sched.queue if c.future.cancelled()]
            for c in dropped:
                self._sched.cancel(c)
        for c in dropped:
            c.future.set_running_or_notify_cancel()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every call is done and every worker gone (after ``close``).

        Raises:
            anyfork.TimeoutExpired: still at work after ``timeout`` seconds.
        """
        manager = self._manager
        if manager is None or self._forked:
            return
        manager.join(timeout)
        if manager.is_alive():
            raise TimeoutExpired(f"the pool is still at work after {timeout} s")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.join()


_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _forked_error() -> ProcessStateError:
    return ProcessStateError("this pool belongs to the process this one was forked from: "
                             "its workers are that process's; make a new pool here")


def _after_fork_in_child() -> None:
    """Every pool inherited from the parent is dead here (see the module's doc).

    Only this thread exists now, and any other may have held a lock at the
    fork: the pool's, or a future's condition.  So nothing here takes one;
    the locks are replaced, and each unfinished future is finished by hand
    with the error (nobody in this process waits on it yet).  Its callbacks
    don't run: they belong to the dead pool and its Executor."""
    for pool in list(_pools):
        pool._forked = True
        pool._lock = threading.Lock()
        pool._wake = threading.Condition(pool._lock)
        calls = list(pool._sched.queue)
        for worker in pool._workers:
            calls.extend(worker.calls)
        for call in calls:
            fut = call.future
            if fut._state in ("PENDING", "RUNNING"):
                if fut._anyfork_cond is not None:  # (a thread of the parent may have held it)
                    fut._anyfork_cond = threading.Condition()
                fut._exception = _forked_error()
                fut._state = "FINISHED"
                fut._rpc = None


_fds.on_fork(_after_fork_in_child)


def _read_dump(fd: int, timeout: float) -> str:
    import select

    chunks = []
    deadline = time.monotonic() + timeout
    p = select.poll()  # (not select(): a descriptor may be 1024 or more)
    p.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not p.poll(left * 1000):
            break
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            break
        chunks.append(data)
        # faulthandler writes the whole dump at once; stop once it paused.
        deadline = min(deadline, time.monotonic() + 0.05)
    return b"".join(chunks).decode("utf-8", "replace")


def _kill_group(proc: Process, sig: int) -> None:
    """Signal the worker's process group (it made one of its own), so its
    children go too.  Only while the worker is known to be alive: its group
    id is its pid, and a group id can't be reused while the group has a
    member (the worker itself, not yet reaped by its template, holds it)."""
    from ._process import host_of

    try:
        if proc.returncode is not None:
            return
        if host_of(proc) is not None:
            proc.kill(sig)  # its pid is another host's: its hub signals it (not its group)
            return
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, Error):
        pass


def run(template: Process | Sequence[Process] | None, func: str | Callable[..., Any], *,
        max: int | None = None, idle: int = 0,
        load: int = 2, start: float = 0.1, stop: float = 10.0, serializer: Any = "pickle",
        init: str | Callable[..., Any] | None = None, on_event: Callable[..., Any] | None = None,
        max_tasks: int | None = None, timeout: float | None = None) -> Pool:
    """A pool of workers forked from ``template``, each running ``func`` over rpc.

    Args:
        template: an unrun Process prepared with ``require``, ``eval``,
            ``send_fh`` and ``send_arg`` (its workers share what it loaded and
            every descriptor it was sent), or None for a fresh ``anyfork.new()``;
            or a list of them (local and remote mixed: ``anyfork.remote``),
            each forking up to ``max`` workers, new ones going to the one with
            the fewest.  The pool owns them: they are closed when it is done.
        func: the handler, named as for :func:`anyfork.rpc.run`.
        max: most workers at once, per template (default: the CPUs this
            process may use).
        idle: fewest workers kept, even with nothing to do.
        load: most calls given to one worker at a time.
        start: seconds calls wait in the queue before another worker starts.
        stop: seconds a worker may be idle before it is retired.
        serializer, init, on_event: as for :func:`anyfork.rpc.run`.
        max_tasks: calls a worker takes before it is replaced by a new fork.
        timeout: seconds a call may run; then its worker's process group is
            killed (after a stack dump) and the call fails with TaskTimeoutError.

    Raises:
        TypeError, ValueError: a bad argument, before anything starts.
    """
    return _run(template, func, max=max, idle=idle, load=load, start=start, stop=stop, serializer=serializer,
                init=init, on_event=on_event, max_tasks=max_tasks, timeout=timeout)


def _run(template: Process | Sequence[Process] | None, func: str | Callable[..., Any], *,
         max: int | None = None, idle: int = 0, load: int = 2, start: float = 0.1, stop: float = 10.0,
         serializer: Any = "pickle",
         init: str | Callable[..., Any] | None = None, on_event: Callable[..., Any] | None = None,
         max_tasks: int | None = None, timeout: float | None = None, pipeline: int | None = None) -> Pool:
    """``run``, and for the Executor ``pipeline``: let a worker that answers
    quickly hold up to that many calls (see ``Pool._measure``)."""
    _check("max", max, 1, whole=True, none=True)
    _check("idle", idle, 0, whole=True)
    _check("load", load, 1, whole=True)
    _check("start", start, 0)
    _check("stop", stop, 0)
    _check("max_tasks", max_tasks, 1, whole=True, none=True)
    _check("timeout", timeout, 0, none=True)
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    from ._process import Process

    if template is None or isinstance(template, Process):
        templates: list[Process | None] = [template]
    elif isinstance(template, (list, tuple)):
        templates = list(template)
    else:
        raise TypeError(f"template must be an anyfork Process, a list of them, or None, "
                        f"not {type(template).__name__}")
    if not templates:
        raise ValueError("template is an empty list: give at least one template")
    for t in templates:
        if (t is not None or len(templates) > 1) and not isinstance(t, Process):
            raise TypeError(f"template must be an anyfork Process, a list of them, or None, "
                            f"not {type(t).__name__}")
    if len({id(t) for t in templates}) != len(templates):
        raise ValueError("a template appears twice in the list")
    from . import _rpc_wire, rpc

    rpc._name(func, "pool.run()")
    if init is not None:
        rpc._name(init, "init")
    _rpc_wire.serializer(serializer)  # a bad one fails here, before anything starts
    if on_event is not None and not callable(on_event):
        raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
    pool = Pool(_TOKEN, templates, func, max=max, idle=idle, load=load, start=start, stop=stop,
                serializer=serializer, init=init, on_event=on_event, max_tasks=max_tasks, timeout=timeout,
                boot=rpc._boot(*_BOOT_MODULES), pipeline=pipeline)
    if idle:
        with pool._lock:
            pool._sched.due(time.monotonic())
            pool._ensure_manager()
            pool._wake.notify()
    return pool

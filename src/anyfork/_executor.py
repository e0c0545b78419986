"""``anyfork.Executor``: a ``concurrent.futures.Executor`` on an anyfork pool.

A drop-in for ``ProcessPoolExecutor``: the same constructor, ``submit``,
``map`` (with ``timeout`` and ``chunksize``), ``shutdown(wait,
cancel_futures)``, ``initializer``/``initargs``, ``max_tasks_per_child``,
3.14's ``terminate_workers()``/``kill_workers()``, and the context manager.
In a child forked from the caller (``os.fork``, multiprocessing) an
executor inherited from the parent is dead: ``submit`` raises
ProcessStateError, its unfinished futures fail with it, and ``shutdown``
leaves the parent's workers alone.  What is different is underneath: workers are forks of a template (the
default one, or ``template=``), so they start in milliseconds and recycle
cheaply; a worker that dies fails only the tasks it held, and the executor
goes on; ``task_timeout`` stops a stuck task; ``on_event`` gets what tasks
send with ``anyfork.rpc.event``.

Tasks are sent by reference with pickle, as ProcessPoolExecutor sends them:
the function and its arguments are the call's arguments, and the worker's
handler (``_pool_worker.call``) calls it.  Functions of the user's main
script resolve in workers through ``_mainmod``; lambdas and closures work
when cloudpickle is installed (then the function is sent by value).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from ._process import Process
    from .pool import Pool

_HANDLER = "anyfork._pool_worker:call"


def _cloudpickle() -> Any:
    try:
        import cloudpickle  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    return cloudpickle


class _ByValue:
    """A function pickled by value (cloudpickle): a lambda or a closure."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[object, ...]:
        return _load_by_value, (self.data,)


def _load_by_value(data: bytes) -> Any:
    import pickle

    return pickle.loads(data)  # cloudpickle's output unpickles with pickle, given cloudpickle


def _prepare_fn(fn: Callable[..., Any]) -> Any:
    """What is sent for ``fn``: itself (by reference) when it has a name a
    worker can import, else its cloudpickle when cloudpickle is installed."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname or not getattr(fn, "__module__", None):
        cp = _cloudpickle()
        if cp is not None:
            return _ByValue(cp.dumps(fn))
    return fn


def _batch(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


class Executor(concurrent.futures.Executor):
    """Runs calls in worker processes forked from a template.

    Args:
        max_workers: most workers at once, per template (default: the CPUs
            this process may use).
        mp_context: accepted so that code written for ProcessPoolExecutor
            runs; not used: workers always come from a template.
        initializer, initargs: called in each worker before its first task.
            If it raises, the executor is broken: pending and later tasks
            fail with ``anyfork.pool.BrokenPoolError`` (a BrokenProcessPool).
        max_tasks_per_child: tasks a worker runs before a new fork replaces it.
        template: an unrun Process to fork the workers from (its modules,
            its data and its descriptors are shared by every worker); by
            default a fresh ``anyfork.new()``.  Or a list of them, local and
            remote mixed (``anyfork.remote``): ``max_workers`` is then per
            template, and new workers go to the one with the fewest.
        task_timeout: seconds a task may run; then its worker (and its
            process group) is killed and the task fails with
            ``anyfork.pool.TaskTimeoutError``, holding the worker's stack.
        on_event: called as ``on_event(*args)`` for each
            ``anyfork.rpc.event(*args)`` a task sends.

    Raises:
        ValueError: ``max_workers`` or ``max_tasks_per_child`` is not >= 1.
    """

    def __init__(self, max_workers: int | None = None, mp_context: object = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (), *,
                 max_tasks_per_child: int | None = None,
                 template: Process | Sequence[Process] | None = None,
                 task_timeout: float | None = None, on_event: Callable[..., Any] | None = None) -> None:
        from . import pool

        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an int")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._mp_context = mp_context  # documented as unused
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        init_name = None
        if initializer is not None:
            # The initializer runs as the worker's rpc init, with its
            # arguments pickled into one str item (send_arg carries str).
            import base64
            import pickle

            payload = base64.b64encode(pickle.dumps((_prepare_fn(initializer), tuple(initargs)))).decode()
            if template is None:
                import anyfork

                template = anyfork.new()
            from ._process import Process

            for t in [template] if isinstance(template, Process) else list(template):
                if isinstance(t, Process):  # (pool.run refuses what is not)
                    t.send_arg(payload)
            init_name = "anyfork._pool_worker:initialize_pickled"
        # Tiny tasks are pipelined: a worker that answers quickly may hold up
        # to 16 (about a millisecond of its work), so that they travel many to
        # a write; a slow task keeps at most one more waiting behind it.  Not
        # with task_timeout, whose clock starts when a task is sent.
        self._pool: Pool = pool._run(
            template, _HANDLER, max=max_workers, load=2, start=0.0, stop=60.0, init=init_name,
            on_event=on_event, max_tasks=max_tasks_per_child, timeout=task_timeout,
            pipeline=None if task_timeout is not None else 16)

    # --- concurrent.futures.Executor ------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._submit(_prepare_fn(fn), args, kwargs)

    def _submit(self, fn: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """``submit`` of what ``_prepare_fn`` made."""
        if self._pool._forked:
            # A forked child's copy (see pool's doc); checked before the lock,
            # which another thread of the parent may have held at the fork.
            from .pool import _forked_error

            raise _forked_error()
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            return self._pool.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """As ``ProcessPoolExecutor.map``, with 3.14's ``buffersize`` (at
        most that many calls submitted ahead of the results taken) on every
        Python.  The calls are submitted at once (or ``buffersize`` of them);
        the results come in order, and a result that raises (or a timeout)
        cancels the calls not yet started."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):  # (a bool is an int, as 3.14's map has it)
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end = None if timeout is None else timeout + time.monotonic()
        fn = _prepare_fn(fn)
        args: Iterator[tuple[Any, ...]] = zip(*iterables)  # noqa: B905 - as ProcessPoolExecutor.map: the shortest ends it
        if chunksize > 1:
            it = args
            chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
            args = zip(itertools.repeat(fn), chunks)
            fn = _batch  # (by reference: it needs no preparing)
        submit = self._submit
        if buffersize is None:
            fs = collections.deque(submit(fn, a, {}) for a in args)
        else:
            fs = collections.deque(submit(fn, a, {}) for a in itertools.islice(args, buffersize))
        results = self._results(fs, args if buffersize is not None else None, fn, end)
        return itertools.chain.from_iterable(results) if chunksize > 1 else results

    def _results(self, fs: collections.deque[concurrent.futures.Future[Any]],
                 more: Iterator[tuple[Any, ...]] | None, fn: Callable[..., Any],
                 end: float | None) -> Iterator[Any]:
        """``map``'s results in order; ``more``: what to submit as each is taken (buffersize)."""
        ref = weakref.ref(self)  # (a map left running does not keep the executor)
        del self
        try:
            while fs:
                if more is not None and (executor := ref()) is not None:
                    a = next(more, None)
                    if a is not None:
                        fs.append(executor._submit(fn, a, {}))
                    del executor
                fut = fs.popleft()
                try:
                    value = fut.result() if end is None else fut.result(end - time.monotonic())
                except BaseException:
                    fut.cancel()
                    raise
                del fut  # (its result is ours now: don't keep it)
                yield value
        finally:
            for fut in fs:
                fut.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._pool._forked:
            return  # its workers are the parent's: nothing to shut down here
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            for fut in self._pool._held():
                fut.cancel()
        self._pool.close()  # which tells the waiters of what was cancelled
        if wait:
            self._pool.join()

    # --- Python 3.14's additions ------------------------------------------------------

    def terminate_workers(self) -> None:
        """Stop every worker now with SIGTERM; what they held fails with
        WorkerDiedError.  The executor is shut down."""
        self._signal_workers(signal.SIGTERM)

    def kill_workers(self) -> None:
        """As ``terminate_workers``, with SIGKILL."""
        self._signal_workers(signal.SIGKILL)

    def _signal_workers(self, sig: int) -> None:
        if self._pool._forked:
            return
        with self._shutdown_lock:
            self._shutdown = True
        for fut in self._pool._held():
            fut.cancel()
        self._pool._signal_workers(sig)
        self._pool.close()

    def __del__(self) -> None:
        # Dropped without shutdown(): its workers see EOF and exit; nothing is left.
        try:
            if not self._shutdown:
                self.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


__all__ = ("Executor",)

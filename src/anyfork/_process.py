"""The caller's side: ``Process``, ``new``, ``new_exec`` and the default template.

A ``Process`` is three things over its life, and delegates each:

- while it is being prepared, a :class:`~anyfork._channel.CommandChannel`
  (its socket and the queue of commands) that ``run`` finally hands over;
- once it has been forked from, a template: a
  :class:`~anyfork._reports.Template` (its report channel, its sans-io
  state, its processes forked ahead);
- all along, a handle on a running process: a record (pid, exit status) and
  the *parent* that answers for it, the same interface for both kinds:
  ``_direct.Direct`` for a process the caller spawned (it is its own
  record), ``_reports.Template`` for one a template forked (the record is
  a ``_caller.Child``, which outlives this object).

Every operation that may wait (flush, run, wait for a pid or an exit) is a
``_backend`` operation, written once: the blocking methods run it with
``run_blocking``, the ``*_async`` ones (in ``_aio``) with ``run_async``.
No threading lock is held across a wait.

Ownership: see ``_fds``; the module state: see ``_runtime``.  Lock order:
a Process's (its channel's), then ``_fds.fork_lock``, which is also every
report channel's.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from . import _exec, _failures, _fds, _mainmod
from . import _protocol as P
from ._backend import Op, Wait, deadline_after, run_blocking
from ._channel import BrokenError, CommandChannel, hold_signals, release_signals
from ._direct import Direct
from ._errors import (
    Error,
    ProcessExitedError,
    ProcessFailedError,
    ProcessStateError,
    TemplateDiedError,
    TimeoutExpired,
)
from ._reports import ExitWatch, ForkedWatch, Template, Watch
from ._runtime import runtime

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from types import TracebackType
    from typing import Self

    from ._results import Host

_TOKEN = object()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_MAX_FD = 2**31 - 1

if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SCM_RIGHTS"):  # pragma: no cover
    _UNSUPPORTED: str | None = "this platform has no Unix sockets with descriptor passing"
elif not hasattr(os, "fork") or not hasattr(os, "posix_spawn"):  # pragma: no cover
    _UNSUPPORTED = "this platform lacks fork() or posix_spawn()"
else:
    _UNSUPPORTED = None


class Parent(Protocol):
    """What a Process asks about itself, whoever its parent is (the caller
    for a process it spawned, a template for one it forked).  ``child`` is
    the record the parent keeps for it."""

    def describe(self) -> str: ...

    def flush_op(self, deadline: float | None) -> Op[bool]: ...

    def pid_op(self, child: Any, deadline: float | None) -> Op[None]: ...

    def exit_op(self, child: Any, deadline: float | None) -> Op[bool]: ...

    def status(self, child: Any, what: str) -> int | None: ...

    def kill(self, child: Any, sig: int, what: str) -> None: ...

    def broken(self, child: Any, what: str, e: OSError) -> Error: ...


def _describe(child: Any, parent: Parent) -> str:
    if child.pid is not None:
        return f"process {child.pid}"
    # Its pid is not known yet: say where it comes from, not our own numbering.
    return f"a process forked from {parent.describe()}"


def _func_name(func: object) -> str:
    """What ``run`` sends: validated here so bad input fails at the call."""
    if isinstance(func, str):
        mod, colon, attrs = func.partition(":")
        if colon:
            ok = bool(_NAME.fullmatch(mod)) and bool(_NAME.fullmatch(attrs))
        else:
            ok = bool(_NAME.fullmatch(func))
        if not ok:
            raise ValueError(f"not a function name anyfork can look up: {func!r}")
        return func
    if not callable(func):
        raise TypeError(f"run() takes a function or its name, not {type(func).__name__}")
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module and qualname and "<" not in qualname:
        raise TypeError(
            f"{func!r} belongs to no module (it was made by exec() in a namespace without a "
            "__name__?), so no other process can find it: define it in a module and pass it or "
            "its 'module:name', or define it in the process with eval() and run its name")
    if not module or not qualname or "<" in qualname or not _NAME.fullmatch(qualname):
        raise TypeError(
            f"{func!r} has no importable name (a lambda, closure or local function?); "
            "pass a module-level function or its 'module:name'"
        )
    if module != "__main__" and module not in sys.modules:
        raise TypeError(
            f"{func!r} names its module {module!r}, which is not a module this process imported "
            "(code run with exec() under a made-up __name__?), so no other process can import it: "
            "define it in a real module, or define it in the process with eval() and run its name")
    return f"{module}:{qualname}"


def _check_items(args: tuple[object, ...]) -> list[bytes | str]:
    items: list[bytes | str] = []
    for a in args:
        if isinstance(a, (bytes, str)):
            items.append(a)
        elif isinstance(a, (bytearray, memoryview)):
            items.append(bytes(a))  # a snapshot: later changes don't leak in
        else:
            raise TypeError(f"arguments must be bytes or str, not {type(a).__name__}")
    return items


def _fileno(handle: object) -> int:
    if isinstance(handle, bool):
        raise TypeError("send_fh() takes descriptors, not bool")
    if isinstance(handle, int):
        fd = handle
    elif hasattr(handle, "fileno"):
        fd = handle.fileno()
        if not isinstance(fd, int):
            raise TypeError(f"{handle!r}.fileno() returned {fd!r}")
    else:
        raise TypeError(f"send_fh() takes sockets, files or descriptors, not {type(handle).__name__}")
    if fd < 0:
        raise ValueError(f"{handle!r} is closed (descriptor {fd})")
    if fd > _MAX_FD:
        raise ValueError(f"{handle!r}: {fd} is not a descriptor number")
    return fd


class Process:
    """A process anyfork created, being prepared or already running a function.

    Made only by :func:`anyfork.new`, :func:`anyfork.new_exec`,
    :func:`anyfork.fork_template` and :meth:`Process.fork`.  The preparing
    methods (``require``, ``eval``, ``send_arg``, ``send_fh``) queue commands
    and return the process, so calls chain; ``fork`` and ``run`` write what
    is queued.  After ``run`` the process is spent: only ``pid``,
    ``returncode``, ``wait`` and ``kill`` work.
    """

    __slots__ = ("__weakref__", "_child", "_cmd", "_failure", "_func", "_gen", "_host", "_keep", "_parent",
                 "_spent", "_tpl")

    def __init__(self, token: object, cmd: CommandChannel, parent: Parent, child: Any,
                 host: Host | None = None) -> None:
        if token is not _TOKEN:
            raise TypeError("Process objects come from anyfork.new(), new_exec() and Process.fork()")
        self._host = host  # the remote host it runs on (see anyfork.remote), None here
        # A forked process holds its template's Process: dropping the template
        # (anyfork.new_exec().fork()) must not close it before it has forked
        # the child and reported it.
        self._keep: Process | None = None
        self._gen = runtime.generation
        self._cmd = cmd
        self._parent = parent
        self._child = child
        self._spent: str | None = None  # "run" or "closed"
        self._func: str | None = None  # the name run() sent
        self._tpl: Template | None = None  # once it has been forked from
        self._failure: ProcessFailedError | None = None  # why it failed before its function, once known

    def __repr__(self) -> str:
        """Its pid, what it runs and how it is doing; never waits (the pid of a
        process whose template has not reported it yet shows as "?")."""
        pid = self._child.pid if self._child.pid is not None else "?"
        func = f" {self._func!r}" if self._func is not None else ""
        return f"<anyfork.Process pid={pid}{func} {self._status()}>"

    def _status(self) -> str:
        if self._gen != runtime.generation:
            return "of the process this one was forked from"
        rc = self.returncode
        if rc is not None:
            return f"exited with status {rc}" if rc >= 0 else f"killed by signal {-rc}"
        if self._spent == "run":
            return "running"
        state = "a template" if self._tpl is not None else "being prepared"
        return "closed" if self._spent == "closed" else state

    # --- helpers ------------------------------------------------------------

    def _describe(self) -> str:
        return _describe(self._child, self._parent)

    def _mine(self) -> None:
        """Raise unless this object belongs to this process, and reap on the way.

        After a fork of the caller (or once anyfork shut down at exit), the
        descriptors behind this object are closed and their numbers may be
        someone else's: nothing may be done with them.  Checked before any
        lock is taken: a lock another thread held at the fork stays locked.
        """
        if self._gen != runtime.generation:  # the message only when it is needed
            runtime.check(self._gen, self._describe())
        runtime.reap_directs()

    def _usable(self) -> None:
        """(Caller holds the channel's lock.)"""
        if self._spent is not None or self._cmd.sock is None:
            why = self._cmd.broken or f"already {self._spent or 'closed'}"
            raise ProcessStateError(f"{self._describe()} was {why}")

    def _write_error(self, e: BrokenError) -> Error:
        return run_blocking(self._write_error_op(e))

    def _write_error_op(self, e: BrokenError) -> Op[Error]:
        if e.error is None:
            return ProcessStateError(f"{self._describe()} was {e.why}")
        return (yield from self._failed_or_op(self._parent.broken(self._child, self._describe(), e.error)))

    # --- failures before the function (see _failures) ------------------------------

    def _failed(self, wait: bool = True) -> ProcessFailedError | None:
        """Why this process failed before its function ran, if it did and
        said so on the failure sink (only ever asked once it has exited with
        status 1, or its reports ended: nothing is read otherwise).  A
        remote one asks its hub when the record is not here yet (``wait``:
        ``_failed_op``, blocking; not ``wait``: what is here)."""
        host = self._host
        if self._failure is None and wait and host is not None and host.connection is not None:
            return run_blocking(self._failed_op(None))
        if self._failure is None and (host is None or host.connection is not None):
            key = self._failure_key()
            if key is None:
                return None
            if host is None:
                texts = _failures.take(*key)
            else:
                assert host.connection is not None
                texts = host.connection.failure(*key)
            if texts is not None:
                type_name, message, tb = texts
                self._failure = ProcessFailedError(
                    f"{self._describe()} failed before its function ran: {type_name}: {message}",
                    type_name, message, tb)
        return self._failure

    def _failure_key(self) -> tuple[int, int | None, int] | None:
        """(pid, parent pid or None for any, number in that parent) of this
        process's failure record; None while its pid is unknown."""
        child = self._child
        if child.pid is None:
            # A forked template that failed before anything asked for its
            # pid: its PID report went out at the fork, so it is here.
            try:
                self._parent.status(child, self._describe())
            except Error:
                pass
        pid = child.pid
        if pid is None:
            return None
        keep = self._keep
        if isinstance(self._parent, Direct):
            return pid, os.getpid(), 0
        if self._host is not None and keep is None:
            return pid, None, 0  # started by its host's hub (see _hub): as any top process, number 0
        return pid, keep._child.pid if keep is not None else None, child.seq

    def _failed_op(self, deadline: float | None) -> Op[ProcessFailedError | None]:
        """``_failed`` as an operation: a remote process's hub is asked
        without blocking the thread (an event loop's, under ``wait_async``),
        for up to 2 s, or until ``deadline``."""
        host = self._host
        conn = host.connection if host is not None else None
        if self._failure is None and conn is not None:
            key = self._failure_key()
            n = conn.sync_for(key) if key is not None else None
            if key is not None and n is not None:
                end = time.monotonic() + 2.0 if deadline is None else min(deadline, time.monotonic() + 2.0)
                while True:
                    epoch = conn.notifier.epoch
                    if conn.settled(key, n) or time.monotonic() >= end:
                        break
                    yield Wait(notifier=conn.notifier, epoch=epoch, deadline=end)
            return self._failed(wait=False)
        return self._failed()

    def _failed_or(self, e: Error) -> Error:
        """``e``, or this process's own failure (see ``failed``) when ``e``
        says it exited with status 1; when ``e`` says its template is gone,
        the template's failure, if that is why."""
        return run_blocking(self._failed_or_op(e))

    def _failed_or_op(self, e: Error) -> Op[Error]:
        """``_failed_or`` as an operation: what a remote hub is asked, the
        thread (an event loop's, under ``run_async``) waits for without
        blocking (see ``_failed_op``)."""
        if isinstance(e, ProcessExitedError) and e.returncode == 1:
            failure = yield from self._failed_op(None)
            if failure is not None:
                failure.__cause__ = e
                return failure
        elif isinstance(e, TemplateDiedError) and self._keep is not None:
            failure = yield from self._keep._failed_op(None)
            if failure is not None:
                return failure
        return e

    def _queue_state(self, parts: list[P.Buffer], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a command that changes the state a fork copies (caller holds the lock).

        Processes forked ahead have the old state: they are let go, and the
        next ``fork`` forks their replacements from the new one.
        """
        self._cmd.put(parts, fds)
        if self._tpl is not None:
            self._tpl.changed()

    def _template(self) -> Template:
        """This process as a template, made on its first fork (caller holds the lock)."""
        tpl = self._tpl
        if tpl is None:
            child, parent = self._child, self._parent
            watch: Watch | None = None  # how its waits see it gone (see _reports)
            if isinstance(child, Direct):
                watch = ExitWatch(child)
            elif isinstance(parent, Template):
                watch = ForkedWatch(parent, child)
            tpl = self._tpl = Template(self._cmd, lambda: _describe(child, parent), watch)
        return tpl

    def _descriptors(self) -> set[int]:
        """The descriptors this process's objects own now (for leak checks)."""
        fds = set()
        sock = self._cmd.sock
        if sock is not None:
            fds.add(sock.fileno())
        tpl = self._tpl
        if tpl is not None:
            if tpl.reports.fileno() >= 0:
                fds.add(tpl.reports.fileno())
            fds.update(fd for _, fd in list(tpl.state.pool.values()))
        pidfd = getattr(self._child, "pidfd", None)
        if pidfd is not None and pidfd.fd >= 0:
            fds.add(pidfd.fd)
        return fds

    # --- preparing ----------------------------------------------------------

    def require(self, *modules: str) -> Self:
        """Import the modules, in order, in the process.

        Raises:
            TypeError, ValueError: a name is not a dotted module name.
        """
        for m in modules:
            if not isinstance(m, str):
                raise TypeError(f"module names are str, not {type(m).__name__}")
            if not _NAME.fullmatch(m):
                raise ValueError(f"not a module name: {m!r}")
        self._mine()
        with self._cmd.lock:
            self._usable()
            if modules:
                self._queue_state(P.items_frame(P.REQUIRE, modules))
        return self

    def eval(self, code: str, *args: bytes | str) -> Self:
        """Run ``code`` in the process's ``__main__`` namespace.

        While it runs, the name ``args`` is bound to the tuple of ``args``.
        Functions it defines can be named in ``run``.  An exception in it
        makes the process print the traceback and exit with status 1.

        Raises:
            TypeError: code is not str, or an arg is not bytes/str.
            SyntaxError: the code does not compile (checked here, at the call).
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        items = _check_items(args)
        compile(code, "<anyfork eval>", "exec", dont_inherit=True)
        self._mine()
        with self._cmd.lock:
            self._usable()
            self._queue_state(P.items_frame(P.EVAL, [code, *items]))
        return self

    def send_arg(self, *args: bytes | str | bytearray | memoryview) -> Self:
        """Queue arguments for ``run``'s function: octets arrive as bytes, text as str.

        Raises:
            TypeError: an argument is neither bytes-like nor str; nothing is queued.
        """
        items = _check_items(args)
        self._mine()
        with self._cmd.lock:
            self._usable()
            if items:
                self._queue_state(P.items_frame(P.ARG, items))
        return self

    def send_fh(self, *handles: Any) -> Self:
        """Queue descriptors for ``run``'s function, passed with SCM_RIGHTS.

        Takes sockets, files, anything with ``fileno()``, or ints.  anyfork
        keeps its own duplicate, so the caller may close its handle as soon as
        this returns.

        Raises:
            TypeError, ValueError: a handle is not a descriptor or is closed;
                nothing is queued.
            OSError: a descriptor could not be duplicated (EMFILE).
        """
        if self._host is not None:
            from ._errors import UnsupportedError

            raise UnsupportedError(
                f"send_fh() can't pass descriptors to a process on {self._host}: a descriptor "
                "names an open file of this machine's kernel, and can't cross to another host")
        fds = [_fileno(h) for h in handles]
        self._mine()
        dups: list[int] = []
        with self._cmd.lock, _fds.fork_lock:  # the duplicates are queued before a fork
            try:
                for h, fd in zip(handles, fds, strict=True):
                    try:
                        dups.append(os.dup(fd))  # non-inheritable by default
                    except OSError as e:
                        if e.errno == errno.EBADF:
                            raise ValueError(f"{h!r} is not an open descriptor") from e
                        raise
                self._usable()
            except BaseException:
                P.close_fds(dups)
                raise
            for i in range(0, len(dups), P.MAX_FDS):
                chunk = dups[i : i + P.MAX_FDS]
                self._queue_state(P.fh_frame(len(chunk)), chunk)
        return self

    def tie_to_owner(self, sig: int = signal.SIGKILL) -> Self:
        """Make the process get ``sig`` (SIGKILL by default) when its owner dies.

        The owner is the program that holds the process's template: your
        program for ``new()`` and ``new_exec()``, whoever holds ``tpl`` for
        ``tpl.fork()``.  A template exits as soon as its owner's end of its
        socket closes (the owner exited, however it exited, or let go of it:
        closed it and dropped every process forked from it), and a process
        forked from it gets ``sig`` then, from the kernel
        (``PR_SET_PDEATHSIG``, which fires when the *thread* that forked a
        process exits: a template's one thread).  A process your program
        spawned itself (``new_exec()``) may have been spawned by a thread
        that exits long before the program, so there a thread in the process
        watches for the program's exit instead (a pidfd, else ``getppid()``
        five times a second), as it does wherever Linux's prctl is missing.
        Without this, a process that runs its function outlives its owner
        (it sees EOF on its socket, if it reads it).

        Queued like ``send_arg``.  It ties this process only: processes later
        forked from it are not tied (their template is).

        Raises:
            ValueError: not a signal number.
        """
        sig = int(sig)
        if sig not in signal.valid_signals() or sig == 0:
            raise ValueError(f"not a signal number: {sig}")
        self._mine()
        if self._host is not None:
            # A remote host's hub ends everything it started when the
            # connection drops, which it does when the owner dies.
            return self
        if isinstance(self._parent, Direct):
            owner, flags = os.getpid(), 0  # spawned by one of our threads: watched
        else:
            keep = self._keep
            owner, flags = (keep.pid if keep is not None else 0), P.TIE_BY_PARENT
        with self._cmd.lock:
            self._usable()
            self._cmd.put(P.tie_frame(sig, owner, flags))
        return self

    # --- forking ------------------------------------------------------------

    def fork(self) -> Process:
        """A new process forked from this one, with everything queued so far.

        This process becomes a template: it reports the pid and exit status
        of each process forked from it.  What is queued on this process is
        written now; what is queued later goes only where it is queued.

        A template told to (``fork_ahead``) hands out a process it forked a
        moment before it was asked for, from exactly the same state.

        Raises:
            ProcessStateError: this process was already run or closed.
            TemplateDiedError: this process is gone.
        """
        return run_blocking(self._fork_op())

    def _fork_op(self) -> Op[Process]:
        """``fork``, as an operation: everything but writing the FORK (or the
        SPAWNs that replace a process forked ahead) happens at its first step."""
        self._mine()
        _refuse_while_prepared()
        held: list[set[int] | None] = []
        with self._cmd.lock, _fds.fork_lock:  # descriptors made here are listed before a fork
            # Signals held once for the whole step (nothing in it waits, and
            # the locks are taken first: no wait for them with Ctrl-C held
            # back): the reads, the take and the queueing then hold nothing
            # themselves.
            hold_signals(held)
            try:
                self._usable()
                tpl = self._tpl
                child = None
                if tpl is not None:
                    tpl.check_alive()  # gone, though its sockets may never see EOF
                if tpl is not None and tpl.ahead:
                    tpl.read_first()
                    taken = tpl.take()
                    if taken is not None:
                        record, sock = taken
                        child = Process(_TOKEN, CommandChannel(sock), tpl, record, self._host)
                        child._keep = self
                if child is None:
                    try:
                        mine, theirs = socket.socketpair()
                    except OSError as e:
                        raise Error(f"fork(): no socketpair for the new process: {e}") from e
                    try:
                        _fds.plain(mine, theirs)
                        tpl = self._template()
                    except BaseException:
                        mine.close()
                        theirs.close()
                        raise
                    try:
                        record = tpl.queue_fork(theirs.detach())  # the queue owns that end now
                    except BaseException:
                        mine.close()
                        raise
                    child = Process(_TOKEN, CommandChannel(mine), tpl, record, self._host)
                    child._keep = self
                assert tpl is not None
                tpl.queue_spawns()
            finally:
                release_signals(held)
        try:
            yield from tpl.flush_op(None)
        except BaseException as e:
            child._cmd.close()
            if isinstance(e, TemplateDiedError):
                failure = self._failed()  # it failed in a require or an eval
                if failure is not None:
                    raise failure from e
            raise
        if not tpl.ahead:
            tpl.reports.read_now()  # keep the channel from filling up
        return child

    def fork_ahead(self, n: int) -> Self:
        """Keep ``n`` processes forked ahead, ready for ``fork`` to hand out.

        From now on each ``fork`` hands out the oldest process forked ahead
        (already running and connected, so the call waits neither for a fork
        nor for the template) and asks the template for a replacement.  A
        change of state (``require``, ``eval``, ``send_*``) lets go of those
        forked from the old state; the next ``fork`` forks ahead again.  The
        first ones are asked for now.  ``fork_ahead(0)`` stops it and lets
        go of those waiting.  A template forks ahead only when told to; the
        default template behind ``new()`` keeps a few.

        Each idle process forked ahead costs about a megabyte of memory.

        Args:
            n: how many to keep (0 to 64).

        Returns:
            This process, now a template.

        Raises:
            TypeError, ValueError: ``n`` is not an int from 0 to 64.
            ProcessStateError: this process was already run or closed.
            TemplateDiedError: this process is gone.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"fork_ahead() takes an int, not {type(n).__name__}")
        if not 0 <= n <= _MAX_AHEAD:
            raise ValueError(f"fork_ahead() keeps 0 to {_MAX_AHEAD} processes, not {n}")
        self._mine()
        with self._cmd.lock, _fds.fork_lock:
            self._usable()
            tpl = self._template()
            tpl.ahead = n
            if n == 0:
                tpl.stop_ahead()
                return self
            tpl.queue_spawns()
        run_blocking(tpl.flush_op(None))
        return self

    # --- run ------------------------------------------------------------------

    def _start_run(self, func: object) -> None:
        """Check and set "spent" in one step, and queue RUN: of two threads
        that run() one process, the second gets ProcessStateError."""
        name = _func_name(func)
        # A function of the caller's main script: the process imports that
        # script under another name if its own __main__ lacks the function
        # (see _mainmod).  Not for a name given as a string: that names
        # what the process's __main__ has (eval'd code, say).
        main = _mainmod.describe() if (not isinstance(func, str) and name.startswith("__main__:")
                                        and self._host is None) else None
        self._mine()
        with self._cmd.lock:
            self._usable()
            self._spent = "run"
            self._func = name
            if main is not None:
                self._cmd.put(P.items_frame(P.MAIN, main))
            self._cmd.put(P.run_frame(name))
            if self._tpl is not None:
                self._tpl.retire("run")  # no fork() will hand them out now: let them go

    def _run_op(self) -> Op[socket.socket]:
        """Write everything queued (RUN last), hand the socket over, and wait for the pid."""
        tpl = self._tpl
        try:
            yield from self._parent.flush_op(None)  # normally empty: fork() wrote the FORK
            try:
                yield from self._cmd.flush_op(None, tpl.reports if tpl is not None else None)
            except BrokenError as e:
                raise (yield from self._write_error_op(e)) from e
        except BaseException:
            # Failed or interrupted part-way: a frame may be half written and
            # RUN is still queued.  The process can't be prepared any further.
            self._cmd.close()
            raise
        sock = self._cmd.hand_over()
        try:
            yield from self._parent.pid_op(self._child, None)
            if tpl is not None:
                yield from tpl.last_reports_op()
        except BaseException as e:
            sock.close()
            if isinstance(e, TemplateDiedError):
                raise (yield from self._failed_or_op(e)) from e
            raise
        return sock

    def run(self, func: str | Callable[..., Any]) -> socket.socket:
        """Write everything queued and tell the process to call ``func``.

        ``func`` is "pkg.mod:name", a dotted "pkg.mod.name", a bare name from
        the process's ``__main__``, or a module-level function.  In the
        process it is called as ``func(sock, *items)`` with its end of the
        socket and every send_fh handle and send_arg value, in order.

        Returns once everything is written and the pid is known; it does not
        wait for the process to start ``func``.  Bytes written on the returned
        socket reach ``func`` unchanged.

        Returns:
            The caller's end of the socketpair (blocking, close-on-exec).

        Raises:
            TypeError, ValueError: ``func`` can't be named in another process.
            ProcessStateError: the process was already run or closed (also
                to the second of two threads calling run() at once).
            ProcessExitedError: it exited before taking every command.
            TemplateDiedError: its template died before forking it.
        """
        self._start_run(func)
        return run_blocking(self._run_op())

    async def run_async(self, func: str | Callable[..., Any]) -> socket.socket:
        """``run`` for asyncio: nothing it does blocks the event loop.

        Returns:
            The caller's end of the socketpair, non-blocking, close-on-exec.
        """
        from . import _aio

        return await _aio.run(self, func)

    # --- status -------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process id, for every process anyfork made.

        Known once ``run`` returned, and at once for processes the caller
        spawned itself and those a template forked ahead; reading it earlier
        on another forked process blocks until its template reports it.
        """
        self._mine()
        if self._child.pid is None:
            try:
                run_blocking(self._parent.pid_op(self._child, None))
            except TemplateDiedError as e:
                raise self._failed_or(e) from e
        pid: int = self._child.pid
        return pid

    @property
    def returncode(self) -> int | None:
        """The exit status once known, else None (subprocess's convention:
        negative for a signal).  Never blocks, and never raises: when the
        status can't be known (its template died, someone else reaped it),
        it stays None, and ``wait`` says why."""
        try:
            return self._poll()
        except Error:
            return None

    def _poll(self) -> int | None:
        """``returncode``, but raising when the status can't be known (for
        rpc, which tells a worker out of reach from one still running)."""
        self._mine()
        return self._parent.status(self._child, self._describe())

    def _wait_op(self, timeout: float | None) -> Op[int]:
        """Wait for the exit (within ``timeout`` seconds, every step included)."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0")
        deadline = deadline_after(timeout)
        self._mine()
        parent, child, what = self._parent, self._child, self._describe()
        tpl = self._tpl
        try:
            if tpl is not None and tpl.lingers():  # closed, alive for its children: after them
                yield from tpl.settle_op(deadline)
            rc = parent.status(child, what)
            if rc is None:
                yield from parent.exit_op(child, deadline)
                rc = parent.status(child, what)
        except TemplateDiedError as e:
            raise self._failed_or(e) from e
        if rc is None:
            raise TimeoutExpired(f"{what} still running after {timeout} s")
        if rc == 1:
            failure = yield from self._failed_op(deadline)
            if failure is not None:
                raise failure
        return rc

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit status (negative: killed by that signal).

        ``timeout`` covers the whole call; a huge one (``float('inf')``)
        waits for ever, like None.

        Raises:
            ProcessFailedError: it exited with status 1 because it failed
                before its function ran (an import, an eval, looking the
                function up, calling it); or its template failed so, and it
                was never forked.
            TimeoutExpired: still running after ``timeout`` seconds.
            TemplateDiedError: its template died, so no status will come.
            ProcessStateError: its template ran a function, which now owns it.
            ExitStatusLostError: someone else reaped it.
        """
        return run_blocking(self._wait_op(timeout))

    async def wait_async(self, timeout: float | None = None) -> int:
        """``wait`` for asyncio: the event loop waits, never its thread.

        Raises:
            The same as ``wait``.
        """
        from . import _aio

        return await _aio.wait(self, timeout)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the process; never to a recycled pid.

        A process the caller spawned is signalled through a pidfd where the
        platform has one; a forked one through its template, the parent, which
        has not reaped it yet when it gets the request.  Does nothing once
        the process is known to have exited.

        Raises:
            ValueError: not a signal number.
            ProcessStateError: its template ran a function or was closed, so no
                one can name the pid safely any more.
            TemplateDiedError: its template died.
        """
        sig = int(sig)
        if sig != 0 and sig not in signal.valid_signals():
            raise ValueError(f"not a signal number: {sig}")
        self._mine()
        what = self._describe()
        if self._parent.status(self._child, what) is not None:
            return
        self._parent.kill(self._child, sig, what)

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        """Drop the process before run: it exits.  After run: does nothing.

        Descriptors queued with send_fh are closed.  A template lets go of
        the processes it forked ahead at once, and forks no more.  It exits
        once the processes it forked are all gone: until then it stays
        alive for them, so their ``kill``, ``wait`` and ``returncode`` go on
        working (and ``wait`` on the template waits for them too).
        Idempotent.
        """
        if self._gen != runtime.generation:
            return
        runtime.reap_directs()
        with self._cmd.lock:
            if self._spent is None:
                self._spent = "closed"
            tpl = self._tpl
            if tpl is not None and tpl.retired is None:
                tpl.retire("closed")
            if tpl is not None:
                tpl.reports.read_now()  # the exits that came: only live children keep it
        if tpl is not None and tpl.lingers():
            if tpl.all_exited():  # their exit reports are on the way: take them now
                run_blocking(tpl.settle_op(deadline_after(1.0)))
            if tpl.lingers():
                return
        self._cmd.close()
        if tpl is not None:
            # The pids of what it forked before it saw EOF are on their way.
            run_blocking(tpl.last_reports_op())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            # At interpreter teardown the module's globals may be None already.
            if getattr(self, "_gen", None) != runtime.generation:
                return
            self._cmd.close()
            tpl = self._tpl
            if tpl is not None:
                if tpl.retired is None:
                    tpl.retire("closed")
                tpl.reports.end("was closed")
        except Exception:
            pass


# --- constructors -----------------------------------------------------------------------

# How many processes the default template keeps forked ahead and connected,
# ready for new().  Each idle one costs about a megabyte of private memory.
_POOL = 3
_MAX_AHEAD = 64  # fork_ahead's limit: past that it is a pool's job, not a template's


def check_supported() -> None:
    """Raise unless a process can be created here and now."""
    if _UNSUPPORTED:
        from ._errors import UnsupportedError

        raise UnsupportedError(f"anyfork can't work here: {_UNSUPPORTED}")
    _refuse_while_prepared()


# Where the serve loop of this process, if it is one of anyfork's, says what
# it is doing (see _serve.preparing): the package's own, or the copy a remote
# host's hub built from source.
_SERVE_MODULES = ("anyfork._serve", "_anyfork_remote._serve")


def _refuse_while_prepared() -> None:
    """A process that anyfork is still preparing (importing a module for it,
    running its eval'd code, importing the caller's main script) must not
    create processes: a script that imports itself without a ``__main__``
    guard would fork without end, each new process doing the same."""
    modules = sys.modules
    for name in _SERVE_MODULES:
        # Not sys.modules.get: on free-threaded CPython that takes the dict's
        # lock (`in` and [] don't), and a fork_template(allow_threads=True)
        # in another thread can then leave it held for good in the template
        # (CPython hands a contended lock straight to a waiting thread, which
        # the fork leaves behind: gh-133130).  Every process creation comes here.
        serve = modules[name] if name in modules else None  # noqa: SIM401 (not .get)
        what = getattr(serve, "preparing", None) if serve is not None else None
        if what:
            raise Error(
                f"this process is still being prepared by anyfork ({what}), and can't create "
                "processes until it is: code that runs when a module is imported (a module named "
                "in require() or run(), or the main script whose functions a worker uses) must not "
                "create processes.  Put that code under 'if __name__ == \"__main__\":', as "
                "multiprocessing asks too.")


def new_exec() -> Process:
    """A new process running a fresh interpreter.

    Slower than :func:`new` and shares no memory, but needs no template.
    The process sees the caller's ``sys.path`` as of this call.  Started with
    ``posix_spawn``: the caller never forks.  If ``anyfork.early`` was
    imported, the process is forked from the early process instead.

    Raises:
        anyfork.Error: no interpreter to start, or the spawn failed.
    """
    check_supported()
    runtime.reap_directs()
    early = runtime.early
    if early is not None and _template_alive(early):
        proc = early.fork()
        _send_path(proc, runtime.early_site)  # the early process has sys.path as of its fork
        return proc
    try:
        sender = _failures.sink().sender.fileno()  # made once, before the lock
    except OSError as e:
        raise Error(f"new_exec(): no failure sink for the new process: {e}") from e
    with _fds.fork_lock:  # the socketpair is owned before a fork
        try:
            mine, theirs = socket.socketpair()
        except OSError as e:
            raise Error(f"new_exec(): no socketpair for the new process: {e}") from e
        _fds.plain(mine, theirs)
        try:
            pid = _exec.spawn(theirs.fileno(), _path(), sender)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        proc = adopt(mine, pid)
    _send_path(proc, [])
    return proc


def remote_process(sock: socket.socket, parent: Parent, record: Any, host: Host) -> Process:
    """The Process for one a remote host's hub runs (see anyfork.remote)."""
    return Process(_TOKEN, CommandChannel(sock), parent, record, host)


def parent_of(proc: Process) -> tuple[Parent, Any]:
    """``proc``'s parent (what reaps it) and its record there."""
    return proc._parent, proc._child


def host_of(proc: Process) -> Host | None:
    """The remote host ``proc`` runs on (its forks too), or None for this one."""
    return proc._host


def adopt(sock: socket.socket, pid: int) -> Process:
    """The Process for a child the caller started itself (and must reap),
    serving commands on the other end of ``sock``."""
    direct = Direct(pid)
    return Process(_TOKEN, CommandChannel(sock), direct, direct)


def _path() -> list[str]:
    """sys.path as the process should see it: a pathlib.Path or bytes entry
    as str, anything else that is not a path skipped, as Python's own
    imports skip it."""
    path = []
    for entry in sys.path:
        if isinstance(entry, str):
            path.append(entry)
        elif isinstance(entry, (bytes, os.PathLike)):
            try:
                path.append(os.fsdecode(entry))
            except (TypeError, ValueError):
                pass
    return path


def _send_path(proc: Process, known_site: list[str]) -> list[str]:
    """Queue the caller's sys.path, and the site directories it needs that
    the process doesn't know yet; returns every site directory it now knows."""
    path = _path()
    _, extra = _exec.site_plan(path)
    new = [d for d in extra if d not in known_site]
    with proc._cmd.lock:
        proc._queue_state(P.items_frame(P.PATH, path))
        if new:
            proc._queue_state(P.items_frame(P.SITE, new))
    return known_site + new


def _template_alive(tpl: Process) -> bool:
    if tpl._cmd.sock is None or tpl._spent is not None:
        return False
    t = tpl._tpl
    if t is not None and t.state.ended is not None:
        return False
    d = tpl._child
    return not isinstance(d, Direct) or not d.poll()


def _default_template() -> Process:
    rt = runtime
    tpl = rt.default
    if tpl is not None and _template_alive(tpl):
        return tpl
    with rt.lock:
        tpl = rt.default
        if tpl is not None and _template_alive(tpl):
            return tpl
        if tpl is not None:
            tpl.close()
        early = rt.early
        if early is not None and _template_alive(early):
            tpl = early
            with tpl._cmd.lock:  # it has sys.path as of its fork; bring it up to date
                rt.default_site = rt.early_site[:] = _send_path(tpl, rt.early_site)
        else:
            tpl = new_exec()  # it queues PATH and SITE
            rt.default_site = _exec.site_plan(_path())[1]
        tpl.fork_ahead(_POOL)
        rt.default_path = list(sys.path)
        rt.default = tpl
        return tpl


def new() -> Process:
    """A new process forked from the default template.

    The template is a small interpreter started with :func:`new_exec` on
    first use (or the ``anyfork.early`` process) and kept; if it died, the
    next call starts another.  It keeps a few processes forked ahead and
    already connected, so this usually hands one out without waiting for a
    fork or for the template.  The process sees the caller's ``sys.path`` as
    of this call.

    Raises:
        TemplateDiedError: the template died twice in a row.
    """
    check_supported()
    for attempt in (1, 2):
        tpl = _default_template()  # reaps on the way, like every call into anyfork
        try:
            proc = tpl.fork()
        except (TemplateDiedError, ProcessExitedError, ProcessStateError):
            if attempt == 2:
                raise
            continue
        if sys.path != runtime.default_path:  # compared as the user set it
            _send_path(proc, runtime.default_site)
        return proc
    raise AssertionError("unreachable")  # pragma: no cover


async def new_async() -> Process:
    """:func:`new` for asyncio: when no process forked ahead is at hand, the
    event loop waits for the template, never its thread.

    Starting the default template the first time (a ``posix_spawn``, a
    millisecond or two) still happens in the call.

    Raises:
        TemplateDiedError: the template died twice in a row.
    """
    import asyncio

    from ._backend import run_async

    check_supported()
    # Calls take turns, one per turn of the loop: gather() of 300 jobs would
    # otherwise run 300 calls' worth of work back to back before the loop
    # saw a timer again.  It costs nothing in speed: the template forks one
    # at a time anyway, and this thread prepares one at a time.  The turn is
    # held across one yield to the loop: a free asyncio.Lock is taken without
    # one, and a call that finds a process forked ahead waits for nothing, so
    # without it every call would run, one after the other, in the loop
    # iteration that started them all.
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns.setdefault(loop, asyncio.Lock())
    async with turn:
        for attempt in (1, 2):
            tpl = _default_template()
            try:
                proc = await run_async(tpl._fork_op())
            except (TemplateDiedError, ProcessExitedError, ProcessStateError):
                if attempt == 2:
                    raise
                continue
            if sys.path != runtime.default_path:
                _send_path(proc, runtime.default_site)
            break
        else:
            raise AssertionError("unreachable")  # pragma: no cover
        await asyncio.sleep(0)  # the others wait on the turn meanwhile; see above
    return proc


# new_async's turns, one lock per event loop (an asyncio.Lock belongs to one loop).
_turns: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()

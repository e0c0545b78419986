"""The caller's side: ``Process``, ``new``, ``new_exec`` and the default template.

Ownership
---------
Every descriptor the library holds has one owner that closes it:

- a ``Process`` owns the caller's end of its command socket until ``run``
  hands it to the user, and its ``Outbox`` owns the duplicates of handles
  queued with ``send_fh`` until the kernel has taken them;
- a template's ``_Reports`` owns the caller's end of its report channel, and
  the caller's ends of the processes it forked ahead until one is handed out
  (then that Process owns it);
- a ``_Direct`` owns the pidfd of a process the caller spawned itself.

All of them are listed in ``_fds`` so that a process forked from the
caller (by the user's own ``os.fork``, by multiprocessing, or by
``fork_template``) closes its inherited copies at once: a stray copy of a
command socket would keep a template from ever seeing EOF.  The forked copy's
objects are dead from then on (``runtime.generation`` moved), and they never close
a descriptor number that may by now be someone else's.

Locks: one per Process (its queue and socket), one per report channel (a
condition; one thread reads while the others wait for what it dispatches),
and ``_lock`` for the module's globals.  Lock order: Process, then channel.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _exec, _fds
from . import _protocol as P
from ._errors import (
    Error,
    ExitStatusLostError,
    ProcessExitedError,
    ProcessStateError,
    ProtocolError,
    TemplateDiedError,
    TimeoutExpired,
)
from ._runtime import runtime

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from typing_extensions import Self

# Plain ints: socket's constants are IntFlag members, and "|" on those is
# Python code in enum.py, several calls on every command sent.
_SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0))
_RECV_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 8))
_ANC_SPACE = socket.CMSG_SPACE(4 * 4)  # reports carry one descriptor; leave room to see extras
_POLLIN, _POLLOUT = 1, 4  # POSIX values; select isn't imported unless needed
_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_TOKEN = object()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SCM_RIGHTS"):  # pragma: no cover
    _UNSUPPORTED: str | None = "this platform has no Unix sockets with descriptor passing"
elif not hasattr(os, "fork") or not hasattr(os, "posix_spawn"):  # pragma: no cover
    _UNSUPPORTED = "this platform lacks fork() or posix_spawn()"
else:
    _UNSUPPORTED = None

def _poll(fds: list[tuple[int, int]], timeout: float | None) -> list[int]:
    """The descriptors among ``fds`` ((fd, poll events) pairs) that are ready.

    poll, not select: a big program's descriptors can be numbered past
    select's FD_SETSIZE (1024).
    """
    import select

    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]


# --- direct children ------------------------------------------------------------------


_P_PIDFD: int | None = getattr(os, "P_PIDFD", None)


class _Direct:
    """A process the caller spawned itself, and so must reap."""

    __slots__ = ("lock", "loop", "lost", "pid", "pidfd", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.lock = threading.RLock()
        self.returncode: int | None = None
        self.lost = False
        self.loop: Any = None  # an asyncio loop watching the pidfd (see _aio)
        self.pidfd = -1
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
                _fds.own(self.pidfd)
            except OSError:
                self.pidfd = -1

    def done(self) -> bool:
        return self.returncode is not None or self.lost

    def _reaped(self, returncode: int | None) -> None:
        if returncode is None:
            self.lost = True
        else:
            self.returncode = returncode
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            _fds.disown(fd)
            loop, self.loop = self.loop, None
            if loop is None:
                P.close_fd(fd)
            else:
                _unwatch(loop, fd)
        runtime.directs.pop(self.pid, None)

    def poll(self) -> bool:
        """Reap it if it has exited; True once done.  Never blocks.

        The lock is never held across a blocking wait, so that kill() from
        another thread, or from a signal handler that interrupted a wait on
        this same thread (hence an RLock), is never stuck behind one.
        """
        if self.done():
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.done():
                return True
            try:
                if self.pidfd >= 0 and _P_PIDFD is not None:
                    # By pidfd, not by number: if someone else reaped ours and
                    # the number went to another child, waitpid(pid) would
                    # collect that stranger's status.
                    info = os.waitid(_P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
                    if info is None:
                        return False
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                    self._reaped(code)
                    return True
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self._reaped(None)
                return True
            if pid:
                self._reaped(os.waitstatus_to_exitcode(status))
                return True
            return False
        finally:
            self.lock.release()

    def wait(self, timeout: float | None) -> None:
        """Until it is reaped, or raise TimeoutExpired after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while not self.poll():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutExpired(f"process {self.pid} still running after {timeout} s")
            fd = self.pidfd
            if fd >= 0:
                # A pidfd turns readable when the process exits; wake now and
                # then anyway, in case another thread reaped and closed it.
                _poll([(fd, _POLLIN)], 0.1 if left is None else min(left, 0.1))
            else:
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 0.05)

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.done():
                return
            if self.pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self.pidfd, sig)
                except ProcessLookupError:
                    pass  # exited, and reaped by someone else: nothing to signal
            else:
                # Not yet reaped, so the pid is still our child's: no reuse race.
                os.kill(self.pid, sig)


def _unwatch(loop: Any, fd: int) -> None:
    """Close a pidfd an asyncio loop watches, unregistering it first.

    Closing it while it is registered would leave the loop's selector with a
    stale entry for a number the next open() may reuse.
    """

    def unregister() -> None:
        loop.remove_reader(fd)
        P.close_fd(fd)

    try:
        import asyncio

        if asyncio.get_running_loop() is loop:
            unregister()
            return
    except RuntimeError:
        pass
    if loop.is_closed():  # its selector is gone, and the registration with it
        P.close_fd(fd)
        return
    if not loop.is_running():  # no callback would run: unregister from here
        try:
            loop.remove_reader(fd)
        finally:
            P.close_fd(fd)
        return
    try:
        loop.call_soon_threadsafe(unregister)
    except RuntimeError:  # closed just now
        P.close_fd(fd)


# --- report channels ------------------------------------------------------------------


class _Reports:
    """The caller's end of a template's report channel.

    The template reports, for each fork, the child's pid (or why it failed),
    and later its exit status; for each SPAWN, the process forked ahead and
    the caller's end of its socket.  Reports are read lazily: whenever a
    caller needs one, and opportunistically when it writes to the template.

    One thread reads at a time (``reading``); the others wait on ``cond`` for
    what it dispatches.  Everything that more than one thread mutates (the
    pool, ``children``, the asyncio registrations) changes under ``cond``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.decoder = P.Decoder(P.REPORTS)
        self.cond = threading.Condition(threading.Lock())
        self.reading = False
        self.close_requested = False
        self.next_seq = 1
        self.children: dict[int, weakref.ref[Process]] = {}
        self.ended: str | None = None  # why no more reports will come: "exited", ...
        self.corrupt = False  # ended because the template sent garbage
        self.handed_over = False  # the template ran a function
        # asyncio (see _aio): the waiting tasks, how many per loop share that
        # loop's reader, and a socket whose closing waits for them to unregister.
        self.async_waiters: list[tuple[Any, Any]] = []
        self.async_loops: dict[Any, int] = {}
        self.closing: socket.socket | None = None
        # Processes forked ahead (SPAWN): seq -> (pid, caller's end), oldest first.
        self.pool: dict[int, tuple[int, socket.socket]] = {}
        # The template's state version (see Process._queue_state), and for
        # each SPAWN sent but not yet answered, the version it will fork.
        self.version = 0
        self.spawning: dict[int, int] = {}
        self.pool_closed = False  # the template was closed or run: no more pool
        _fds.own(sock)

    def fileno(self) -> int:
        sock = self.sock
        return sock.fileno() if sock is not None else -1

    def pump(self, timeout: float | None, done: Callable[[], bool] | None = None) -> None:
        """Read and dispatch reports, waiting up to ``timeout`` for the first.

        ``done`` is checked under the lock before waiting or reading: a report
        another thread dispatched a moment ago must not leave us waiting for
        the next one.
        """
        with self.cond:
            if done is not None and done():
                return
            if self.reading:
                if timeout != 0:
                    self.cond.wait(timeout)
                return
            if self.sock is None:
                return
            self.reading = True
        woke = False
        try:
            woke = self._read(timeout)
        finally:
            with self.cond:
                self.reading = False
                close = self.close_requested
                self.cond.notify_all()
            if close:
                self.close()
            if woke:
                self._wake_async()

    def _read(self, timeout: float | None) -> bool:
        sock = self.sock
        assert sock is not None
        if timeout != 0 and not _poll([(sock.fileno(), _POLLIN)], timeout):
            return False
        got = False
        while True:
            fds: list[int] = []
            try:
                data, anc, flags, _ = sock.recvmsg(65536, _ANC_SPACE, _DONTWAIT | _RECV_CLOEXEC)
                if anc:
                    fds = P.unpack_fds(anc, socket.SOL_SOCKET, socket.SCM_RIGHTS)
                if flags & _CTRUNC:
                    if fds:  # more than one report's worth: not from a template
                        P.close_fds(fds)
                        fds, data = [], b""
                        self.ended = "sent more descriptors than a report carries"
                        self.corrupt = True
                    else:
                        # We were out of descriptors as a SPARE arrived: the
                        # kernel dropped its socket (the process it belonged
                        # to sees EOF and exits).  A placeholder keeps the
                        # frame decodable and the channel alive.
                        fds = [-1]
            except BlockingIOError:
                return got
            except OSError as e:
                data = b""
                self.ended = f"could not be read from ({e})"
            got = True
            if not data:
                try:
                    self.decoder.eof()
                except P.ProtocolError:
                    pass
                self._end()
                return True
            try:
                self.decoder.feed(data, fds)
                while (frame := self.decoder.next_frame()) is not None:
                    try:
                        self._dispatch(frame)
                    finally:
                        frame.close()  # whatever descriptors the frame still holds
            except P.ProtocolError as e:
                self.ended = f"sent a corrupt report ({e})"
                self.corrupt = True
                self._end()
                return True

    def _dispatch(self, frame: P.Frame) -> None:
        if frame.kind == P.FAILED:
            seq, reason = P.decode_failed(frame.payload)
            with self.cond:
                self.spawning.pop(seq, None)
                ref = self.children.pop(seq, None)
            child = ref() if ref is not None else None
            if child is not None:
                child._failed = reason
            return
        seq, value = P.decode_seq_int(frame.payload)
        if frame.kind == P.SPARE:
            fd = frame.fds.pop()
            if fd < 0:  # lost in transit (see _read)
                with self.cond:
                    self.spawning.pop(seq, None)
                return
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                P.close_fd(fd)
                raise P.ProtocolError(f"a SPARE report carried no socket ({e})") from e
            _fds.plain(sock)
            _fds.own(sock)
            with self.cond:
                current = self.spawning.pop(seq, None) == self.version and not self.pool_closed
                if current:
                    self.pool[seq] = (value, sock)
            if not current:
                _fds.close_sock(sock)  # forked from a state the template no longer has, or closed
            return
        if frame.kind == P.LOST:
            with self.cond:
                ref = self.children.pop(seq, None)
            child = ref() if ref is not None else None
            if child is not None:
                child._lost = True
            return
        if frame.kind == P.PID:
            ref = self.children.get(seq)
            child = ref() if ref is not None else None
            if child is None:
                self.children.pop(seq, None)
            else:
                child._pid = value
            return
        # EXIT
        with self.cond:
            pooled = self.pool.pop(seq, None)
            ref = self.children.pop(seq, None)
        if pooled is not None:
            _fds.close_sock(pooled[1])  # a process forked ahead died waiting: never hand it out
        child = ref() if ref is not None else None
        if child is not None:
            child._returncode = value

    def take(self, parent: Process) -> Process | None:
        """The oldest process forked ahead, as a Process, or None."""
        with self.cond:
            if not self.pool:
                return None
            seq = next(iter(self.pool))
            pid, sock = self.pool.pop(seq)
            child = Process(_TOKEN, sock, parent=parent, seq=seq)
            child._pid = pid
            self.children[seq] = weakref.ref(child)
            return child

    def _end(self) -> None:
        if self.ended is None:
            self.ended = "ran a function, which now owns its children" if self.handed_over else "exited"
        sock, self.sock = self.sock, None
        with self.cond:
            self.children.clear()
        self._drop_pool(final=True)
        self._release(sock)

    def _release(self, sock: socket.socket | None) -> None:
        """Close the channel's socket, unless asyncio loops still watch it.

        Closing a descriptor a selector still holds would leave the loop a
        stale entry for a number the next socket may reuse; then the last
        task to unregister it closes it (see _aio).
        """
        if sock is None:
            return
        with self.cond:
            if self.async_loops:
                self.closing = sock
                sock = None
        if sock is None:
            self._wake_async()
        else:
            _fds.close_sock(sock)

    def _drop_pool(self, final: bool = False) -> None:
        """Let go of the processes forked ahead: they see EOF and exit.

        ``final``: for good (the template was closed, run or ended), so those
        still on their way are let go as they arrive.
        """
        with self.cond:
            pool, self.pool = self.pool, {}
            if final:
                self.pool_closed = True
        for _, sock in pool.values():
            _fds.close_sock(sock)

    def close(self) -> None:
        """Stop listening: no more reports will be read (a reader finishes first)."""
        with self.cond:
            if self.reading:
                self.close_requested = True
                return
            if self.ended is None:
                self.ended = "was closed"
            sock, self.sock = self.sock, None
        self._drop_pool(final=True)
        self._release(sock)

    def wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Pump until ``done()``; False if ``timeout`` ran out (0: look once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self.sock is None:
                return done()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.pump(left, done)
            if left == 0:
                return done()
        return True

    def describe_end(self) -> str:
        return self.ended or "stopped reporting"

    def _wake_async(self) -> None:
        for loop, fut in list(self.async_waiters):
            try:
                loop.call_soon_threadsafe(_set_done, fut)
            except RuntimeError:  # that loop is closed; its task is gone
                pass


def _set_done(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


# --- Process --------------------------------------------------------------------------


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
    if not module or not qualname or "<" in qualname or not _NAME.fullmatch(qualname):
        raise TypeError(
            f"{func!r} has no importable name (a lambda, closure or local function?); "
            "pass a module-level function or its 'module:name'"
        )
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
    return fd


class Process:
    """A process anyfork created, being prepared or already running a function.

    Made only by :func:`anyfork.new`, :func:`anyfork.new_exec` and
    :meth:`Process.fork`.  The preparing methods (``require``, ``eval``,
    ``send_arg``, ``send_fh``) queue commands and return the process, so calls
    chain; ``fork`` and ``run`` write what is queued.  After ``run`` the
    process is spent: only ``pid``, ``returncode``, ``wait`` and ``kill`` work.
    """

    __slots__ = (
        "__weakref__",
        "_ahead",
        "_direct",
        "_failed",
        "_gen",
        "_lock",
        "_lost",
        "_out",
        "_parent",
        "_pid",
        "_reports",
        "_returncode",
        "_seq",
        "_sock",
        "_spent",
    )

    def __init__(
        self,
        token: object,
        sock: socket.socket,
        *,
        parent: Process | None = None,
        seq: int = 0,
        direct: _Direct | None = None,
    ) -> None:
        if token is not _TOKEN:
            raise TypeError("Process objects come from anyfork.new(), new_exec() and Process.fork()")
        self._gen = runtime.generation
        self._sock: socket.socket | None = sock
        _fds.own(sock)
        self._out = P.Outbox()
        self._lock = threading.RLock()
        self._spent: str | None = None
        self._parent = parent
        self._seq = seq
        self._direct = direct
        self._pid: int | None = direct.pid if direct is not None else None
        self._returncode: int | None = None
        self._failed: str | None = None
        self._lost = False  # its template says someone else collected its status
        self._reports: _Reports | None = None
        self._ahead = 0  # how many processes to keep forked ahead (see fork)

    def __repr__(self) -> str:
        state = self._spent or "preparing"
        pid = self._pid if self._pid is not None else "?"
        return f"<anyfork.Process pid={pid} {state}>"

    # --- helpers ------------------------------------------------------------

    def _describe(self) -> str:
        if self._pid is not None:
            return f"process {self._pid}"
        return f"process #{self._seq} of {self._parent._describe()}" if self._parent else "process"

    def _mine(self) -> None:
        """Raise unless this object belongs to this process, and reap on the way.

        After a fork of the caller (or once anyfork shut down at exit), the
        descriptors behind this object are closed and their numbers may be
        someone else's: nothing may be done with them.
        """
        runtime.check(self._gen, self._describe())
        runtime.reap_directs()

    def _usable(self) -> socket.socket:
        self._mine()
        if self._spent is not None or self._sock is None:
            raise ProcessStateError(f"{self._describe()} was already {self._spent or 'closed'}")
        return self._sock

    def _broken(self, e: OSError) -> Error:
        """The error to raise when writing to this process failed."""
        parent = self._parent
        if parent is not None:
            reports = parent._reports
            if reports is not None:
                reports.pump(0)
                if self._failed:
                    return Error(f"{parent._describe()} could not fork: {self._failed}")
                if reports.ended is not None and self._pid is None:
                    return parent._template_error(reports)
        rc = None
        if self._direct is not None:
            try:
                self._direct.wait(1.0)
            except TimeoutExpired:
                pass
            rc = self._direct.returncode
        elif self._returncode is not None:
            rc = self._returncode
        status = "" if rc is None else f" with status {rc}"
        return ProcessExitedError(
            f"{self._describe()} exited{status} before it took every command "
            f"({e.strerror or e}); its stderr says why", rc)

    def _flush(self) -> None:
        """Write everything queued (caller holds ``_lock``)."""
        sock = self._sock
        out = self._out
        if sock is None or not out:
            return
        reports = self._reports
        try:
            while out:
                buffers, fds = out.chunk()
                anc = P.ancillary(fds, socket.SOL_SOCKET, socket.SCM_RIGHTS)
                if reports is None:
                    n = sock.sendmsg(buffers, anc, _SEND_FLAGS)
                else:
                    # A template may be blocked writing reports to us: never
                    # block on it without reading them.
                    try:
                        n = sock.sendmsg(buffers, anc, _SEND_FLAGS | _DONTWAIT)
                    except BlockingIOError:
                        self._wait_writable(sock, reports)
                        continue
                out.sent(n)
        except OSError as e:
            out.close()
            raise self._broken(e) from e

    @staticmethod
    def _wait_writable(sock: socket.socket, reports: _Reports) -> None:
        rfd = reports.fileno()
        fds = [(sock.fileno(), _POLLOUT)]
        if rfd >= 0:
            fds.append((rfd, _POLLIN))
        if rfd in _poll(fds, None):
            reports.pump(0)

    def drop_inherited(self) -> None:
        """In a forked child: close the send_fh duplicates still queued."""
        self._out.close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        self._out.close()
        _fds.close_sock(sock)

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
        with self._lock:
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
        with self._lock:
            self._usable()
            self._queue_state(P.items_frame(P.EVAL, [code, *items]))
        return self

    def send_arg(self, *args: bytes | str | bytearray | memoryview) -> Self:
        """Queue arguments for ``run``'s function: octets arrive as bytes, text as str.

        Raises:
            TypeError: an argument is neither bytes-like nor str; nothing is queued.
        """
        items = _check_items(args)
        with self._lock:
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
            TypeError, ValueError: a handle is not a descriptor or is closed.
            OSError: a descriptor could not be duplicated (EBADF, EMFILE).
        """
        fds = [_fileno(h) for h in handles]
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))  # non-inheritable by default
        except OSError:
            P.close_fds(dups)
            raise
        with self._lock:
            try:
                self._usable()
            except Error:
                P.close_fds(dups)
                raise
            _fds.hold(self)
            for i in range(0, len(dups), P.MAX_FDS):
                chunk = dups[i : i + P.MAX_FDS]
                self._queue_state(P.fh_frame(len(chunk)), chunk)
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
        with self._lock:
            self._usable()
            reports = self._reports
            child = None
            if reports is not None and self._ahead:
                child = reports.take(self)
                if child is None:
                    reports.pump(0)
                    child = reports.take(self)
            if child is None:
                child = self._fork_now()
            try:
                self._spawn_ahead()
            except Error:
                child._close()
                raise
        reports = self._reports
        assert reports is not None
        reports.pump(0)  # keep the channel from filling up
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
        with self._lock:
            self._usable()
            self._ahead = n
            reports = self._reports
            if n == 0:
                if reports is not None:
                    with reports.cond:
                        reports.spawning.clear()  # those still coming are let go on arrival
                    reports._drop_pool()
                return self
            self._spawn_ahead()
        return self

    def _fork_now(self) -> Process:
        """FORK: the caller makes the socketpair; the template forks now."""
        try:
            mine, theirs = socket.socketpair()
        except OSError as e:
            raise Error(f"fork(): no socketpair for the new process: {e}") from e
        _fds.plain(mine, theirs)
        fds = [theirs.detach()]
        try:
            reports, new_reports = self._report_channel(fds)
        except Error:
            mine.close()
            P.close_fds(fds)
            raise
        seq = reports.next_seq
        reports.next_seq = seq + 1
        child = Process(_TOKEN, mine, parent=self, seq=seq)
        reports.children[seq] = weakref.ref(child)
        self._out.put(P.fork_frame(seq, new_reports), fds)
        try:
            self._flush()
        except ProcessExitedError as e:
            child._close()
            raise TemplateDiedError(f"template {e}") from e
        except Error:
            child._close()
            raise
        return child

    def _queue_state(self, parts: list[P.Buffer], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a command that changes the state a fork copies (caller holds _lock).

        Processes forked ahead have the old state: they are let go, and the
        next ``fork`` forks their replacements from the new one.
        """
        self._out.put(parts, fds)
        reports = self._reports
        if reports is not None:
            reports.version += 1
            with reports.cond:
                reports.spawning.clear()  # those still coming are stale: dropped on arrival
            reports._drop_pool()

    def _report_channel(self, fds: list[int]) -> tuple[_Reports, bool]:
        """This template's report channel, made now (its end added to ``fds``
        for the frame to carry) if this is the first fork (caller holds _lock)."""
        reports = self._reports
        if reports is not None:
            return reports, False
        try:
            rmine, rtheirs = socket.socketpair()
        except OSError as e:
            raise Error(f"no socketpair for the report channel: {e}") from e
        _fds.plain(rmine, rtheirs)  # reads here are non-blocking by flag: a timeout would wait first
        fds.append(rtheirs.detach())
        reports = self._reports = _Reports(rmine)
        return reports, True

    def _spawn_ahead(self) -> None:
        """Ask the template for what is missing of its processes forked ahead
        (caller holds _lock)."""
        reports = self._reports
        missing = self._ahead
        if reports is not None:
            missing -= len(reports.pool) + len(reports.spawning)
        for _ in range(missing):
            fds: list[int] = []
            reports, new_reports = self._report_channel(fds)
            seq = reports.next_seq
            reports.next_seq = seq + 1
            with reports.cond:
                reports.spawning[seq] = reports.version
            self._out.put(P.spawn_frame(seq, new_reports), fds)
        try:
            self._flush()
        except ProcessExitedError as e:
            raise TemplateDiedError(f"template {e}") from e

    # --- run ------------------------------------------------------------------

    def _start_run(self, func: object) -> socket.socket:
        name = _func_name(func)
        with self._lock:
            sock = self._usable()
            self._out.put(P.run_frame(name))
            return sock

    def _finish_run(self, sock: socket.socket) -> None:
        self._spent = "run"
        self._sock = None
        _fds.disown(sock)
        if self._reports is not None:
            self._reports.handed_over = True
            self._reports._drop_pool(final=True)  # no fork() will hand them out now

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
            ProcessStateError: the process was already run or closed.
            ProcessExitedError: it exited before taking every command.
            TemplateDiedError: its template died before forking it.
        """
        sock = self._start_run(func)
        with self._lock:
            self._flush()
            self._finish_run(sock)
        try:
            self._await_pid()
        except BaseException:
            sock.close()
            raise
        return sock

    async def run_async(self, func: str | Callable[..., Any]) -> socket.socket:
        """``run`` for asyncio: writes never block the event loop.

        Returns:
            The caller's end of the socketpair, non-blocking, close-on-exec.
        """
        from . import _aio

        return await _aio.run(self, self._start_run(func))

    def _await_pid(self) -> int:
        if self._pid is not None:
            return self._pid
        parent = self._parent
        assert parent is not None
        reports = parent._reports
        assert reports is not None
        reports.wait_until(lambda: self._pid is not None or self._failed is not None, None)
        return self._check_pid(reports)

    def _check_pid(self, reports: _Reports) -> int:
        if self._pid is not None:
            return self._pid
        assert self._parent is not None
        if self._failed is not None:
            raise Error(f"{self._parent._describe()} could not fork: {self._failed}")
        raise self._parent._template_error(reports, f"; no pid for {self._describe()}")

    def _template_error(self, reports: _Reports, detail: str = "") -> Error:
        """Why this template can't answer any more, as the error to raise."""
        message = f"template {self._describe()} {reports.describe_end()}{detail}"
        if reports.corrupt:
            return ProtocolError(message)
        if reports.handed_over:
            return ProcessStateError(message)
        return TemplateDiedError(message)

    # --- status -------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process id, for every process anyfork made.

        Known once ``run`` returned, and at once for processes the caller
        spawned itself and those the default template forked ahead; reading
        it earlier on another forked process blocks until its template
        reports it.
        """
        self._mine()
        if self._pid is None:
            self._await_pid()
        assert self._pid is not None
        return self._pid

    @property
    def returncode(self) -> int | None:
        """The exit status once known, else None (subprocess's convention:
        negative for a signal).  Never blocks."""
        self._mine()
        self._status(0)
        return self._returncode

    def _status(self, timeout: float | None) -> None:
        """Update ``_returncode``, waiting up to ``timeout``."""
        if self._returncode is not None:
            return
        d = self._direct
        if d is not None:
            if timeout == 0:
                d.poll()
            else:
                d.wait(timeout)
            if d.lost:
                raise ExitStatusLostError(
                    f"the exit status of {self._describe()} was collected by someone else "
                    "(SIGCHLD ignored, or a handler reaping with waitpid(-1))")
            self._returncode = d.returncode
            return
        parent = self._parent
        assert parent is not None
        reports = parent._reports
        assert reports is not None
        finished = reports.wait_until(
            lambda: self._returncode is not None or self._failed is not None or self._lost, timeout)
        if self._returncode is not None:
            return
        if self._lost:
            raise ExitStatusLostError(
                f"{self._describe()} exited, but code run in its template {parent._describe()} "
                "collected its status (os.wait, a SIGCHLD handler, a child watcher)")
        if self._failed is not None:
            raise Error(f"{parent._describe()} could not fork: {self._failed}")
        if reports.sock is None:
            raise parent._template_error(
                reports, f", so the exit status of {self._describe()} can't be known")
        if not finished and timeout != 0:
            raise TimeoutExpired(f"{self._describe()} still running after {timeout} s")

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit status (negative: killed by that signal).

        Raises:
            TimeoutExpired: still running after ``timeout`` seconds.
            TemplateDiedError: its template died, so no status will come.
            ProcessStateError: its template ran a function, which now owns it.
            ExitStatusLostError: someone else reaped it.
        """
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0")
        self._mine()
        if self._direct is None and self._parent is not None:
            with self._parent._lock:
                if self._parent._sock is not None:
                    self._parent._flush()
        self._status(timeout)
        if self._returncode is None:  # timeout 0, still running
            raise TimeoutExpired(f"{self._describe()} still running after {timeout} s")
        return self._returncode

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
        if self.returncode is not None:
            return
        if self._direct is not None:
            self._direct.signal(sig)
            return
        parent = self._parent
        assert parent is not None
        with parent._lock:
            if parent._sock is None or parent._spent is not None:
                raise ProcessStateError(
                    f"can't signal {self._describe()} safely: its template was {parent._spent or 'closed'}")
            parent._out.put(P.kill_frame(self._seq, sig))
            try:
                parent._flush()
            except Error as e:
                reports = parent._reports
                if reports is not None and reports.ended is not None:
                    raise parent._template_error(reports) from e
                raise

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        """Drop the process before run: it exits.  After run: does nothing.

        Descriptors queued with send_fh are closed.  Idempotent.
        """
        if self._gen != runtime.generation:
            return
        runtime.reap_directs()
        with self._lock:
            if self._spent is None:
                self._spent = "closed"
            self._close()
        reports = self._reports
        if reports is not None:
            # What it forked ahead would never be handed out: let it go, with
            # what is still on its way (the template answers the SPAWNs it
            # already read before it sees EOF, so this wait is short).
            reports._drop_pool(final=True)
            reports.wait_until(lambda: not reports.spawning, 1.0)

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
            self._close()
            if self._reports is not None:
                self._reports.close()
        except Exception:
            pass


# --- constructors -----------------------------------------------------------------------

# How many processes the default template keeps forked ahead and connected,
# ready for new().  Each idle one costs about a megabyte of private memory.
_POOL = 3
_MAX_AHEAD = 64  # fork_ahead's limit: past that it is a pool's job, not a template's


def _check_supported() -> None:
    if _UNSUPPORTED:
        from ._errors import UnsupportedError

        raise UnsupportedError(f"anyfork can't work here: {_UNSUPPORTED}")


def new_exec() -> Process:
    """A new process running a fresh interpreter.

    Slower than :func:`new` and shares no memory, but needs no template.
    The process sees the caller's ``sys.path`` as of this call.  Started with
    ``posix_spawn``: the caller never forks.  If ``anyfork.early`` was
    imported, the process is forked from the early process instead.

    Raises:
        anyfork.Error: no interpreter to start, or the spawn failed.
    """
    _check_supported()
    runtime.reap_directs()
    early = runtime.early
    if early is not None and _template_alive(early):
        proc = early.fork()
        _send_path(proc, runtime.early_site)  # the early process has sys.path as of its fork
        return proc
    try:
        mine, theirs = socket.socketpair()
    except OSError as e:
        raise Error(f"new_exec(): no socketpair for the new process: {e}") from e
    _fds.plain(mine, theirs)
    try:
        pid = _exec.spawn(theirs.fileno(), sys.path)
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    proc = adopt(mine, pid)
    _send_path(proc, [])
    return proc


def adopt(sock: socket.socket, pid: int) -> Process:
    """The Process for a child the caller started itself (and must reap),
    serving commands on the other end of ``sock``."""
    direct = _Direct(pid)
    runtime.directs[pid] = direct
    return Process(_TOKEN, sock, direct=direct)


def _send_path(proc: Process, known_site: list[str]) -> list[str]:
    """Queue the caller's sys.path, and the site directories it needs that
    the process doesn't know yet; returns every site directory it now knows."""
    path = list(sys.path)
    proc._queue_state(P.items_frame(P.PATH, path))
    _, extra = _exec.site_plan(path)
    new = [d for d in extra if d not in known_site]
    if new:
        proc._queue_state(P.items_frame(P.SITE, new))
    return known_site + new


def _template_alive(tpl: Process) -> bool:
    if tpl._sock is None:
        return False
    reports = tpl._reports
    if reports is not None and reports.ended is not None:
        return False
    d = tpl._direct
    return d is None or not d.poll()


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
            with tpl._lock:  # it has sys.path as of its fork; bring it up to date
                rt.default_site = rt.early_site[:] = _send_path(tpl, rt.early_site)
        else:
            tpl = new_exec()  # it queues PATH and SITE
            rt.default_site = _exec.site_plan(sys.path)[1]
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
    _check_supported()
    for attempt in (1, 2):
        tpl = _default_template()  # reaps on the way, like every call into anyfork
        try:
            proc = tpl.fork()
        except (TemplateDiedError, ProcessExitedError, ProcessStateError):
            if attempt == 2:
                raise
            continue
        if sys.path != runtime.default_path:
            _send_path(proc, runtime.default_site)
        return proc
    raise AssertionError("unreachable")  # pragma: no cover

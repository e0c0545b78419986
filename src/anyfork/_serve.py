"""The serve loop: what every process anyfork creates runs until ``run``.

Theory of operation
-------------------
A process starts in one of four ways: exec'd fresh by ``new_exec``
(``_boot.main``, reached through a one-line bootstrap that imports only that
module, this one and ``_protocol``), started over a pipe pair with this
module and ``_protocol`` sent as source (``serve_pipes``, see ``_stage1``;
no descriptor passing there, so no FH, FORK or SPAWN), forked by a template
serving a ``FORK`` command (the
caller made the socketpair and sent one end along), or forked ahead by a
template serving ``SPAWN`` (the template made the socketpair and sends the
caller its end with the pid, so the process is ready before it is asked
for).  In each case it ends up in
``Server.serve``, reading commands from its transport (a socket, or a
``PipeSocket``) one frame at a time and never past the frame it is working
on: after ``RUN`` the transport belongs to the user's function, byte for
byte.

Commands change the process's state (``sys.path``, imported modules, the
``__main__`` namespace, the list of arguments for ``run``).  ``FORK`` clones
the process with that state: the child swaps its command socket for the new
one and goes on serving; the parent, now a *template*, reports the child's
pid on its report channel, reaps it when it exits (SIGCHLD wakes the loop
through ``signal.set_wakeup_fd``) and reports the exit status.  Only the
template, as the parent, can name a child's pid without racing pid reuse, so
``KILL`` is a command to the template rather than a signal from the caller.

The caller keeps a few SPAWNed processes of the default template in
hand and asks for a replacement as it hands one out, so ``new()`` waits
neither for a fork nor for a round trip to the template.

Before forking, a template flushes stdio and freezes the garbage collector's
view of its heap (``gc.freeze``): the child's collections then leave the
inherited objects, and so the pages they live on, alone.

Errors: a malformed stream prints "stream corrupted" and exits with status 2
without executing anything more; an exception in eval, require, name lookup
or the function prints its traceback and exits with status 1; one that came
before the function ran is also sent, as one FAILURE record, to the
caller's failure sink (``failure_fd``; see _protocol), which is closed
before the function is called.  Either way
the process first drains what is queued on its socket, so the caller sees
EOF rather than a reset.  A traceback goes out in one write, headed by the
pid and what the process was doing, without anyfork's own frames, or to a
``sys.excepthook`` the user set.  A stream that ends inside a frame (the
caller stopped writing part-way: a cancelled ``run_async``) ends the process
quietly, with status 2.

This module imports the standard library and ``_protocol`` only.
"""

from __future__ import annotations

import _socket
import atexit
import gc
import os
import socket
import sys

from . import _protocol as P

# Not "from typing import ...": typing pulls in re, contextlib and more, which
# every forked process would then carry.  mypy honours a bare TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from typing import Any, NoReturn
else:
    # The C module: signal.py's wrappers convert every result to an enum,
    # touching (and, after a fork, copying) far more memory than the call.
    import _signal


_ANC_SPACE = _socket.CMSG_SPACE(P.MAX_FDS * 4)
_RECV_FLAGS = getattr(_socket, "MSG_CMSG_CLOEXEC", 0)
_SEND_FLAGS = getattr(_socket, "MSG_NOSIGNAL", 0)
_CTRUNC = getattr(_socket, "MSG_CTRUNC", 8)
_DONTWAIT = getattr(_socket, "MSG_DONTWAIT", 0x40)
_SOL_SOCKET = _socket.SOL_SOCKET
_SCM_RIGHTS = _socket.SCM_RIGHTS
_MAX_READ = 1 << 20

# The serve loop works on the C socket type (_socket.socket): its methods
# are C calls, where socket.socket's close() and friends are Python code.
# run() wraps the command socket in a socket.socket for the user.
Sock = _socket.socket


class _CorruptError(Exception):
    pass


_FD = __import__("struct").Struct("i")


_NO_FDS: list[int] = []

# A process's first command read without a decoder (see _first_command): the
# longest RUN name taken that way.
_HSIZE = P.HEADER.size
_FIRST_RUN_MAX = 4096


def _stdlib_socket_class(cls: object) -> bool:
    """Whether ``cls`` is socket.py's own class.  When something has replaced
    socket.socket (gevent, eventlet: before anyfork was imported, or in code
    run here), children make their function's socket themselves, of whatever
    class socket.socket is then, as run() always did."""
    return (isinstance(cls, type) and issubclass(cls, Sock) and cls.__module__ == "socket"
            and cls.__qualname__ == "socket")


def _recv(sock: Sock, n: int) -> tuple[bytes, list[int]]:
    """Up to ``n`` bytes and the descriptors that came with them: the serve
    side's one recvmsg.  The list is shared when empty: don't change it.
    Raises _CorruptError if descriptors were lost (MSG_CTRUNC)."""
    data, anc, flags, _ = sock.recvmsg(n, _ANC_SPACE, _RECV_FLAGS)
    if not anc and not flags & _CTRUNC:
        return data, _NO_FDS
    return data, _fds_of(anc, flags)


def _blocking(sock: Sock) -> Sock:
    """``sock``, blocking: socket.setdefaulttimeout() in code run here would
    have given a new socket object a timeout (and its descriptor O_NONBLOCK)."""
    if sock.gettimeout() is not None:
        sock.setblocking(True)
    return sock


def _fds_of(anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """The descriptors that came with a message (raises if some were lost)."""
    fds = P.unpack_fds(anc, _SOL_SOCKET, _SCM_RIGHTS)
    if not _RECV_FLAGS:
        for fd in fds:
            os.set_inheritable(fd, False)
    if flags & _CTRUNC:
        P.close_fds(fds)
        raise _CorruptError("descriptors lost in transit (MSG_CTRUNC: out of descriptors?)")
    return fds


def _wrap_fd(fd: int) -> object:
    """A received descriptor as the object ``run``'s function gets."""
    st = os.fstat(fd)
    if st.st_mode & 0o170000 == 0o140000:  # S_ISSOCK
        return socket.socket(fileno=fd)
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    acc = flags & getattr(os, "O_ACCMODE", 3)
    if acc == os.O_RDONLY:
        mode = "rb"
    elif acc == os.O_WRONLY:
        mode = "ab" if flags & os.O_APPEND else "wb"
    else:
        mode = "r+b"
    try:
        return open(fd, mode, buffering=0)  # ownership passes to the function
    except OSError:
        return fd  # directories, O_PATH and the like: the bare descriptor


#: What this process's serve loop is doing that runs code not anyfork's
#: (importing a module for ``require`` or ``run``, running ``eval``'d code),
#: while it does it; None otherwise.  anyfork's caller side reads it: a
#: process still being prepared must not create processes, or a script that
#: imports itself without an ``if __name__ == "__main__":`` guard forks
#: without end.  Written only around such code, never on the fast paths.
preparing: str | None = None

#: The sending end of the caller's failure sink (see _protocol's "Failures
#: before the function"), or -1 where there is none (a remote host).  Set
#: once, where the process starts; a forked child inherits it.
failure_fd = -1


def _import(modname: str) -> object:
    """The module, from sys.modules when it is there (the common case, and
    cheaper than touching importlib in a freshly forked process)."""
    # `in` and [], not sys.modules.get, which on free-threaded CPython takes
    # the dict's lock: a lock another thread held (or was handed) at a fork
    # stays held in the child, and a template forked with allow_threads=True
    # would wait for it for ever here.
    modules = sys.modules
    module = modules[modname] if modname in modules else None  # noqa: SIM401
    if module is None:
        global preparing
        before, preparing = preparing, f"importing {modname!r}"
        try:
            __import__(modname)
        finally:
            preparing = before
        module = sys.modules[modname]
    return module


_MISSING = object()


def _mainmod() -> Any:
    """The ``_mainmod`` module beside this one (MAIN: a function of the
    caller's main script is to run here).  Loaded from its file when this
    process has not imported it: an exec'd process has only the serve
    loop's modules, and importing the package would load all of anyfork."""
    name = f"{__package__}._mainmod"
    module = sys.modules.get(name)
    if module is None:
        import importlib.util

        path = os.path.join(os.path.dirname(__file__ or "."), "_mainmod.py")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None or not os.path.exists(path):
            raise ImportError("the caller's main module can't be used here (no anyfork._mainmod)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def resolve(name: str, namespace: dict[str, object]) -> Callable[..., object]:
    """Find the function ``run`` names: "mod:attr", "pkg.mod.attr" or "name".

    A bare "name" is looked up in the process's ``__main__`` only.

    A dotted name is walked forward from its first component, which must be
    a module, as ``pkgutil.resolve_name`` does: each next component is the
    submodule already in sys.modules, else an attribute, else (on a
    package) a submodule to import.  So "socket.socket.close" imports
    nothing when socket is loaded, and never tries "socket.socket.close" or
    "socket.socket" as modules: a failed import searches the whole sys.path,
    and in a freshly forked process each step of it is copy-on-write faults.
    """
    if ":" in name:
        modname, _, attrs = name.partition(":")
        obj: object = _import(modname)
        path = attrs.split(".")
    else:
        path = name.split(".")
        modname = path[0]
        if len(path) == 1:
            # A bare name is the process's __main__'s, and only that: a name
            # missing there silently becoming a builtin of the same name
            # ("print") hid the user's mistake.
            if name in namespace:
                return namespace[name]  # type: ignore[return-value]
            import builtins

            hint = f"; a builtin is named 'builtins:{name}'" if hasattr(builtins, name) else ""
            raise NameError(f"name {name!r} is not defined in the process's __main__{hint}")
        try:
            obj = _import(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise  # it exists, and failed to import: that is the error
            raise ModuleNotFoundError(f"no module found for {name!r}", name=modname) from None
        modules = sys.modules
        module_type = type(sys)
        rest = 1  # path[:rest] is walked
        while rest < len(path):
            attr = path[rest]
            sub = modname + "." + attr
            found: object = modules[sub] if sub in modules else None  # noqa: SIM401
            if found is None:
                found = getattr(obj, attr, _MISSING)
                if found is _MISSING:
                    if not hasattr(obj, "__path__"):
                        break  # not a package: the getattr below says what is missing
                    try:
                        found = _import(sub)
                    except ModuleNotFoundError as e:
                        if e.name != sub:
                            raise  # a submodule that exists but fails to import
                        break
                elif not isinstance(found, module_type):
                    obj = found
                    rest += 1
                    break  # past the modules: the rest are attributes
                else:
                    sub = getattr(found, "__name__", sub)  # a module bound under another name
            obj, modname = found, sub
            rest += 1
        path = path[rest:]
    for attr in path:
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"{name!r} is not callable")
    return obj


class _Template:
    """The state a process acquires when it is first forked from."""

    __slots__ = (
        "backlog",
        "pid_of",
        "poller",
        "reports",
        "seq_of",
        "unreaped_commands",
        "wake_r",
        "wake_w",
        "watching_out",
    )

    def __init__(self, reports: Sock) -> None:
        self.reports = reports
        self.seq_of: dict[int, int] = {}  # pid -> seq, for children not yet reaped
        self.pid_of: dict[int, int] = {}  # seq -> pid
        self.poller: Any = None  # select.poll, made on first use
        self.unreaped_commands = 0
        # Reports the channel had no room for, each with the descriptor it
        # carries (-1 for none; owned here until sent).  A template never
        # blocks on a caller that isn't reading: it goes on serving commands
        # (close among them) and flushes this when the channel is writable.
        self.backlog: list[tuple[bytes, int]] = []
        self.watching_out = False  # the poller waits for room on the channel
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self.arm()

    def arm(self) -> None:
        """Set up what the reaper relies on: SIGCHLD caught, not blocked, and
        waking the loop through our pipe.

        Code run in a template (eval, require) can undo any of it: SIGCHLD
        ignored (the kernel then reaps and the status is gone), SIGCHLD
        blocked, or the wakeup fd moved (``asyncio.run`` sets its own and
        clears it when its loop closes).  Then no exit would ever wake the
        loop, and a caller's ``wait()`` would wait for ever.  So this runs
        again after every such command, and wakes the loop once: exits that
        came meanwhile are reaped (or reported lost) now.
        """
        _signal.signal(_signal.SIGCHLD, _on_sigchld)
        sigmask = getattr(_signal, "pthread_sigmask", None)
        if sigmask is not None:
            sigmask(_signal.SIG_UNBLOCK, (_signal.SIGCHLD,))
        _signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def report(self, data: bytes, fd: int = -1) -> None:
        """Send a report (with ``fd``, which this takes over) or queue it."""
        if self.backlog:
            self.backlog.append((data, fd))
        else:
            self._send(data, fd)

    def _send(self, data: bytes, fd: int) -> bool:
        """Send what the channel takes now; queue the rest.  False if it's full."""
        try:
            if fd >= 0:
                n = self.reports.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, _FD.pack(fd))],
                                       _SEND_FLAGS | _DONTWAIT)
            else:
                n = self.reports.send(data, _SEND_FLAGS | _DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError:
            n = len(data)  # the caller stopped listening; it finds out from EOF
        if n and fd >= 0:
            os.close(fd)  # it went with the first byte
            fd = -1
        if n == len(data):
            return True
        self.backlog.insert(0, (data[n:], fd))
        return False

    def flush(self) -> None:
        """Send the backlog, as far as the channel takes it."""
        backlog, self.backlog = self.backlog, []
        for i, (data, fd) in enumerate(backlog):
            if not self._send(data, fd):
                self.backlog.extend(backlog[i + 1 :])
                return

    def settle(self, seconds: float) -> None:
        """Before the process runs a function: report the children that have
        exited already, and get the backlog to the caller (who reads the
        channel to its end after run(): ``last_reports_op``), waiting for the
        channel at most ``seconds`` in all.  Statuses it held back would be
        lost with the template role."""
        import select
        import time

        self.reap(True)
        self.flush()
        deadline = time.monotonic() + seconds
        poller = None
        while self.backlog:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller is None:
                poller = select.poll()
                poller.register(self.reports.fileno(), select.POLLOUT)
            poller.poll(int(left * 1000) + 1)
            self.flush()

    def close(self) -> None:
        """Give up the template role: in a child, or when the process runs."""
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.reports.close()
        if self.backlog:
            for _, fd in self.backlog:
                if fd >= 0:
                    os.close(fd)  # the caller's end of a process forked ahead: keep no copy
            self.backlog = []

    def reap(self, thorough: bool) -> None:
        """Reap those of our children that exited and report their statuses.

        Code eval'd in a template may run children of its own (subprocess);
        waitpid(-1) would steal their statuses.  So peek at the first zombie
        with WNOWAIT and reap it only if it is ours.  When someone else's is
        first in line, or none of ours was waiting (a SIGCHLD still came: one
        of ours may have been reaped behind our back, by os.wait() or a child
        watcher in code run here), or there is no waitid, ask ours one by one;
        one that is no longer our child is reported LOST.  ``thorough``: code
        not anyfork's runs here, so ask ours one by one every time.

        The statuses go out in one send: this runs between forks, where every
        object touched costs a copy-on-write fault.
        """
        try:
            os.read(self.wake_r, 4096)  # more left: the loop wakes once more
        except OSError:
            pass
        seq_of = self.seq_of
        reports = []
        waitid = _waitid
        blocked = waitid is None
        while seq_of and waitid is not None:
            try:
                info = waitid(os.P_ALL, 0, _PEEK)
            except ChildProcessError:
                blocked = True  # no children at all: ours, if any, were taken
                break
            if info is None:
                break
            seq = seq_of.pop(info.si_pid, 0)
            if not seq:
                blocked = True  # someone else's is first in line: ours may wait behind it
                break
            reports.append(self._reaped(info.si_pid, seq, 0))
        if blocked or thorough or not reports:
            for pid in list(seq_of):
                reports.append(self._reaped(pid, seq_of[pid], os.WNOHANG))
        data = reports[0] if len(reports) == 1 else b"".join(reports)
        if data:
            self.report(data)

    def _reaped(self, pid: int, seq: int, options: int) -> bytes:
        """Collect ``pid``'s status; the report to send (b"" if it is still running)."""
        try:
            got, status = os.waitpid(pid, options)
        except ChildProcessError:
            report = P.lost_report(seq, pid)  # reaped behind our back
        else:
            if not got:
                return b""
            report = P.exit_report(seq, os.waitstatus_to_exitcode(status))
        self.seq_of.pop(pid, None)
        del self.pid_of[seq]
        return report


_waitid = getattr(os, "waitid", None)
_PEEK = getattr(os, "WEXITED", 4) | getattr(os, "WNOHANG", 1) | getattr(os, "WNOWAIT", 0x1000000)


def _rehearse_child(namespace: dict[str, object]) -> None:
    """Make, in a template, the attribute lookups its forked children make.

    CPython caches attribute lookups on types in a table shared by the whole
    process (the type attribute cache).  A child that makes a lookup the
    template never made misses the cache and writes the entry: a page of
    that table, and the reference counts of two name strings, each a
    copy-on-write fault in a process that has just forked (measured: about
    20 of a child's 170).  Made here once, the entries are in the pages the
    child inherits, and its lookups only read them.

    ``_CHILD_LOOKUPS`` lists what the path from ``Server._fork`` (child side)
    through ``_first_command``, ``run``, ``_fresh_signals`` and ``_exit``
    looks up.  Out of step with that code, this only costs speed.
    """
    for obj, names in _CHILD_LOOKUPS:
        for name in names:
            getattr(obj, name, None)
    resolve("builtins:id", namespace)
    resolve("builtins.id", namespace)  # the dotted walk, as "socket.socket.close" takes it
    P.decode_text(b"x")
    P.match_run(P.HEADER.pack(P.VERSION, P.RUN, 0, 1))
    int.from_bytes(b"\x01", "little")


def _on_sigchld(signum: int, frame: object) -> None:
    pass  # the wakeup fd does the work; the loop reaps


# --- transports -----------------------------------------------------------------------
#
# The loop reads its commands from a *transport*: an object with the few
# socket methods it uses (recvmsg, fileno, setblocking, detach or close).
# A local AF_UNIX socket is one as it is, and passes descriptors with
# SCM_RIGHTS.  A PipeSocket is one over a pair of pipes (ssh's stdin and
# stdout): bytes only, so a process served over it refuses FH, FORK and
# SPAWN at their header ("command refused", status 2).  After RUN, the
# function gets the transport to talk over: a socket.socket made of the
# socket, or the PipeSocket itself.


class PipeSocket:
    """A byte stream over two pipe ends, with the socket methods the serve
    loop and a function usually call.

    ``recv``/``recvmsg`` read the read end, ``send``/``sendall`` write the
    write end; ``shutdown(SHUT_WR)`` closes the write end, so the peer reads
    EOF; ``close`` closes both.  It owns both descriptors.  No descriptor
    passing: ``recvmsg`` never returns ancillary data.
    """

    __slots__ = ("_r", "_w")

    def __init__(self, rfd: int, wfd: int) -> None:
        self._r = rfd
        self._w = wfd

    def fileno(self) -> int:
        return self._r

    def recvmsg(
        self, bufsize: int, ancbufsize: int = 0, flags: int = 0
    ) -> tuple[bytes, list[Any], int, None]:
        return os.read(self._r, bufsize), [], 0, None  # the loop's read: never any descriptors

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return os.read(self._r, bufsize)

    def send(self, data: bytes, flags: int = 0) -> int:
        return os.write(self._w, data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._w, view) :]

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self._r, flag)

    def shutdown(self, how: int) -> None:
        if how in (_socket.SHUT_WR, _socket.SHUT_RDWR) and self._w >= 0:
            os.close(self._w)
            self._w = -1
        if how in (_socket.SHUT_RD, _socket.SHUT_RDWR) and self._r >= 0:
            os.close(self._r)
            self._r = -1

    def close(self) -> None:
        # -1 once closed: a stale number then raises EBADF, never hits a file
        # that has the number since.
        fds, self._r, self._w = (self._r, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> PipeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_pipes(rfd: int = 0, wfd: int = 1) -> NoReturn:
    """Serve commands read from ``rfd``; reply to nobody until RUN.

    The entry point of a process whose caller reaches it over a pipe pair
    (``_stage1`` calls it with its stdin and stdout).  The function that RUN
    names gets a ``PipeSocket`` over ``rfd``/``wfd``.  When those are stdin
    and stdout, the loop moves them to descriptors of its own and leaves
    stdin reading /dev/null and stdout writing to stderr, so that what code
    run here prints can't land in the stream.
    """
    r, w = os.dup(rfd), os.dup(wfd)  # close-on-exec, and off 0 and 1
    for fd in {rfd, wfd}:
        if fd == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        elif fd == 1:
            _flush_stdio()
            os.dup2(2, 1)
        elif fd > 2:
            os.close(fd)
    os.set_blocking(r, True)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # as _boot.main: run() restores it
    Server(PipeSocket(r, w), passes_fds=False).serve()


class Server:
    """One process's serve loop.  ``serve()`` never returns."""

    __slots__ = ("child_sock", "decoder", "inherited_signals", "items", "namespace", "pid", "seq",
                 "sock", "template", "user_code")

    def __init__(self, sock: Sock | PipeSocket, passes_fds: bool = True) -> None:
        """``sock``: the transport, a socket (of whatever class socket.socket
        is: gevent's is no _socket.socket) or a ``PipeSocket``;
        ``passes_fds``: whether it carries descriptors."""
        self.sock: Sock = sock  # type: ignore[assignment]  # a PipeSocket has what the loop uses
        # A byte stream without descriptor passing refuses the commands that
        # carry descriptors at their header (see P.without_fds).
        table = P.COMMAND_TABLE if passes_fds else P.without_fds(P.COMMAND_TABLE, "a pipe pair")
        self.decoder = P.Decoder(table)
        self.items: list[object] = []
        self.namespace: dict[str, object] = sys.modules["__main__"].__dict__
        self.template: _Template | None = None
        # The process this loop serves: a fork made by code run here (os.fork,
        # multiprocessing) inherits the loop but is not it (see serve).
        self.pid = os.getpid()
        # Its number in the template that forked it (0: the caller spawned
        # it), which names it in a failure record.
        self.seq = 0
        # Set in a process forked from a program (fork_template, early): it
        # carries that program's signal handlers and mask, which run() must
        # reset in full.  Exec'd templates start with default dispositions.
        self.inherited_signals = False
        # Code not anyfork's may have run here (eval, require, .pth hooks, a
        # program that forked itself): stdio may hold output to flush before
        # each fork.  Only main() knows better, and says so.
        self.user_code = True
        # The socket.socket a forked child's function gets, made ready by this
        # template before the fork (see _child_socket): making one costs a new
        # process some thirty copy-on-write faults, re-initialising this one
        # costs the template a C call.  None until the process first forks,
        # and in a child.
        self.child_sock: socket.socket | None = None

    # --- reading -------------------------------------------------------------

    def next_frame(self) -> P.Frame | None:
        """The next command, or None at a clean EOF."""
        dec = self.decoder
        while True:
            frame = dec.next_frame()
            if frame is not None:
                return frame
            data, fds = _recv(self.sock, min(dec.wanted(), _MAX_READ))
            if not data:
                P.close_fds(fds)
                dec.eof()
                return None
            dec.feed(data, fds)

    # --- the loop ------------------------------------------------------------

    def serve(self) -> NoReturn:
        """Serve commands until RUN or EOF."""
        try:
            while True:
                if self.template is not None and self.decoder.idle():
                    self._template_loop()
                frame = self.next_frame()
                if frame is None:
                    _exit(0, run_atexit=False)
                self.handle(frame)
        except SystemExit as e:
            if os.getpid() != self.pid:  # a fork of code run here, ending: not ours to drain
                _exit(_exit_code(e))
            _fail(_exit_code(e), None, self.sock)
        except BaseException as e:
            if os.getpid() != self.pid:
                _report(e, "a process forked by code run here")
                _exit(1)
            if isinstance(e, P.TruncatedError):
                # The caller stopped writing part-way, on purpose (a cancelled
                # run_async) or as it died: nothing to say about it.  The
                # status is still that of a stream that was not whole.
                self.decoder.close()
                _fail(2, None, self.sock)
            if isinstance(e, P.RefusedError):
                self.decoder.close()
                _fail(2, f"anyfork: command refused: {e}", self.sock)
            if isinstance(e, (P.ProtocolError, _CorruptError)):
                self.decoder.close()
                _fail(2, f"anyfork: stream corrupted: {e}", self.sock)
            _report(e, "while it was being prepared")
            _send_failure(e, self.seq, False)
            _fail(1, None, self.sock)

    def _first_command(self, sock: Sock) -> None:
        """Read a forked child's first command; if it is RUN, run it now.

        A process forked ahead is most often asked for nothing but RUN.  The
        generic path (decoder, frame, dispatch) would touch a few dozen more
        objects, each a copy-on-write fault in a freshly forked process; this
        reads the one frame with two calls and hands ``run`` the socket.socket
        the template made.  Any other command goes to the decoder, as read.
        """
        ready = None if type(sock) is Sock else sock  # a socket.socket the template made
        data, fds = _recv(sock, _HSIZE)
        length = P.match_run(data)
        if 0 <= length <= _FIRST_RUN_MAX and not fds:
            payload = b""
            while len(payload) < length:
                more, fds = _recv(sock, length - len(payload))
                if fds:
                    P.close_fds(fds)
                    raise _CorruptError("descriptors on a command that takes none")
                if not more:
                    break
                payload += more
            if len(payload) == length:
                self.run(P.decode_text(payload), ready)
            data += payload
        if ready is not None:
            self.sock = _blocking(Sock(fileno=Sock.detach(sock)))
        self.decoder = P.Decoder(P.COMMAND_TABLE)
        self.decoder.feed(data, fds)

    def handle(self, frame: P.Frame) -> None:
        """Serve one command.  The decoder has checked its shape against the
        command table: only FH, FORK and SPAWN come with descriptors."""
        kind = frame.kind
        if kind in (P.FORK, P.SPAWN):
            self.fork(frame)
        elif kind == P.RUN:
            self.run(P.decode_text(frame.payload))
        elif kind == P.KILL:
            self.kill(*P.decode_kill(frame.payload))
        elif kind == P.TIE:
            tie(*P.decode_tie(frame.payload))
        elif kind == P.FH:
            fds, frame.fds = frame.fds, []
            for i, fd in enumerate(fds):
                try:
                    self.items.append(_wrap_fd(fd))
                except BaseException:
                    P.close_fds(fds[i:])
                    raise
        elif kind == P.ARG:
            self.items.extend(P.decode_items(frame.payload))
        elif kind == P.PATH:
            sys.path[:] = P.decode_strs(frame.payload)
        elif kind == P.MAIN:
            where = P.decode_strs(frame.payload)
            if len(where) != 2:
                raise _CorruptError("MAIN takes two items")
            _mainmod().install(where[0], where[1])
        else:  # SITE, REQUIRE, EVAL
            self.user_code = True
            before = _signal_state()
            self._run_code(kind, frame)
            if _signal_state() != before:
                self.inherited_signals = True  # run() resets every signal, as for a program's
            if self.template is not None:
                # Always, not only when the dispositions changed: a wakeup fd
                # moved and put back to -1 (asyncio.run) leaves none changed.
                self.template.arm()
                try:
                    os.write(self.template.wake_w, b"\0")  # reap what exited while unarmed
                except OSError:
                    pass

    def kill(self, seq: int, sig: int) -> None:
        """KILL: signal a process this template forked, if not yet reaped."""
        tpl = self.template
        pid = tpl.pid_of.get(seq) if tpl is not None else None
        if pid is not None:  # not yet reaped, so the pid is still our child's
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def _run_code(self, kind: int, frame: P.Frame) -> None:
        """SITE, REQUIRE or EVAL: the commands that run code not anyfork's."""
        global preparing
        preparing = {P.SITE: "processing site directories", P.REQUIRE: "importing required modules",
                     P.EVAL: "running eval'd code"}[kind]
        try:
            self._run_code_now(kind, frame)
        finally:
            preparing = None

    def _run_code_now(self, kind: int, frame: P.Frame) -> None:
        if kind == P.SITE:
            # Directories the caller gave to site.addsitedir: run their .pth
            # files here too (import hooks), keeping sys.path as PATH set it.
            import site

            path = list(sys.path)
            for directory in P.decode_strs(frame.payload):
                site.addsitedir(directory)
            sys.path[:] = path + [p for p in sys.path if p not in path]
        elif kind == P.REQUIRE:
            for module in P.decode_strs(frame.payload):
                _import(module)
        else:
            items = P.decode_items(frame.payload)
            if not items or not isinstance(items[0], str):
                raise _CorruptError("eval without code")
            self.eval(items[0], tuple(items[1:]))

    def eval(self, code: str, args: tuple[object, ...]) -> None:
        ns = self.namespace
        missing = object()
        saved = ns.get("args", missing)
        ns["args"] = args
        try:
            exec(compile(code, "<anyfork eval>", "exec"), ns)
        finally:
            if saved is missing:
                ns.pop("args", None)
            else:
                ns["args"] = saved

    # --- forking -------------------------------------------------------------

    def _fork(self, seq: int, sock: Sock, mine: Sock | None) -> int:
        """Fork a child to serve ``sock`` (closing ``mine`` there) as ``seq``.

        The pid in the template (its copy of ``sock`` closed, the child
        recorded), 0 in a child that returns (see ``_child``), -1 if the fork
        failed (reported; ``sock`` and ``mine`` closed).
        """
        tpl = self.template
        assert tpl is not None
        if self.user_code:  # else nothing here ever wrote to them
            _flush_stdio()
        gc.freeze()  # keep the child's collections off the shared pages
        try:
            pid = os.fork()
        except OSError as e:
            if mine is not None:
                mine.close()
            Sock.close(sock)
            tpl.report(P.failed_report(seq, f"fork failed: {e}"))
            return -1
        if pid == 0:
            self.seq = seq
            self._child(sock, mine)
            return 0
        Sock.close(sock)
        tpl.seq_of[pid] = seq
        tpl.pid_of[seq] = pid
        return pid

    def _child(self, sock: Sock, mine: Sock | None) -> None:
        """In a child just forked: shed the template role, serve ``sock``.

        Runs its first command straight from here when it is RUN (the process
        then exits: nothing of the template's stack is unwound, or freed).
        Returns when there is more to it; the caller unwinds to the serve
        loop, so that a child forking in turn nests nothing.  Everything a
        freshly forked process runs writes to pages it shares with its
        template, and each such page costs a copy-on-write fault (a few
        microseconds): the steps here are a few C calls.
        """
        self.child_sock = None  # this process's own socket now: not to be re-initialised
        # Ours from the first step: an error from here on ends this process
        # (serve's handlers), never drains the template's socket.
        self.pid = os.getpid()
        template_sock, self.sock = self.sock, sock
        tpl = self.template
        self.template = None
        if mine is not None:
            mine.close()
        if tpl is not None:
            tpl.close()
        template_sock.close()
        atexit._clear()  # the parent's handlers are not ours to run
        self._first_command(sock)

    def _child_socket(self, fd: int, known: bool) -> Sock:
        """The socket a child about to be forked serves, made from ``fd``.

        A socket.socket for its function, normally: one object, re-initialised
        for each child with a C call (the child gets its own copy at the fork;
        the template closes its copy after).  ``known``: ``fd`` is one end of
        a socketpair made here, so the kernel need not be asked what it is.
        Raises OSError if ``fd`` is no socket; ``fd`` is then still the caller's.
        """
        family, kind, proto = (_socket.AF_UNIX, _socket.SOCK_STREAM, 0) if known else (-1, -1, -1)
        cls = socket.socket
        ready = self.child_sock
        if ready is not None and type(ready) is cls:
            sock: Sock = ready
            Sock.__init__(sock, family, kind, proto, fd)
        elif _stdlib_socket_class(cls):
            sock = self.child_sock = cls(family, kind, proto, fd)
        else:
            sock = Sock(family, kind, proto, fd)  # see _stdlib_socket_class
        try:
            if not known:
                sock.setblocking(True)  # a caller's default timeout left it O_NONBLOCK
            return _blocking(sock)
        except OSError:
            Sock.detach(sock)  # the descriptor stays the caller's to close
            raise

    def fork(self, frame: P.Frame) -> None:
        """FORK (the caller made the socket) or SPAWN (fork one ahead, connected)."""
        try:
            seq, new_reports = P.decode_fork(frame.payload)
        except P.ProtocolError:
            frame.close()
            raise
        fds, frame.fds = frame.fds, []
        spawn = frame.kind == P.SPAWN
        if new_reports != (len(fds) == (1 if spawn else 2)):
            P.close_fds(fds)
            raise _CorruptError("fork flags don't match its descriptors")
        if new_reports:
            if self.template is not None:
                P.close_fds(fds)
                raise _CorruptError("second report channel")
            self.template = _Template(_blocking(Sock(fileno=fds.pop())))
            _name_process("af template")
        elif self.template is None:
            P.close_fds(fds)
            raise _CorruptError("fork before any report channel")
        if spawn:
            self._spawn(seq)
        else:
            self._fork_for(seq, fds[0])

    def _spawn(self, seq: int) -> None:
        """Fork a process ahead with a socketpair of its own; send the caller its end.

        The caller keeps a few of these and hands one out at ``new()``: no
        round trip to the template is then on the caller's critical path,
        and the process is already waiting on its socket.
        """
        tpl = self.template
        assert tpl is not None
        try:
            mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors: say so, and go on serving
            tpl.report(P.failed_report(seq, f"no socketpair: {e}"))
            return
        fd = theirs.detach()
        try:
            _blocking(mine)  # the caller's: run() returns it, blocking
            sock = self._child_socket(fd, True)
        except OSError as e:
            os.close(fd)
            mine.close()
            tpl.report(P.failed_report(seq, f"no socket for the new process: {e}"))
            return
        pid = self._fork(seq, sock, mine)
        if pid > 0:
            tpl.report(P.spare_report(seq, pid), mine.detach())

    def _fork_for(self, seq: int, child_fd: int) -> None:
        """Fork a process to serve the command socket the caller sent."""
        tpl = self.template
        assert tpl is not None
        try:
            sock = self._child_socket(child_fd, False)
        except OSError as e:
            os.close(child_fd)
            tpl.report(P.failed_report(seq, f"fork failed: not a socket: {e}"))
            return
        pid = self._fork(seq, sock, None)
        if pid > 0:
            tpl.report(P.pid_report(seq, pid))

    def _template_loop(self) -> None:
        """A template's hot path: FORK and SPAWN, with as little Python as possible.

        A template spends its life forking, and after each fork every page it
        writes costs a copy-on-write fault (a few microseconds each), so this
        loop is one flat function over C calls.  It takes only FORK and SPAWN
        frames of exactly the expected shape.  Anything else (another command, garbage,
        a short read) is fed to the decoder and left to the generic path,
        which owns the errors.  Returns then, or in a forked child.

        Pending commands go before reaping: they are on the caller's critical
        path, an exit report is read lazily.  Reaping still happens at least
        every few commands, so a busy template's zombies don't pile up.
        """
        tpl = self.template
        assert tpl is not None
        _rehearse_child(self.namespace)  # code run since may have pushed those entries out
        sock = self.sock
        sock_fd = sock.fileno()
        recv = _recv
        wake_r = tpl.wake_r
        feed = self.decoder.feed
        poller = tpl.poller
        if poller is None:
            import select

            poller = tpl.poller = select.poll()
            poller.register(sock_fd, select.POLLIN)
            poller.register(wake_r, select.POLLIN)
        poll = poller.poll
        reports_fd = tpl.reports.fileno()
        hsize = P.HEADER.size
        match_fork = P.match_fork
        fork_size = P.FORK_PAYLOAD.size
        match_payload = P.match_fork_payload
        while True:
            if bool(tpl.backlog) != tpl.watching_out:
                tpl.watching_out = not tpl.watching_out
                if tpl.watching_out:
                    poller.register(reports_fd, 4)  # POLLOUT
                else:
                    poller.unregister(reports_fd)
            readable = woken = False
            for fd, _ in poll():
                if fd == sock_fd:
                    readable = True
                elif fd == wake_r:
                    woken = True
                elif fd == reports_fd:
                    tpl.flush()
            if woken and (not readable or tpl.unreaped_commands > 16):
                tpl.unreaped_commands = 0
                tpl.reap(self.user_code)
            if not readable:
                continue
            tpl.unreaped_commands += 1
            data, fds = recv(sock, hsize)
            want_fds = match_fork(data)  # 1: FORK, 0: SPAWN, -1: neither
            if want_fds < 0 or len(fds) != want_fds:
                feed(data, fds)
                return
            payload, more = recv(sock, fork_size)
            seq = match_payload(payload)
            if seq < 0 or more:
                feed(data, fds)
                feed(payload, more)
                return
            if want_fds:
                self._fork_for(seq, fds[0])
            else:
                self._spawn(seq)
            if self.template is None:
                return  # the child of a fork
    # --- run -----------------------------------------------------------------

    def run(self, name: str, sock: Sock | PipeSocket | None = None) -> NoReturn:
        """Call the function ``name`` with the socket and the arguments; exit.

        ``sock``: the socket.socket a forked child's template made ready;
        otherwise the command socket is wrapped in one here.
        """
        if self.template is not None:
            # Our children are the function's now: stop reaping and reporting,
            # once what is known has been reported.  The caller sees EOF on
            # the report channel.
            try:
                self.template.settle(5.0)
            except Exception:
                pass  # what is still unsent is lost, as the caller will say
            self.template.close()
            self.template = None
        try:
            func = resolve(name, self.namespace)
        except Exception as e:
            brief = _raised_by_lookup(e)
            _report(e, f"can't find {name!r} to run", brief=brief)
            _send_failure(e, self.seq, brief)
            _fail(1, None, self.sock)
        if sock is None:
            stream = self.sock
            if isinstance(stream, PipeSocket):
                sock = stream  # the function talks over the pipes as they are
            else:
                sock = socket.socket(fileno=stream.detach())
                sock.setblocking(True)
        _fresh_signals(self.inherited_signals)
        _name_process("af " + name.rpartition(":")[2].rpartition(".")[2])
        # The function must not inherit the failure sink, but a call that
        # fails to bind its arguments is still ours to report: close the
        # sink first unless the signature says the call can't bind.
        sink_open = failure_fd >= 0
        if sink_open and _binds(func, 1 + len(self.items)):
            os.close(failure_fd)
            sink_open = False
        try:
            func(sock, *self.items)
        except SystemExit as e:
            _exit(_exit_code(e), sock=sock)
        except KeyboardInterrupt as e:
            _report(e, name)
            _run_atexit()
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGINT)
            _exit(1, run_atexit=False)
        except BaseException as e:
            _report(e, name)
            if sink_open and _raised_by_call(e):
                _send_failure(e, self.seq, False)
            _exit(1, sock=sock)
        _exit(0, sock=sock)


# The lookups a forked child makes (see _rehearse_child): attribute reads on
# the types its objects have, and on the modules it calls into.
_CHILD_LOOKUPS: tuple[tuple[object, tuple[str, ...]], ...] = (
    (Sock, ("close", "detach", "recvmsg", "recv", "fileno")),
    (socket.socket, ("close", "detach", "recvmsg", "recv", "fileno", "gettimeout")),
    (_Template, ("close", "wake_r", "wake_w", "reports", "backlog")),
    (Server, ("template", "sock", "_child", "_first_command", "run", "namespace", "items",
              "inherited_signals", "decoder", "child_sock", "pid")),
    (bytes, ("startswith", "decode")),
    (str, ("partition", "split", "rpartition", "encode")),
    (dict, ("get",)),
    (int, ("from_bytes",)),
    (os, ("close", "_exit", "getpid", "kill", "open", "write", "O_WRONLY")),
    (sys, ("modules", "stdout", "stderr", "__excepthook__", "excepthook", "exc_info")),
    (atexit, ("_clear", "_run_exitfuncs")),
    (_signal, ("set_wakeup_fd", "signal", "SIGCHLD", "SIGINT", "SIG_DFL", "SIG_IGN",
               "default_int_handler", "pthread_sigmask", "SIG_SETMASK", "valid_signals")),
    (P, ("decode_text", "match_run", "ProtocolError")),
)


def tie(sig: int, owner: int, flags: int) -> None:
    """TIE: get ``sig`` as soon as ``owner`` (a pid; 0: the parent) exits.

    With ``TIE_BY_PARENT`` the owner is the parent, which forks from one
    thread that lives as long as it does (a template): Linux's
    PR_SET_PDEATHSIG, set through ctypes, which the kernel fires when the
    *thread* that forked this process exits.  Otherwise (the owner spawned
    this process from any of its threads, or there is no prctl) a thread
    here waits for the owner's exit, on a pidfd where there is one, else by
    looking at getppid() five times a second.  Either way, an owner already
    gone by now (this process has been handed to another parent) means the
    signal at once.
    """
    if owner == 0:
        owner = os.getppid()
    if flags & P.TIE_BY_PARENT and _set_pdeathsig(sig):
        if os.getppid() != owner:  # it died before the kernel was asked to tell us
            os.kill(os.getpid(), sig)
        return
    import threading

    threading.Thread(target=_watch_owner, args=(owner, sig), name="anyfork tie", daemon=True).start()


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(1, sig, 0, 0, 0) == 0)  # PR_SET_PDEATHSIG
    except Exception:  # no libc to load, no prctl in it
        return False


def _watch_owner(owner: int, sig: int) -> None:
    fd = -1
    try:
        fd = os.pidfd_open(owner)
    except (AttributeError, OSError):
        pass
    # The pidfd is the owner's only if the owner is still our parent after
    # it was opened: a pid that died and was reused would have reparented us.
    if fd >= 0 and os.getppid() == owner:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()  # readable once the owner has exited
    else:
        import time

        while os.getppid() == owner:
            time.sleep(0.2)
    os.kill(os.getpid(), sig)


def _name_process(title: str) -> None:
    """Name this process for ps -o comm, top and /proc/PID/comm ("af
    template", "af <function>"): what PR_SET_NAME sets, 15 bytes at most.

    Linux only, through /proc (prctl itself would need ctypes, far too big
    to import here); elsewhere, and where /proc is not mounted, nothing.
    Three system calls, the only cost on a forked child's way to its function.
    """
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, title.encode("utf-8", "replace")[:15])
    except OSError:
        pass
    finally:
        os.close(fd)


def _raised_by_lookup(e: BaseException) -> bool:
    """Whether ``e`` came from looking a name up (anyfork's or the import
    system's own frames), not from code of the user's that the lookup ran."""
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__") in (__name__, "importlib._bootstrap")


def _binds(func: Any, n: int) -> bool:
    """Whether ``func`` can be called with ``n`` positional arguments, as far
    as its signature says without running it: a function written in Python
    (or a method of one) is checked; any other callable may take them."""
    bound = 0
    if type(func) is _MethodType:
        func = func.__func__  # type: ignore[attr-defined]
        bound = 1
    if type(func) is not _FunctionType:
        return True
    code = func.__code__
    n += bound
    if code.co_kwonlyargcount > len(func.__kwdefaults__ or ()):
        return False  # a keyword-only argument without a default
    if n > code.co_argcount and not code.co_flags & 0x04:  # CO_VARARGS
        return False
    return n >= code.co_argcount - len(func.__defaults__ or ())


class _Methods:
    def method(self) -> None:
        pass


_FunctionType = type(_binds)
_MethodType = type(_Methods().method)
# What _binds looks up, on a forked child's way to its function.
_CHILD_LOOKUPS += (
    (_FunctionType, ("__code__", "__defaults__", "__kwdefaults__")),
    (type(_binds.__code__), ("co_argcount", "co_flags", "co_kwonlyargcount")),
)


def _raised_by_call(e: BaseException) -> bool:
    """Whether ``e`` was raised by calling the function, not inside it: a
    TypeError whose traceback ends in run()'s own frame (the arguments did
    not bind, so the function's first line never ran)."""
    tb = e.__traceback__
    return isinstance(e, TypeError) and tb is not None and tb.tb_next is None


def _send_failure(e: BaseException, seq: int, brief: bool) -> None:
    """Tell the caller why this process fails before its function runs: one
    FAILURE record on the failure sink (see _protocol), if there is one.
    Never blocks: a sink nobody reads drops the record, and the caller gets
    the bare exit status."""
    if failure_fd < 0:
        return
    try:

        cls = type(e)
        type_name = cls.__qualname__
        if cls.__module__ != "builtins":
            type_name = f"{cls.__module__}.{type_name}"
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
            tb = tb.tb_next  # anyfork's own frames, as _report leaves them out
        lines = _format_exception(e, tb, brief)
        record = P.failure_record((os.getpid(), os.getppid(), seq), (type_name, str(e), "".join(lines)))
        sink = Sock(_socket.AF_UNIX, _socket.SOCK_DGRAM, 0, failure_fd)
        try:
            sink.send(record, _SEND_FLAGS | _DONTWAIT)
        finally:
            sink.detach()  # the number stays ours: a fork may still fail
    except BaseException:
        pass  # a full sink, or a caller gone: the exit status alone says it


def _format_exception(e: BaseException, tb: Any, brief: bool) -> list[str]:
    """traceback's lines for ``e`` from ``tb`` (``brief``: the exception alone).

    3.13's traceback suggests names for an AttributeError or NameError, and
    that raises UnicodeEncodeError for a name with a lone surrogate (a RUN
    of "builtins:\\udcff"): then the exception's own line, without it."""
    import traceback

    try:
        return (traceback.format_exception_only(type(e), e) if brief
                else traceback.format_exception(type(e), e, tb))
    except Exception:
        return [f"{type(e).__qualname__}: {e}\n"]


def _report(e: BaseException, what: str, brief: bool = False) -> None:
    """Say why this process is ending, in one write headed by its pid.

    One write, so that the tracebacks of many processes sharing a stderr
    don't come out interleaved line by line.  A ``sys.excepthook`` the user
    set here is theirs to print with.  anyfork's own frames are left out:
    the user's code is where to look.  ``brief``: the exception alone (a
    name that isn't there: its traceback is only anyfork's lookup).
    """
    if sys.excepthook is not sys.__excepthook__:
        try:
            sys.excepthook(type(e), e, e.__traceback__)
            return
        except BaseException:
            pass  # a broken hook: say it ourselves
    try:

        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
            tb = tb.tb_next  # anyfork's own frames, down to the user's
        lines = _format_exception(e, tb, brief)
        text = f"anyfork worker {os.getpid()} ({what}):\n" + "".join(lines)
        _flush_stdio()
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(2, data):]
    except BaseException:
        pass  # no stderr to say it on


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _fresh_signals(everything: bool, ignore_sigint: bool = False) -> None:
    """Dispositions (and mask) of a fresh interpreter, for the user's function.

    A process exec'd by anyfork, and one forked from such a template, differs
    from that only in SIGINT (ignored while it is prepared) and SIGCHLD (a
    template's reaper).  One forked from a program inherited the program's
    handlers and mask: every signal is reset, and the mask cleared last, so
    a signal held back until then meets its final disposition.

    Args:
        everything: reset every signal and the mask, not just those two.
        ignore_sigint: leave SIGINT ignored (a template being set up) instead
            of raising KeyboardInterrupt.
    """
    if everything:
        keep_ignored = {getattr(_signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(_signal, n)}
        for sig in _signal.valid_signals():
            if sig in (_signal.SIGKILL, _signal.SIGSTOP, _signal.SIGINT):
                continue
            try:
                _signal.signal(sig, _signal.SIG_IGN if sig in keep_ignored else _signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # signals the C library reserves for itself
    else:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN if ignore_sigint else _signal.default_int_handler)
    if everything:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


def _signal_state() -> tuple[object, ...]:
    """Every signal's disposition, and the mask: what code run here may change."""
    handlers = tuple(_signal.getsignal(sig) for sig in sorted(_signal.valid_signals()))
    sigmask = getattr(_signal, "pthread_sigmask", None)
    return (*handlers, frozenset(sigmask(_signal.SIG_BLOCK, ()) if sigmask is not None else ()))


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _run_atexit() -> None:
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass


def _exit(code: int, run_atexit: bool = True, sock: Sock | PipeSocket | None = None) -> NoReturn:
    if run_atexit:
        _run_atexit()
    _flush_stdio()
    if sock is not None:
        # The kernel closes descriptors only after tearing down the address
        # space; closing ours first lets the caller see EOF that much sooner.
        try:
            if isinstance(sock, Sock):
                Sock.close(sock)  # the C close: socket.socket's is Python code
            else:
                sock.close()  # a patched socket class (gevent, eventlet)
        except OSError:
            pass
    os._exit(code & 0xFF)


def _fail(code: int, message: str | None, sock: Sock) -> NoReturn:
    """Exit on an error, after draining what is queued on the socket.

    Closing a Unix socket with unread data makes the peer's next read fail
    with ECONNRESET; draining first lets the caller see a plain EOF.
    """
    if message:
        try:
            print(message, file=sys.stderr)
        except Exception:
            pass
    try:
        sock.setblocking(False)
        while True:
            data, fds = _recv(sock, 65536)
            P.close_fds(fds)
            if not data:
                break
    except (OSError, _CorruptError):
        pass
    _exit(code, run_atexit=False)

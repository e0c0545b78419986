"""A template's report channel, and the template as the parent of what it forked.

Theory of operation
-------------------
:class:`ReportChannel` is the caller's end of a template's report channel:
the socket, the sans-io :class:`~anyfork._caller.TemplateState` it feeds,
and the one operation that waits for reports (:meth:`ReportChannel.until_op`,
run by either backend).  Reports are read lazily: when a caller needs one,
and on the way when it forks or writes to the template.

One reader at a time holds the *reader role* (``reading``); it reads only
what is there (``MSG_DONTWAIT``) and gives the role back before anyone
waits, so the role, like every lock here, is never held across a wait.
Those who find it taken wait on the channel's notifier, which the reader
notifies when it is done; those who find it free wait for the socket to
turn readable, and then take it.  ``recvmsg`` and its ``MSG_CTRUNC``
handling exist only here on the caller's side.

The end of the channel is not proof enough that the template is gone: a
helper that code run in the template forked (``os.fork``, a
``multiprocessing.Pool`` with the fork start method) holds copies of its
sockets, and EOF comes only when the helper exits too.  So whoever waits on
the channel also watches the template's *process* (a :class:`Watch`): a
template the caller spawned through its pidfd (:class:`ExitWatch`), a
template forked from another template through that one's report of its exit
(:class:`ForkedWatch`).  Once the process is gone, what it wrote before it
went is read, and the channel ends as if at EOF (:meth:`ReportChannel.gone_op`).
Only waits look at the watch: a call that finds what it wants at once pays
nothing for it.

:class:`Template` is what a ``Process`` forked from a template asks about
itself: its pid, its exit status, a signal.  ``_direct.Direct`` answers
the same questions for a process the caller spawned, so ``Process`` never
asks which kind of parent it has.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import TYPE_CHECKING, Protocol

from . import _caller as C
from . import _fds
from . import _protocol as P
from ._backend import Notifier, Op, Wait, _poll, deadline_after, run_blocking, time_left
from ._channel import BrokenError, CommandChannel, hold_signals, release_signals, watch_deadline
from ._errors import (
    Error,
    ExitStatusLostError,
    ProcessExitedError,
    ProcessStateError,
    ProtocolError,
    TemplateDiedError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._direct import Direct

_RECV_FLAGS = int(getattr(socket, "MSG_DONTWAIT", 0)) | int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 8))
_ANC_SPACE = socket.CMSG_SPACE(4 * 4)  # reports carry one descriptor; leave room to see extras
# How long closing a template waits for its last reports (the pids of what
# it forked before it saw EOF) before it closes the channel anyway.
_LAST_REPORTS = 1.0
# Why a template's channel ended when the caller closed it (compared in
# Template.error, to say "you closed" where that is what happened).
CLOSED = "was closed"
# How many reads one read_now makes at most: a template with a backlog
# refills the channel as fast as it is read, and an event loop must get its
# turn between batches.
_BATCH = 8


class Watch(Protocol):
    """How a wait sees that a template's process is gone, whatever keeps its
    sockets open (see the module's doc)."""

    def gone(self) -> bool:
        """True once the process has exited.  Never blocks."""

    def enter(self) -> int | None:
        """A descriptor that turns readable when ``gone()`` may have changed;
        -1: none, ask ``gone()`` every ``_channel.WATCH_POLL`` s; None: nothing to
        watch (no one can tell), rely on EOF.  Pair with ``leave``."""

    def leave(self, fd: int | None) -> None: ...


class ExitWatch:
    """A template the caller spawned (``_direct.Direct``): its pidfd turns
    readable as it exits; without one, it is polled with ``waitpid``."""

    __slots__ = ("direct",)

    def __init__(self, direct: Direct) -> None:
        self.direct = direct

    def gone(self) -> bool:
        return self.direct.poll()  # reaps it: its own wait() then says how it ended

    def enter(self) -> int | None:
        shared = self.direct.pidfd
        return -1 if shared is None else shared.enter()  # -1 once reaped: gone() says so

    def leave(self, fd: int | None) -> None:
        if fd is not None and fd >= 0:
            shared = self.direct.pidfd
            assert shared is not None
            shared.leave()


class ForkedWatch:
    """A template forked from another template: that one, its parent,
    reports its exit.  If the parent's channel ended too (it died, was closed
    or ran), no one can tell: EOF is all there is."""

    __slots__ = ("child", "parent")

    def __init__(self, parent: Template, child: C.Child) -> None:
        self.parent = parent
        self.child = child

    def gone(self) -> bool:
        if not self.child.done:
            self.parent.reports.read_now()
        return self.child.done  # exited, lost, or never forked

    def enter(self) -> int | None:
        reports = self.parent.reports
        if reports.state.ended is not None:
            return None
        return reports.reader_fd()  # -1 while another thread reads it: poll

    def leave(self, fd: int | None) -> None:
        if fd is not None and fd >= 0:
            self.parent.reports.reader_fd_done()


class ReportChannel:
    """The caller's end of one template's report channel (see the module's doc)."""

    __slots__ = ("__weakref__", "_journal", "contended", "lock", "notifier", "reading", "shared", "state",
                 "watch")

    def __init__(self, sock: socket.socket, state: C.TemplateState, watch: Watch | None = None) -> None:
        self.shared = _fds.Shared(sock.fileno(), sock)
        self.state = state
        self.watch = watch  # the template's process (see the module's doc)
        # Guards state and the reader role.  Reentrant: a signal handler that
        # interrupted a dispatch may kill() a process of the same template.
        # It is _fds.fork_lock, one for every channel: what is done under it
        # may close descriptors, which takes that lock, and a read holds that
        # one while it takes this (a SPARE's socket, from recvmsg until it is
        # listed).  One lock can't be taken in two orders.
        self.lock = _fds.fork_lock
        self.reading = False
        # Someone found the reader role taken and waits for it on the notifier.
        self.contended = False
        self.notifier = Notifier()
        self._journal: list[tuple[bytes, list[tuple[int, int, bytes]], int, object]] | None = None
        _fds.hold(self)  # a SPARE's socket may wait in the decoder for the rest of its frame

    def drop_inherited(self) -> None:
        """In a forked child: close what the decoder holds (see ``_fds.hold``)."""
        self.state.drop_inherited()

    def fileno(self) -> int:
        return self.shared.fd

    def reader_fd(self) -> int:
        """The descriptor to wait on for reports, if no one is reading them
        now (-1 otherwise); pair with ``reader_fd_done``."""
        if self.reading:
            return -1
        return self.shared.enter()

    def reader_fd_done(self) -> None:
        self.shared.leave()

    def read_now(self) -> bool | None:
        """Read and dispatch what has arrived, without waiting.

        Returns:
            True if anything was read, False if nothing was there, None if
            another reader is at work (it notifies when it is done).
        """
        took = False
        entered = False
        got = False
        try:
            with self.lock:
                if self.reading:
                    self.contended = True
                    return None
                if self.state.ended is not None:
                    return False
                took = self.reading = True  # "took" first: an exception in between leaves neither
            entered = self.shared.enter() >= 0  # the socket stays open while we read it
            if entered:
                sock = self.shared.sock
                assert sock is not None
                with _fds.fork_lock:  # a SPARE's socket is owned before a fork
                    got = self._read(sock)
        finally:
            if took:
                journal, self._journal = self._journal, None
                with self.lock:
                    self.reading = False
                    if journal:  # read, not dispatched: the stream has lost its place
                        self._apply(self.state.end("was interrupted while its reports were read", True))
                    # Wake the waiters only if there is something new to see, or
                    # someone waits for the role: a read that found nothing
                    # changed nothing, and every waiter woken would read again
                    # (and wake all the others: 300 tasks waiting on one
                    # template's reports made the loop wake ~40,000 times).
                    wake = got or self.contended or self.state.ended is not None
                    self.contended = False
                if entered:
                    self.shared.leave()
                if wake:
                    self.notifier.notify()
        return got

    def _read(self, sock: socket.socket) -> bool:
        got = False
        # One hold for the batch, not one per read: the reads never wait.
        held: list[set[int] | None] = []
        try:
            hold_signals(held)
            for _ in range(_BATCH):
                journal: list[tuple[bytes, list[tuple[int, int, bytes]], int, object]] = []
                self._journal = journal
                try:
                    # What is read lands in the journal in C, in the same call.
                    journal.extend(map(sock.recvmsg, (65536,), (_ANC_SPACE,), (_RECV_FLAGS,)))
                except BlockingIOError:
                    self._journal = None
                    return got
                except OSError as e:
                    self._journal = None
                    with self.lock:
                        self._apply(self.state.receive_eof(f"could not be read from ({e})"))
                    return True
                if self._dispatch_read(journal[0]):
                    return True
                got = True
        finally:
            release_signals(held)
        return got

    def _dispatch_read(self, read: tuple[bytes, list[tuple[int, int, bytes]], int, object]) -> bool:
        """Feed one read to the state; True if the channel ended."""
        data, anc, flags, _ = read
        fds = P.unpack_fds(anc, socket.SOL_SOCKET, socket.SCM_RIGHTS) if anc else []
        if flags & _CTRUNC:
            if fds:  # more than one report's worth: not from a template
                P.close_fds(fds)
                self._journal = None
                with self.lock:
                    self._apply(self.state.end("sent more descriptors than a report carries", True))
                return True
            # We were out of descriptors as a SPARE arrived: the kernel
            # dropped its socket (the process it belonged to sees EOF
            # and exits).  A placeholder keeps the frame decodable.
            fds = [-1]
        with self.lock:
            self._journal = None
            events = self.state.receive(data, fds) if data else self.state.receive_eof()
            self._apply(events)
        return not data or self.state.ended is not None

    def _apply(self, events: list[C.Event]) -> None:
        """What the driver does about the state's events (caller holds ``lock``)."""
        for event in events:
            if isinstance(event, C.Discard):
                _fds.close_owned_fd(event.fd)
            elif isinstance(event, C.SpareArrived):
                _fds.own(event.fd)
                try:
                    is_socket = stat.S_ISSOCK(os.fstat(event.fd).st_mode)
                except OSError:
                    is_socket = False
                if not is_socket:  # not the socket of a process forked ahead
                    self._apply(self.state.end("sent a SPARE report carrying no socket", True))
                    return
            elif isinstance(event, C.Ended):
                self.shared.close()  # once the last waiter on it has left

    def until_op(self, done: Callable[[], bool], deadline: float | None) -> Op[bool]:
        """Read reports until ``done()`` or the channel ends; False if the
        deadline passed first.

        Between two batches of reads it waits (at once, if more is there), so
        that under asyncio a channel that keeps filling never holds the loop.
        """
        notifier = self.notifier
        state = self.state

        def until() -> bool:  # what a notification must find to wake this one
            return state.ended is not None or done()

        while True:
            if done():
                return True
            r = self.read_now()
            epoch = notifier.epoch  # after our own notification, before the check
            if done():
                return True
            if self.state.ended is not None or time_left(deadline) == 0:
                return done()
            if r is None:  # another reader is at work: it notifies
                yield Wait(notifier=notifier, epoch=epoch, deadline=deadline)
                continue
            fd = self.shared.enter()
            if fd < 0:
                continue
            watch = self.watch
            wfd = watch.enter() if watch is not None else None
            try:
                ready = yield Wait(reads=(fd,) if wfd is None or wfd < 0 else (fd, wfd), notifier=notifier,
                                   epoch=epoch, deadline=watch_deadline(wfd, deadline), until=until)
            finally:
                self.shared.leave()
                if watch is not None:
                    watch.leave(wfd)
            if watch is not None and wfd is not None and (wfd < 0 or wfd in ready) and watch.gone():
                yield from self.gone_op()

    def end_if_gone(self) -> bool | None:
        """If the template's process is gone, read what it wrote before it
        went and end the channel.  Never waits.

        Returns:
            True if the channel has ended, False if the process is not known
            to be gone, None if another reader is at work (try again once it
            notifies).
        """
        if self.state.ended is not None:
            return True
        watch = self.watch
        if watch is None or not watch.gone():
            return False
        while True:
            r = self.read_now()  # nothing more is coming: the process is gone
            if r is None:
                return None
            if not r:
                break
        with self.lock:
            self._apply(self.state.receive_eof())
        self.notifier.notify()
        return True

    def gone_op(self) -> Op[None]:
        """``end_if_gone``, waiting for another reader to finish if need be."""
        notifier = self.notifier
        while True:
            epoch = notifier.epoch
            if self.end_if_gone() is not None:
                return
            yield Wait(notifier=notifier, epoch=epoch)  # a reader never waits while it reads

    def end(self, reason: str) -> None:
        """Stop listening: no more reports will be read."""
        with self.lock:
            self._apply(self.state.end(reason))
        self.notifier.notify()


class Template:
    """A process that was forked from: the parent of the processes it forked.

    Holds its report channel and state, and the template's own command
    channel (for ``KILL``), not the template's ``Process``: a child keeps
    these alive, never the object the user may drop.
    """

    __slots__ = ("_theirs", "ahead", "cmd", "pid_of", "reports", "retired", "state")

    def __init__(self, cmd: CommandChannel, pid_of: Callable[[], str], watch: Watch | None = None) -> None:
        with _fds.fork_lock:  # owned before a fork
            try:
                mine, theirs = socket.socketpair()
            except OSError as e:
                raise Error(f"no socketpair for the report channel: {e}") from e
            _fds.plain(mine, theirs)  # reads here are non-blocking by flag: a timeout would wait first
            self.cmd = cmd
            self.pid_of = pid_of
            self.state = C.TemplateState()
            self.reports = ReportChannel(mine, self.state, watch)
            self._theirs = theirs.detach()  # sent with the first FORK or SPAWN
            _fds.own(self._theirs)
        self.ahead = 0
        self.retired: str | None = None  # "run" or "closed": no more forks or signals

    def describe(self) -> str:
        return self.pid_of()

    def channel_fds(self) -> tuple[bool, list[int]]:
        """Whether the next frame carries the template's end of the channel,
        and then that descriptor (the outbox's from here on)."""
        fd, self._theirs = self._theirs, -1
        if fd < 0:
            return False, []
        _fds.disown(fd)
        return True, [fd]

    def error(self, detail: str = "") -> Error:
        """Why this template can't answer any more, as the error to raise."""
        state = self.state
        if state.ended == CLOSED and not state.handed_over:
            return ProcessStateError(f"you closed its template ({self.describe()}){detail}")
        message = f"template {self.describe()} {state.ended or 'stopped reporting'}{detail}"
        if state.corrupt:
            return ProtocolError(message)
        if state.handed_over:
            return ProcessStateError(message)
        return TemplateDiedError(message)

    def write_error(self, e: BrokenError) -> Error:
        """The error for a write to the template that failed."""
        self.reports.read_now()
        if self.state.ended is not None and e.error is not None:
            return self.error()
        if e.error is None:
            return ProcessStateError(f"template {self.describe()} {e.why}")
        return TemplateDiedError(
            f"template {self.describe()} exited before it took every command ({e.error.strerror or e.error})")

    # --- fork, fork ahead, retire (caller holds cmd.lock) ----------------------------------

    def read_first(self) -> None:
        """Dispatch what has arrived: a process forked ahead that exited must
        not be handed out (its EXIT report may be waiting)."""
        self.reports.read_now()

    def take(self) -> tuple[C.Child, socket.socket] | None:
        """The oldest live process forked ahead, or None."""
        while True:
            with self.reports.lock:
                taken = self.state.take()
            if taken is None:
                return None
            child, fd = taken
            # Its EXIT report may not have been written yet (the template
            # reaps when it is idle), but a process that died has closed its
            # end of the socket: ours reads EOF.  A live one never writes on
            # it.  So one poll keeps a dead one from being handed out.
            if not _poll((fd,), (), 0):
                break
            with self.reports.lock:
                self.state.children.pop(child.seq, None)
            _fds.close_owned_fd(fd)
        _fds.disown(fd)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            _fds.close_owned_fd(fd)
            return None
        _fds.plain(sock)
        return child, sock

    def check_alive(self) -> None:
        """Raise the template's error if it is known to be gone (not closed by the caller)."""
        if self.state.ended is not None and self.retired is None:
            raise self.error()

    # Signals are held from a fork's record to its frame in the queue: a
    # handler raising in between would leave a child recorded that is never
    # asked for, and its descriptors with no owner.
    def queue_fork(self, theirs: int) -> C.Child:
        """Queue a FORK with ``theirs``, which this takes (and closes if it raises)."""
        held: list[set[int] | None] = []
        handed = False
        try:
            hold_signals(held)
            with self.reports.lock:
                child, frame = self.state.fork(self._theirs >= 0)  # raises if it ended meanwhile
            _, fds = self.channel_fds()
            # From here the queue owns it: put closes what it did not queue.
            # (Not a flag set after put: in a threaded program a handler can
            # raise between put's return and the next line, and closing a
            # queued descriptor would send whatever reuses its number.)
            handed = True
            self.cmd.put(frame, [theirs, *fds])
        finally:
            if not handed:
                P.close_fds([theirs])  # the queue never took it
            release_signals(held)
        return child

    def queue_spawns(self) -> None:
        with self.reports.lock:
            missing = self.state.missing(self.ahead)
        for _ in range(missing):
            held: list[set[int] | None] = []
            try:
                hold_signals(held)
                new_channel, fds = self.channel_fds()
                with self.reports.lock:
                    _, frame = self.state.spawn(new_channel)
                self.cmd.put(frame, fds)
            finally:
                release_signals(held)

    def changed(self) -> None:
        with self.reports.lock:
            self.reports._apply(self.state.changed())

    def stop_ahead(self) -> None:
        with self.reports.lock:
            self.reports._apply(self.state.stop_ahead())

    def retire(self, why: str) -> None:
        """No more forks: let go of every process forked ahead at once."""
        self.retired = why
        with self.reports.lock:
            self.reports._apply(self.state.close(handed_over=why == "run"))
        if self._theirs >= 0:
            _fds.close_owned_fd(self._theirs)
            self._theirs = -1

    def last_reports_op(self) -> Op[None]:
        """After retire: read until the template's end of the channel closes
        (briefly: a template that saw EOF or RUN closes it at once), then
        close ours, so that nothing lingers for as long as a child's object."""
        yield from self.reports.until_op(lambda: False, deadline_after(_LAST_REPORTS))
        self.reports.end("was run" if self.state.handed_over else CLOSED)

    # --- closed, and alive for its children ----------------------------------------------

    def lingers(self) -> bool:
        """Whether the caller closed this template while processes it forked
        may still run: it then stays alive, serving KILL and reporting their
        exits, until the last of them is reported gone (or the caller drops
        them all, or exits: the template sees EOF)."""
        return (self.retired == "closed" and self.cmd.sock is not None
                and self.state.ended is None and bool(self.state.children))

    def all_exited(self) -> bool:
        """Whether every process of this template not yet reported gone has
        exited all the same (its EXIT is on its way: the template reaps when
        SIGCHLD wakes it).  A pidfd turns readable when its process exits;
        without pidfds, or for a process whose pid is not known yet, no."""
        with self.reports.lock:
            pids = [child.pid for child in self.state.children.values()]
        for pid in pids:
            if pid is None or not hasattr(os, "pidfd_open"):
                return False
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # reaped already
            except OSError:
                return False
            try:
                if not _poll((fd,), (), 0):
                    return False
            finally:
                os.close(fd)
        return True

    def settle(self) -> None:
        """Let go of a closed template whose children are all gone: it sees
        EOF and exits.  Never waits: nothing is left to report."""
        if self.retired == "closed" and self.cmd.sock is not None and not self.lingers():
            self.cmd.close()
            self.reports.end(CLOSED)

    def settle_op(self, deadline: float | None) -> Op[None]:
        """Read reports until no child of this closed template is left, then
        let it go (``wait`` on the template itself: it exits after them)."""
        yield from self.reports.until_op(lambda: not self.lingers(), deadline)
        self.settle()

    # --- the parent's interface (see _direct.Direct) --------------------------------------

    def flush_op(self, deadline: float | None) -> Op[bool]:
        """Write what is queued to the template (unless a writer already is)."""
        try:
            return (yield from self.cmd.flush_op(deadline, self.reports, wait=False))
        except BrokenError as e:
            raise self.write_error(e) from e

    def pid_op(self, child: C.Child, deadline: float | None) -> Op[None]:
        ended = self.state
        yield from self.reports.until_op(
            lambda: child.pid is not None or child.done or ended.ended is not None, deadline)
        if child.pid is not None:
            return
        if child.failed is not None:
            raise Error(f"{self.describe()} could not fork: {child.failed}")
        raise self.error(" before it reported the pid of a process it was asked to fork")

    def exit_op(self, child: C.Child, deadline: float | None) -> Op[bool]:
        if not child.done:
            if self.cmd.out:
                yield from self.flush_op(deadline)  # a KILL may be waiting to go
            state = self.state
            yield from self.reports.until_op(lambda: child.done or state.ended is not None, deadline)
        if self.retired == "closed":
            self.settle()
        return child.done or self.state.ended is not None

    def status(self, child: C.Child, what: str) -> int | None:
        if not child.done:
            self.reports.read_now()
            if not child.done:
                self.reports.end_if_gone()  # no EOF may ever come (see the module's doc)
            if self.retired == "closed":
                self.settle()
        if child.returncode is not None:
            return child.returncode
        if child.lost:
            raise ExitStatusLostError(
                f"{what} exited, but code run in its template {self.describe()} "
                "collected its status (os.wait, a SIGCHLD handler, a child watcher)")
        if child.failed is not None:
            raise Error(f"{self.describe()} could not fork: {child.failed}")
        if self.state.ended is not None:
            raise self.error(f", so the exit status of {what} can't be known")
        return None

    def kill(self, child: C.Child, sig: int, what: str) -> None:
        with self.cmd.lock:
            if self.retired == "run":
                raise ProcessStateError(
                    f"can't signal {what} safely: its template ran a function, which now owns it")
            if self.cmd.sock is None:
                if self.state.ended is not None and self.state.ended != CLOSED:
                    raise self.error(f", so {what} can't be signalled safely")
                raise ProcessStateError(
                    f"can't signal {what} safely: you closed its template ({self.describe()})")
            with self.reports.lock:
                frame = self.state.kill(child, sig)
            self.cmd.put(frame)
        run_blocking(self.flush_op(None))

    def broken(self, child: C.Child, what: str, e: OSError) -> Error:
        self.reports.read_now()
        if child.failed is not None:
            return Error(f"{self.describe()} could not fork: {child.failed}")
        if self.state.ended is not None and child.pid is None:
            return self.error()
        rc = child.returncode
        status = "" if rc is None else f" with status {rc}"
        return ProcessExitedError(
            f"{what} exited{status} before it took every command "
            f"({e.strerror or e}); its stderr says why", rc)

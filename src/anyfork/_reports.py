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

:class:`Template` is what a ``Process`` forked from a template asks about
itself: its pid, its exit status, a signal.  ``_direct.Direct`` answers
the same questions for a process the caller spawned, so ``Process`` never
asks which kind of parent it has.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import TYPE_CHECKING

from . import _caller as C
from . import _fds
from . import _protocol as P
from ._backend import Notifier, Op, Wait, _poll, deadline_after, run_blocking, time_left
from ._channel import BrokenError, CommandChannel, hold_signals, release_signals
from ._errors import (
    Error,
    ExitStatusLostError,
    ProcessExitedError,
    ProcessStateError,
    ProtocolError,
    TemplateDiedError,
)

if TYPE_CHECKING:
    import signal
    from collections.abc import Callable

_RECV_FLAGS = int(getattr(socket, "MSG_DONTWAIT", 0)) | int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 8))
_ANC_SPACE = socket.CMSG_SPACE(4 * 4)  # reports carry one descriptor; leave room to see extras
# How long closing a template waits for its last reports (the pids of what
# it forked before it saw EOF) before it closes the channel anyway.
_LAST_REPORTS = 1.0
# How many reads one read_now makes at most: a template with a backlog
# refills the channel as fast as it is read, and an event loop must get its
# turn between batches.
_BATCH = 8


class ReportChannel:
    """The caller's end of one template's report channel (see the module's doc)."""

    __slots__ = ("_journal", "lock", "notifier", "reading", "shared", "state")

    def __init__(self, sock: socket.socket, state: C.TemplateState) -> None:
        self.shared = _fds.Shared(sock.fileno(), sock)
        self.state = state
        # Guards state and the reader role.  Reentrant: a signal handler that
        # interrupted a dispatch may kill() a process of the same template.
        self.lock = threading.RLock()
        self.reading = False
        self.notifier = Notifier()
        self._journal: list[tuple[bytes, list[tuple[int, int, bytes]], int, object]] | None = None

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
                    return None
                if self.state.ended is not None:
                    return False
                took = self.reading = True  # "took" first: an exception in between leaves neither
            entered = self.shared.enter() >= 0  # the socket stays open while we read it
            if entered:
                sock = self.shared.sock
                assert sock is not None
                got = self._read(sock)
        finally:
            if took:
                journal, self._journal = self._journal, None
                with self.lock:
                    self.reading = False
                    if journal:  # read, not dispatched: the stream has lost its place
                        self._apply(self.state.end("was interrupted while its reports were read", True))
                if entered:
                    self.shared.leave()
                self.notifier.notify()
        return got

    def _read(self, sock: socket.socket) -> bool:
        got = False
        for _ in range(_BATCH):
            journal: list[tuple[bytes, list[tuple[int, int, bytes]], int, object]] = []
            self._journal = journal
            held: list[set[signal.Signals]] = []
            try:
                hold_signals(held)
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
            finally:
                release_signals(held)
            got = True
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
            try:
                yield Wait(reads=(fd,), notifier=notifier, epoch=epoch, deadline=deadline)
            finally:
                self.shared.leave()

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

    def __init__(self, cmd: CommandChannel, pid_of: Callable[[], str]) -> None:
        try:
            mine, theirs = socket.socketpair()
        except OSError as e:
            raise Error(f"no socketpair for the report channel: {e}") from e
        _fds.plain(mine, theirs)  # reads here are non-blocking by flag: a timeout would wait first
        self.cmd = cmd
        self.pid_of = pid_of
        self.state = C.TemplateState()
        self.reports = ReportChannel(mine, self.state)
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

    # Signals are held from a fork's record to its frame in the queue: a
    # handler raising in between would leave a child recorded that is never
    # asked for, and its descriptors with no owner.
    def queue_fork(self, theirs: int) -> C.Child:
        held: list[set[signal.Signals]] = []
        queued = False
        try:
            hold_signals(held)
            new_channel, fds = self.channel_fds()
            with self.reports.lock:
                child, frame = self.state.fork(new_channel)
            self.cmd.put(frame, [theirs, *fds])
            queued = True
        finally:
            if not queued:
                os.close(theirs)  # the queue never took it
            release_signals(held)
        return child

    def queue_spawns(self) -> None:
        with self.reports.lock:
            missing = self.state.missing(self.ahead)
        for _ in range(missing):
            held: list[set[signal.Signals]] = []
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
        self.reports.end("was " + ("run" if self.state.handed_over else "closed"))

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
        raise self.error(f"; no pid for process #{child.seq} of {self.describe()}")

    def exit_op(self, child: C.Child, deadline: float | None) -> Op[bool]:
        if not child.done:
            if self.cmd.out:
                yield from self.flush_op(deadline)  # a KILL may be waiting to go
            state = self.state
            yield from self.reports.until_op(lambda: child.done or state.ended is not None, deadline)
        return child.done or self.state.ended is not None

    def status(self, child: C.Child, what: str) -> int | None:
        if not child.done:
            self.reports.read_now()
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
            if self.retired is not None or self.cmd.sock is None:
                raise ProcessStateError(
                    f"can't signal {what} safely: its template was {self.retired or 'closed'}")
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

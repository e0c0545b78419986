"""The caller's end of a command socket: a queue of frames and the one operation that writes it.

Theory of operation
-------------------
Commands are queued (``put``, under ``lock``) by whoever prepares the
process, and written by :meth:`CommandChannel.flush_op`, an operation of
``_backend``: the blocking driver runs it in ``poll()``, the asyncio one in
the event loop.  Writes never block: ``sendmsg`` with ``MSG_DONTWAIT``, and
a wait for writability when the kernel's buffer is full.

One writer at a time holds the *writer role* (``writing``).  It is taken and
given back under ``lock``, and the lock is never held across a wait, so no
threading lock is ever held across an ``await``.  Whoever queues a frame
while another writer is active may leave it to that writer, which writes
until the queue is empty and gives the role back in the same critical
section in which it finds it empty (``wait=False``); or wait for the queue
to drain (``wait=True``: ``run`` must not hand the socket over while bytes
of ours are still on their way).

While it waits to write to a template, the writer also reads the
template's reports if no one else is: a template blocked writing reports
to a caller blocked writing commands to it would otherwise wait for ever.

Exceptions at any moment (a signal handler's KeyboardInterrupt, a
cancellation) must neither send bytes twice nor leave the role taken.  At a
wait they are thrown into the operation, which gives the role back.  Between
``sendmsg`` and the bookkeeping of what it sent there is no wait, but there
are bytecode boundaries, where a signal handler may raise: so the count is
put in a journal by C code in the same call that sends (``list.extend`` over
``map``), and an exception that finds a count not yet accounted for
*poisons* the channel: it is closed, so the process sees EOF, and every
later call says why.  Nothing is ever sent twice, and nothing half-sent is
ever followed by anything else.  And on the main thread (where Python runs
signal handlers) signals are held back from just before the send until its
count is accounted for, so that poisoning stays the rare case of a signal
that another thread received meanwhile.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module has no stub of its own
import errno
import socket
import threading
from typing import TYPE_CHECKING

from . import _fds
from . import _protocol as P
from ._backend import Notifier, Op, Wait, sooner, time_left

if TYPE_CHECKING:
    from ._reports import ReportChannel

_SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0)) | int(getattr(socket, "MSG_DONTWAIT", 0))
# The C function, not signal.pthread_sigmask: that wrapper turns the old mask
# into a set of Signals members, one enum lookup per signal, and held
# signals twice per send and per read (the caller's hottest path) spent more
# time there than in everything else a new() does.
_SIGMASK = getattr(_signal, "pthread_sigmask", None)
_ALL_SIGNALS = _signal.valid_signals() if hasattr(_signal, "valid_signals") else set()
_MAIN = threading.main_thread().ident


# How many holds are open on the main thread.  Within one, every signal is
# blocked already: a hold nested in it (a fork's record and its frame's put)
# only counts, and costs no system call.  A hold never spans a wait, so
# holds nest strictly.
_depth = 0


def hold_signals(held: list[set[int] | None]) -> None:
    """On the main thread, hold signals back for a send or a read and its
    bookkeeping: a signal that arrives during the system call would
    otherwise run its Python handler right after it, before the count is
    accounted for.  The old mask lands in ``held`` in C (see the module's
    doc); pass it to ``release_signals`` in a ``finally``.  A handler already
    due runs here, before anything is sent or read."""
    global _depth
    if _SIGMASK is not None and threading.get_ident() == _MAIN:
        if _depth:
            held.append(None)  # inside another hold: nothing to change
            _depth += 1
            return
        # pthread_sigmask runs the handlers due *after* changing the mask: one
        # that raises would leave every signal blocked, with no record of the
        # old mask.  So read it first (a raise there changed nothing).
        before = _SIGMASK(_signal.SIG_BLOCK, ())
        try:
            held.extend(map(_SIGMASK, (_signal.SIG_BLOCK,), (_ALL_SIGNALS,)))
        except BaseException:
            if not held:
                _SIGMASK(_signal.SIG_SETMASK, before)
            raise
        _depth = 1


def release_signals(held: list[set[int] | None]) -> None:
    """Restore the mask ``hold_signals`` saved (what came meanwhile is handled now)."""
    global _depth
    if held:
        assert _SIGMASK is not None
        mask = held.pop()
        _depth -= 1  # first: a handler run by the call below may hold in turn
        if mask is not None:
            _SIGMASK(_signal.SIG_SETMASK, mask)
_ANC = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
# How often a wait looks at a template's process when there is no descriptor
# that turns readable as it exits (no pidfd: a platform other than Linux 5.3+;
# see _reports.Watch).
WATCH_POLL = 0.05


def watch_deadline(wfd: int | None, deadline: float | None) -> float | None:
    """The deadline of a wait that also watches a process through ``wfd``
    (see _reports.Watch.enter): -1, no descriptor, means soon, to ask again."""
    return sooner(deadline, WATCH_POLL) if wfd == -1 else deadline


class BrokenError(Exception):
    """Writing failed: ``error`` is the OSError, or None if the channel was
    poisoned by an exception in the middle of a write, or closed."""

    def __init__(self, error: OSError | None, why: str) -> None:
        super().__init__(why)
        self.error = error
        self.why = why


class CommandChannel:
    """The caller's end of one process's command socket, and what is queued on it."""

    __slots__ = ("__weakref__", "_journal", "broken", "lock", "notifier", "out", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        _fds.own(sock)
        self.out = P.Outbox()
        self.lock = threading.RLock()
        self.writing = False
        self.notifier = Notifier()
        self.broken: str | None = None  # why nothing more can be written
        self._journal: list[int] | None = None  # see the module's doc

    def put(self, parts: list[P.Buffer], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a frame (caller holds ``lock``); the queue owns ``fds`` from here
        on, and closes them if this raises before they are queued.

        The outbox queues a frame's parts with one C call, so a handler
        raising at any moment finds the frame queued whole or not at all.  A
        frame without descriptors needs nothing more (RUN, SPAWN: no signals
        held, which cost more than the rest of this).  With descriptors,
        signals are held from listing this channel as their holder until the
        queue has them: a handler raising in between would leave them
        nobody's to close."""
        if not fds:
            self.out.put(parts)
            return
        held: list[set[int] | None] = []
        try:
            hold_signals(held)
            _fds.hold(self)
        except BaseException:
            P.close_fds(fds)  # not handed to the queue: still ours to close
            release_signals(held)
            raise
        try:
            self.out.put(parts, fds)  # (which closes them if it raises before queueing them)
        finally:
            release_signals(held)

    def drop_inherited(self) -> None:
        """In a forked child: close the send_fh duplicates still queued."""
        self.out.close()

    def hand_over(self) -> socket.socket:
        """Give the socket to the user (after a complete flush): no longer ours."""
        with self.lock:
            sock, self.sock = self.sock, None
            assert sock is not None
            _fds.disown(sock)
            return sock

    def close(self) -> None:
        """Close the socket and drop what is queued: the process sees EOF."""
        with self.lock, _fds.fork_lock:  # no fork while closed ones are still queued
            sock, self.sock = self.sock, None
            self.out.close()
        _fds.close_sock(sock)
        self.notifier.notify()

    def flush_op(self, deadline: float | None = None, reports: ReportChannel | None = None,
                 wait: bool = True) -> Op[bool]:
        """Write everything queued.

        ``wait``: also wait while another writer drains the queue; else leave
        it to that one.  ``reports``: the report channel to read while the
        socket is full (this is a template's).  Returns False if ``deadline``
        passed first.

        Raises:
            BrokenError: the socket failed, was poisoned, or was closed.
        """
        notifier = self.notifier
        while True:
            epoch = notifier.epoch
            took = False
            try:
                with self.lock:
                    if self.broken is not None:
                        raise BrokenError(None, self.broken)
                    if not self.out:
                        return True
                    if self.sock is None:
                        raise BrokenError(None, "closed")
                    if not self.writing:
                        took = self.writing = True  # "took" first: see the module's doc
                if took:
                    done = yield from self._write(deadline, reports)
                    if done:
                        took = False  # _write gave the role back, with the queue empty
                        return True
                    return False
            finally:
                if took:
                    self._give_back()
            if not wait:
                return True  # the writer at work writes ours too
            if time_left(deadline) == 0:
                return False
            yield Wait(notifier=notifier, epoch=epoch, deadline=deadline)

    def _give_back(self) -> None:
        with self.lock:
            journal, self._journal = self._journal, None
            if journal:  # sent, not accounted for: see the module's doc
                self._poison()
            self.writing = False
        self.notifier.notify()

    def _poison(self) -> None:
        self.broken = "interrupted in the middle of a write (the process was let go)"
        sock, self.sock = self.sock, None
        with _fds.fork_lock:
            self.out.close()
        _fds.close_sock(sock)

    def _write(self, deadline: float | None, reports: ReportChannel | None) -> Op[bool]:
        """Holding the writer role: write until the queue is empty (then give the
        role back, and return True) or the deadline passes (False)."""
        out = self.out
        while True:
            with self.lock:
                sock = self.sock
                if sock is None:
                    raise BrokenError(None, self.broken or "closed")
                if not out:
                    self.writing = False
                    self.notifier.notify()
                    return True
                buffers, fds = out.chunk()
                anc = P.ancillary(fds, *_ANC)
                journal: list[int] = []
                self._journal = journal
                held: list[set[int] | None] = []
                # Under fork_lock: the outbox closes the descriptors that went
                # out one by one, and a fork in between would close numbers
                # still listed (reused by then) in the child.
                with _fds.fork_lock:
                    try:
                        hold_signals(held)
                        try:
                            # The count lands in the journal in C, in the same call.
                            journal.extend(map(sock.sendmsg, (buffers,), (anc,), (_SEND_FLAGS,)))
                        except BlockingIOError:
                            pass
                        except OSError as e:
                            self._journal = None
                            out.close()
                            raise BrokenError(e, str(e)) from e
                        if journal:
                            out.sent(journal[0])
                        self._journal = None
                    finally:
                        release_signals(held)
                if journal:
                    continue
                fd = sock.fileno()
            rfd = reports.reader_fd() if reports is not None else -1
            # A template that is gone may never make its socket writable (a
            # helper it forked holds the other end): watch its process too.
            watch = reports.watch if reports is not None else None
            wfd = watch.enter() if watch is not None else None
            reads = tuple(x for x in (rfd, wfd) if x is not None and x >= 0)
            try:
                ready = yield Wait(writes=(fd,), reads=reads, deadline=watch_deadline(wfd, deadline))
            finally:
                if rfd >= 0:
                    assert reports is not None
                    reports.reader_fd_done()
                if watch is not None:
                    watch.leave(wfd)
            if rfd >= 0 and rfd in ready:
                assert reports is not None
                reports.read_now()
            if watch is not None and wfd is not None and (wfd < 0 or wfd in ready) and watch.gone():
                assert reports is not None
                yield from reports.gone_op()
                raise BrokenError(OSError(errno.EPIPE, "it exited"), "exited")
            if not ready and time_left(deadline) == 0:
                return False

"""The relay at each end of a remote connection: local sockets <-> mux channels.

Theory of operation
-------------------
Both ends of a remote connection run this loop (the caller's side in a
thread, the remote host's hub as its whole life).  Each mux channel is tied
to a local stream socket: what the socket gives is sent on the channel,
what the channel brings is written to the socket.  So an anyfork process on
the remote host talks over an ordinary socketpair to the hub, and the
caller's ``Process`` over an ordinary socketpair to its relay: neither side
of anyfork's own code knows the connection is there.

Descriptors are the one thing a byte stream can't carry, and anyfork's
commands and reports carry sockets (FORK, SPAWN, SPARE).  The relay turns
each socket that arrives into a channel of its own: it opens
``fd:<channel>:<role>`` just before it sends the first byte of the frame the
socket belongs to.  The relay at the other end makes a fresh socketpair for
the new channel and sends one end, with ``sendmsg``, together with the next
byte it writes on ``<channel>``: that frame's first byte.  So a descriptor
arrives with its frame, as anyfork's serve loop requires.

Which frame is that?  A descriptor comes with the ``recvmsg`` that reaches
its message, but that read may begin with earlier bytes of the stream
(Linux glues descriptor-less data in front of a message that carries
some).  So the relay follows anyfork's framing on the streams that carry
it (a channel is framed until a RUN frame has gone by: after that its bytes
are the user's) and attaches the descriptors to the next frame whose header
counts them.  Header bytes split over two reads are held back until the
header is whole.  On a stream that is the user's, a descriptor goes with
the start of the read it came with: the most a byte stream can promise.
Only ``AF_UNIX`` stream sockets can be carried this way; any other
descriptor is closed and the channel it came on is closed too (the process
then sees its socket break, and anyfork's own code refuses such
descriptors at the call before they get here).

Flow control is the mux's: a channel whose peer has not granted room stops
being read here (``pending``), and credit is granted back only as bytes are
written to the local socket.  The connection's own stream is read whenever
it has data: the mux bounds what each channel may have in flight.

An owner may also send on a channel itself, from its own thread, in
place of writing to the channel's local socket (``send_direct``: the
caller's rpc clients do, see ``_connection.Writer``).  That keeps the
stream's order by reading what the socket still holds first, and takes
only what the loop itself would have sent: bytes on a stream that is the
user's, within the channel's window.  Anything else is refused, and the
owner writes it to the socket as before.

This module imports the standard library and ``_mux`` only: it is sent, as
source, to the remote interpreter.
"""

from __future__ import annotations

import os
import select
import socket
from collections import deque

from . import _mux as M

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

_READ = 1 << 16
_ANC = socket.CMSG_SPACE(64 * 4)
# (Plain ints: arithmetic on the socket module's IntFlag constants costs a
# Python call each time.)
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0))
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 8))
_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT


class _Local:
    """The local socket of one channel, and what is waiting to be written to it."""

    __slots__ = ("behind", "eof_in", "eof_out", "fd", "header", "out", "raw", "skip", "sock", "unattached")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # (kept: a method call less each time the loop looks)
        sock.setblocking(False)
        # Following anyfork's framing of what is read here (see the module doc).
        self.raw = False  # a RUN went by: the rest is the user's
        self.skip = 0  # payload bytes of the current frame still to pass
        self.header = b""  # a header's first bytes, held back until it is whole
        self.unattached: deque[socket.socket] = deque()  # arrived, their frame not yet seen
        # bytes to write, and sockets to send with the next byte (markers)
        self.out: deque[bytes | memoryview | socket.socket] = deque()
        self.eof_in = False  # the socket said EOF: nothing more to read
        self.eof_out = False  # the peer sent EOF: shut the socket down once out is written
        self.behind = True  # the socket may hold bytes not read yet (see Relay.send_direct)


class Relay:
    """One end's relay.

    Args:
        mux: this end's multiplexer.
        rfd, wfd: the connection's descriptors (the same socket, or ssh's pipes).
        on_open: called with (channel, what) for a channel the peer opened
            that is not a descriptor's; returns the local socket to tie it
            to, or None to refuse (close) it.
        on_control: called with each CONTROL message.
    """

    def __init__(self, mux: M.Mux, rfd: int, wfd: int,
                 on_open: Callable[[int, str], socket.socket | None],
                 on_control: Callable[[bytes], None]) -> None:
        self.mux = mux
        self.rfd = rfd
        self.wfd = wfd
        self.on_open = on_open
        self.on_control = on_control
        self.locals: dict[int, _Local] = {}
        self._out: deque[memoryview] = deque()  # the connection's bytes to write
        self._rbuf = bytearray(_READ * 4)  # (see _read_connection)
        self._rview = memoryview(self._rbuf)
        self.connected = True
        # A channel whose bytes are held back (see hold) for its owner to
        # take, rather than written to its local socket; or None.
        self.holding: int | None = None
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)

    # --- what the owner does -------------------------------------------------------

    def tie(self, ch: int, sock: socket.socket, what: str = "") -> None:
        """Tie channel ``ch`` to ``sock`` (the relay owns it from now on).

        ``what`` is the channel's role.  A command socket ("serve", or a
        descriptor channel's "cmd") carries anyfork's frames from the caller
        until RUN and only the user's bytes back; a report channel
        ("report") carries frames from the template and nothing back; any
        other ("raw") only the user's bytes.  What is read here is followed
        frame by frame only where it carries frames.
        """
        loc = self.locals[ch] = _Local(sock)
        role = what.rpartition(":")[2]
        framed = role in ("serve", "cmd") if self.mux.caller else role == "report"
        loc.raw = not framed

    def open(self, what: str, sock: socket.socket) -> int:
        """Open a channel for ``sock``; its number."""
        ch = self.mux.open(what)
        self.tie(ch, sock, what)
        return ch

    def write_first(self, data: bytes) -> None:
        """Write ``data`` on the connection ahead of the mux's frames (the
        far side's bootstrap, which it reads before it runs a mux)."""
        self._out.appendleft(memoryview(data).cast("B"))

    def drop(self, ch: int) -> None:
        """Close channel ``ch`` and its socket."""
        loc = self.locals.pop(ch, None)
        if loc is not None:
            self._close_local(loc)
        self.mux.close(ch)

    def close(self) -> None:
        """Close every local socket (the connection is gone)."""
        for ch in list(self.locals):
            self._close_local(self.locals.pop(ch))

    # --- the loop ---------------------------------------------------------------------

    def interest(self) -> list[tuple[int, int]]:
        """The (descriptor, poll events) the loop waits on."""
        self._take_output()
        fds: list[tuple[int, int]] = []
        if self.connected:
            fds.append((self.rfd, _POLLIN))
            if self._out:
                if self.wfd == self.rfd:
                    fds[0] = (self.rfd, _POLLIN | _POLLOUT)
                else:
                    fds.append((self.wfd, _POLLOUT))
        pending = self.mux.pending
        connected = self.connected
        for ch, loc in self.locals.items():
            events = 0
            if not loc.eof_in and connected and pending(ch) < M.WINDOW:
                events = _POLLIN
            if loc.out and any(not isinstance(x, socket.socket) for x in loc.out):
                events |= _POLLOUT
            if events:
                fds.append((loc.fd, events))
        return fds

    def ready(self, fd: int, events: int) -> None:
        """Handle one descriptor ``poll`` found ready."""
        if fd == self.rfd and events & (_POLLIN | select.POLLHUP | select.POLLERR):
            self._read_connection()
        if fd == self.wfd and events & (_POLLOUT | select.POLLHUP | select.POLLERR):
            self._write_connection()
        if fd in (self.rfd, self.wfd):
            return
        for ch, loc in list(self.locals.items()):
            if loc.fd == fd:
                if events & (_POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_local(ch, loc)
                if events & (_POLLOUT | select.POLLERR) and ch in self.locals:
                    self._write_local(ch, loc)
                break

    def send_direct(self, ch: int, data: bytes | memoryview) -> bool:
        """Send ``data`` on channel ``ch`` as if it had been read from its
        local socket, from the owner's thread: True if it went into the mux
        (and onto the connection, as much as it takes now: see ``stalled``).
        False if it can't go so, and the owner writes it to the socket
        instead: the channel still carries anyfork's frames, its window is
        full, or what was written to the socket before is not all read yet
        (which is read now, to keep the order, if the window lets it)."""
        loc = self.locals.get(ch)
        if loc is None or not self.connected or loc.eof_in:
            return False
        if len(data) > M.WINDOW:
            loc.behind = True
            return False
        if loc.behind:
            drained = self.drain_local(ch)
            self.flush()  # (what it read: the loop, waiting on the socket, would not see it)
            if not drained:
                return False
            loc.behind = False
        if not loc.raw or self.mux.pending(ch) + len(data) > M.WINDOW:
            loc.behind = True
            return False
        # (The mux keeps what it is given until it is written: a view of a
        # buffer that may change is copied.)
        self.mux.send(ch, data if isinstance(data, bytes) else bytes(data))
        self.flush()
        return True

    def sent_around(self, ch: int) -> None:
        """The owner writes to ``ch``'s local socket (what ``send_direct``
        can't take): the next ``send_direct`` reads that first."""
        loc = self.locals.get(ch)
        if loc is not None:
            loc.behind = True

    def end(self, why: str) -> None:
        """End the connection from the owner's side, saying ``why`` (as the
        peer's going would: DISCONNECTED, every local socket closed)."""
        self._disconnected(why)

    def stalled(self) -> bool:
        """Whether bytes wait for the connection to take them (the loop then
        waits for it to be writable: an owner that sent directly wakes it)."""
        return bool(self._out) and self.connected

    def flush(self) -> None:
        """Write what the connection can take now (without waiting)."""
        self._take_output()
        if self._out and self.connected:
            self._write_connection()

    # --- the connection -------------------------------------------------------------

    def _take_output(self) -> None:
        for part in self.mux.data_to_send():
            self._out.append(memoryview(part).cast("B"))

    def _read_connection(self) -> None:
        # Into a buffer kept for it: a fresh 256 KiB for each read (os.read)
        # is an mmap, an mremap and a munmap, on every read, once glibc's
        # malloc hands out blocks that size by mmap (as a fresh process does).
        try:
            n = os.readv(self.rfd, [self._rbuf])
        except BlockingIOError:
            return
        except OSError:
            n = 0
        data = self._rview[:n]
        try:
            self.mux.receive_data(data)
        except M.MuxError as e:
            self._disconnected(f"the peer broke the protocol: {e}")
            return
        for event in self.mux.events():
            self._event(event)
        for ch, loc in list(self.locals.items()):
            if loc.eof_in and loc.eof_out:
                self._maybe_done(ch, loc)  # credit may have let the last of it out
        if not data:
            self._disconnected("the connection ended")

    def _write_connection(self) -> None:
        while self._out:
            try:
                n = os.writev(self.wfd, list(self._out)[:64])
            except BlockingIOError:
                return
            except OSError as e:
                self._disconnected(f"the connection broke ({e})")
                return
            while n:
                head = self._out[0]
                if n >= len(head):
                    n -= len(head)
                    self._out.popleft()
                else:
                    self._out[0] = head[n:]
                    n = 0

    def _disconnected(self, why: str) -> None:
        if not self.connected:
            return
        self.connected = False
        self._out.clear()
        if self.holding is not None:
            self.give_back()
        # Said first: whoever sees a channel end must find the reason recorded.
        self.on_control(b"DISCONNECTED " + why.encode("utf-8", "replace"))
        self.close()

    def hold(self, ch: int) -> None:
        """Hold back the bytes that come for channel ``ch``, until ``take``,
        rather than write them to its local socket: for an owner that
        reads the connection itself and would read them from the socket's
        other end next (see ``_connection.Writer.wait``).  Only while the
        owner works the relay; ``take`` ends it."""
        self.holding = ch

    def take(self, ch: int, unread: Callable[[], bool]) -> bytes | None:
        """End ``hold``: the bytes held for ``ch``, as if read from its
        local socket's other end (the peer is credited for them), or None.
        None if nothing was held, or if they can't be taken so: something
        else waits to be written to the socket first (a descriptor), or
        ``unread()`` says its other end has bytes not read yet; then they
        are written to the socket, behind those, as usual."""
        self.holding = None
        loc = self.locals.get(ch)
        if loc is None or not loc.out:
            return None
        out = loc.out
        if unread() or any(isinstance(x, socket.socket) for x in out):
            self._write_local(ch, loc)
            return None
        data = b"".join(out)  # type: ignore[arg-type]
        out.clear()
        self.mux.consumed(ch, len(data))
        return data

    def give_back(self) -> None:
        """Write what ``hold`` kept to its socket, and hold no more: before
        anything else happens on the connection that must come after it."""
        ch, self.holding = self.holding, None
        loc = self.locals.get(ch) if ch is not None else None
        if loc is not None and loc.out:
            self._write_local(ch, loc)  # type: ignore[arg-type]

    def _event(self, event: M.Event) -> None:
        kind, ch = event.kind, event.channel
        if kind == M.DATA:
            loc = self.locals.get(ch)
            if loc is None:
                return  # we dropped it; the mux answers with CLOSE
            loc.out.append(event.data)
            if ch != self.holding:
                self._write_local(ch, loc)
            return
        if self.holding is not None:
            self.give_back()  # (an EOF, a CLOSE, a control message: in order)
        if kind == M.CONTROL:
            self.on_control(event.data)
        elif kind == M.OPEN:
            what = event.data.decode("utf-8", "replace")
            if what.startswith("fd:"):
                self._descriptor_channel(ch, what)
                return
            sock = self.on_open(ch, what)
            if sock is None:
                self.mux.close(ch)
            else:
                self.tie(ch, sock, what)
        elif kind == M.EOF:
            loc = self.locals.get(ch)
            if loc is not None:
                loc.eof_out = True
                self._write_local(ch, loc)
        elif kind == M.CLOSE:
            loc = self.locals.pop(ch, None)
            if loc is not None:
                self._close_local(loc)

    def _descriptor_channel(self, ch: int, what: str) -> None:
        """The peer sends a socket ("fd:<channel>:<role>"): make ours, and
        queue its other end to go with the next byte written on <channel>."""
        _, _, rest = what.partition(":")
        owner_text, _, _role = rest.partition(":")
        owner = self.locals.get(int(owner_text)) if owner_text.isdigit() else None
        if owner is None:
            self.mux.close(ch)
            return
        mine, theirs = socket.socketpair()
        self.tie(ch, mine, what)
        owner.out.append(theirs)

    # --- local sockets -----------------------------------------------------------------

    def drain_local(self, ch: int) -> bool:
        """Read channel ``ch``'s local socket now, as the loop would, until
        it would block (True: everything written to it has gone into the
        mux), or until the channel's window stops the reading or the
        channel ends (False).  For an owner that sends on ``ch`` itself
        and must not overtake what was written to the socket before."""
        loc = self.locals.get(ch)
        while loc is not None and self.locals.get(ch) is loc and not loc.eof_in and self.connected:
            if self.mux.pending(ch) >= M.WINDOW:
                return False
            if not self._read_local(ch, loc):
                return True
        return False

    def _read_local(self, ch: int, loc: _Local) -> bool:
        """One read of ``loc``'s socket; False if there was nothing to read."""
        try:
            data, anc, flags, _ = loc.sock.recvmsg(_READ, _ANC, _RECV_FLAGS)
        except BlockingIOError:
            return False
        except OSError:
            self.drop(ch)
            return True
        if data and not anc and loc.raw and not loc.unattached and not flags & _CTRUNC:
            self.mux.send(ch, data)  # the common case: the user's bytes, as they came
            return True
        fds = _fds_in(anc)
        carried = []
        refused = bool(flags & _CTRUNC)
        for fd in fds:
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                refused = True
                continue
            if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
                s.close()
                refused = True
                continue
            carried.append(s)
        if refused:
            for s in carried:
                s.close()
            self.drop(ch)  # it can't arrive whole: break it rather than corrupt it
            return True
        loc.unattached.extend(carried)
        if data:
            try:
                pieces = _frames(loc, data)
            except ValueError:
                self.drop(ch)  # a frame counts descriptors that never came
                return True
            for piece in pieces:
                if isinstance(piece, list):
                    for role in piece:
                        self.open(f"fd:{ch}:{role}", loc.unattached.popleft())
                else:
                    self.mux.send(ch, piece)
        else:
            loc.eof_in = True
            self.mux.eof(ch)
            self._maybe_done(ch, loc)
        return True

    def _write_local(self, ch: int, loc: _Local) -> None:
        sent = 0
        try:
            while loc.out:
                head = loc.out[0]
                if isinstance(head, socket.socket):
                    # Every socket in a row goes with the next byte, which
                    # may not have come yet.
                    socks: list[socket.socket] = []
                    for item in loc.out:
                        if not isinstance(item, socket.socket):
                            break
                        socks.append(item)
                    if len(socks) == len(loc.out):
                        break
                    data = loc.out[len(socks)]
                    assert not isinstance(data, socket.socket)
                    fds = b"".join(_pack_fd(s.fileno()) for s in socks)
                    n = loc.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], _SEND_FLAGS)
                    for s in socks:
                        loc.out.popleft()
                        s.close()
                    head = data
                else:
                    n = loc.sock.send(head, _SEND_FLAGS)
                sent += n
                if n >= len(head):
                    loc.out.popleft()
                else:
                    loc.out[0] = memoryview(head)[n:]
                    break
        except BlockingIOError:
            pass
        except OSError:
            self.mux.consumed(ch, sent)
            self.drop(ch)
            return
        self.mux.consumed(ch, sent)
        if not loc.out and loc.eof_out:
            try:
                loc.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_done(ch, loc)

    def _maybe_done(self, ch: int, loc: _Local) -> None:
        """Both directions ended, and what we queued for the peer (waiting
        for its window) has gone, EOF last: the channel is done."""
        if loc.eof_in and loc.eof_out and not loc.out and self.mux.sent_all(ch):
            self.drop(ch)

    @staticmethod
    def _close_local(loc: _Local) -> None:
        for item in loc.out:
            if isinstance(item, socket.socket):
                item.close()
        loc.out.clear()
        while loc.unattached:
            loc.unattached.popleft().close()
        _drain(loc.sock)
        loc.sock.close()


def _fds_in(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(raw[: len(raw) - len(raw) % 4]).cast("i"))
    return fds


def _drain(sock: socket.socket) -> None:
    """Read (and drop) what is still queued on the non-blocking ``sock``,
    closing the descriptors in it: a Unix socket closed with unread data
    makes its peer's next read fail with ECONNRESET, where a channel that
    ended should read as a plain EOF.  Bounded, for a peer that keeps writing."""
    for _ in range(64):
        try:
            data, anc, _, _ = sock.recvmsg(_READ, _ANC, _RECV_FLAGS)
        except OSError:  # BlockingIOError: nothing more queued
            return
        for fd in _fds_in(anc):
            os.close(fd)
        if not data:
            return


# anyfork's frame header (see _protocol): version u8, kind u8, fds u16, length u64.
_HSIZE = 12
_FORK, _RUN, _SPAWN, _SPARE = 6, 7, 11, 67


def _roles(kind: int, nfds: int) -> list[str]:
    """What the descriptors of a frame are (see ``_protocol``): the new
    process's command socket, the template's report channel, or the user's."""
    if kind == _FORK and nfds in (1, 2):
        return ["cmd", "report"][:nfds]
    if kind == _SPAWN and nfds == 1:
        return ["report"]
    if kind == _SPARE and nfds == 1:
        return ["cmd"]
    return ["raw"] * nfds


def _frames(loc: _Local, data: bytes) -> list[bytes | list[str]]:
    """Cut ``data`` where descriptors go: bytes to send, and before a frame
    that carries descriptors, the roles of those of ``loc.unattached`` that
    go with it (see ``_roles``).

    Raises ValueError if a frame counts more descriptors than have come.
    """
    out: list[bytes | list[str]] = []
    view = memoryview(loc.header + data) if loc.header else memoryview(data)
    loc.header = b""
    pos = start = 0
    end = len(view)
    while pos < end and not loc.raw:
        if loc.skip:
            step = min(loc.skip, end - pos)
            pos += step
            loc.skip -= step
            continue
        if end - pos < _HSIZE:
            loc.header = bytes(view[pos:])  # the rest of this header comes with the next read
            end = pos
            break
        nfds = int.from_bytes(view[pos + 2 : pos + 4], "little")
        length = int.from_bytes(view[pos + 4 : pos + 12], "little")
        if nfds:
            if nfds > len(loc.unattached) - sum(len(p) for p in out if isinstance(p, list)):
                raise ValueError("a frame counts descriptors that never came")
            if pos > start:
                out.append(bytes(view[start:pos]))
            out.append(_roles(view[pos + 1], nfds))
            start = pos
        if view[pos + 1] == _RUN:
            loc.raw = True
        pos += _HSIZE
        loc.skip = length
    if loc.raw and loc.unattached:
        # The user's stream: what came goes with the start of this read.
        extra = len(loc.unattached) - sum(len(p) for p in out if isinstance(p, list))
        if extra > 0:
            out.insert(0, ["raw"] * extra)
    if end > start:
        out.append(bytes(view[start:end]))
    return out


def _pack_fd(fd: int) -> bytes:
    return fd.to_bytes(4, "little", signed=True) if _LITTLE else fd.to_bytes(4, "big", signed=True)


_LITTLE = __import__("sys").byteorder == "little"


class Poller:
    """A ``select.poll`` kept from one wait to the next, registered anew
    only where what to wait on changed (a fresh one per wait is a register
    call per descriptor, every time).  ``poll`` keeps descriptor numbers,
    not kernel state, so a closed descriptor's number needs nothing more
    than leaving the list."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._registered: dict[int, int] = {}

    def poll(self, fds: list[tuple[int, int]], timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait on ``fds`` ((descriptor, events) pairs; a descriptor may
        come more than once): what is ready."""
        want = dict(fds)
        if len(want) != len(fds):  # a descriptor more than once: all of its events
            want = {}
            for fd, events in fds:
                want[fd] = want.get(fd, 0) | events
        had = self._registered
        if want != had:
            p = self._poll
            for fd in had:
                if fd not in want:
                    p.unregister(fd)
            for fd, events in want.items():
                if had.get(fd) != events:
                    p.register(fd, events)  # (or modify: the same for an fd registered)
            self._registered = want
        return self._poll.poll(timeout)


#: While the connection is lent (see run), the loop looks again every
#: LENT_MS, LENT_LOOKS times; then it waits to be woken.
LENT_MS = 2
LENT_LOOKS = 5


def run(relay: Relay, wake_fd: int = -1, until: Callable[[], bool] | None = None, *,
        lock: AbstractContextManager[object] | None = None,
        others: dict[int, Callable[[], None]] | None = None,
        lent: Callable[[int], bool] | None = None) -> None:
    """Run ``relay`` until the connection is gone and every channel closed,
    or ``until()`` says to stop.

    Args:
        wake_fd: readable when the owner added work from another thread
            (drained here).
        until: (called under ``lock``) whether to stop now.
        lock: held while the relay works (never while it waits), for an
            owner whose other threads open channels.
        others: more descriptors to wait on, each with what to call when
            it is readable (the caller's side reads ssh's stderr so).
        lent: (called under ``lock``, with how many waits in a row found
            it so) whether another thread of the owner's reads the
            connection now, in this loop's place (a caller waiting for a
            reply: see ``_connection.Writer.wait``).  Then the loop leaves
            reading it alone, and looks again every ``LENT_MS``, so a short
            loan is given back without a wake-up; after ``LENT_LOOKS``
            looks it waits until it is woken (the owner, told so by the
            count, wakes it when the loan ends).
    """
    poller = Poller()
    held = lock if lock is not None else _NO_LOCK
    others = others or {}
    rfd = relay.rfd
    lent_waits = 0
    while relay.connected or relay.locals:
        with held:
            # (Under the lock: the owner's other threads change what it
            # looks at, as Connection._finished's processes and channels.)
            if until is not None and until():
                return
            fds = relay.interest()
            lending = lent is not None and lent(lent_waits)
        lent_waits = lent_waits + 1 if lending else 0
        if lending:
            fds = [(fd, events & ~_POLLIN) if fd == rfd else (fd, events) for fd, events in fds]
            fds = [(fd, events) for fd, events in fds if events]
        if wake_fd >= 0:
            fds.append((wake_fd, _POLLIN))
        fds.extend((fd, _POLLIN) for fd in others)
        if not fds:
            return
        ready = poller.poll(fds, LENT_MS if lending and lent_waits <= LENT_LOOKS else None)
        with held:
            lending = lent is not None and lent(lent_waits)  # (it may have been lent while this waited)
            for fd, events in ready:
                if fd == wake_fd:
                    try:
                        os.read(wake_fd, 4096)
                    except OSError:
                        pass
                elif fd in others:
                    others[fd]()
                elif fd == rfd and lending:
                    if events & _POLLOUT:
                        relay.ready(fd, _POLLOUT)  # the borrower reads; writing is still ours
                else:
                    relay.ready(fd, events)
            relay.flush()
            if not relay.connected:
                relay.close()
                return


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()

"""Many byte streams over one: the channels a remote connection carries.

Theory of operation
-------------------
A remote host is reached through one byte stream (ssh's stdin and stdout).
Every process anyfork runs there needs streams of its own to the caller: its
command socket, a template's report channel, the socket ``run`` hands to the
function.  This module carries any number of such *channels* over the one
stream, sans-io (h11 style): ``receive_data`` takes bytes in and
``next_event`` hands events out; ``send_*`` queue frames and
``data_to_send`` takes the bytes to write.  Both ends run the same code.

    frame = <channel u32> <kind u8> <length u32> payload    (little endian)

    OPEN    ch, what the channel is for (text)    a new channel, ch chosen by its opener
    DATA    ch, bytes                               counted against the receiver's window
    EOF     ch                                      the sender sends nothing more on ch
    CLOSE   ch                                      done with ch; answered by a CLOSE
    CREDIT  ch, u32 n                               the receiver took n more bytes off ch
    CONTROL 0, bytes                                messages of the connection itself

A channel is forgotten once CLOSEs have gone both ways (crossing CLOSEs
count), so a frame can never name a channel its receiver no longer knows:
one that does is garbage.  Frames that arrive on a channel this side has
closed, before the peer's answer, are dropped.

Flow control: each channel starts with a window of ``WINDOW`` bytes in each
direction.  DATA beyond what the peer has granted stays queued here (the
sender's ``pending(ch)`` grows, and its driver stops reading the local
socket that feeds ch); the receiver grants CREDIT as its driver hands the
bytes on (``consumed``).  So a slow reader on one side never makes the
other side's memory grow beyond a window per channel, and one stalled
channel never stops the others.  Credit goes back in lumps of at least
``GRANT`` bytes, or at once after the peer's EOF (so that ``sent_all``
comes true): a CREDIT per DATA doubled the frames of a request and its
reply, and woke the far side for each.

Channel numbers: the side that opens a channel picks its number, the
caller's side odd numbers and the remote side even ones, so the two never
pick the same one.  0 is the connection's own.

This module imports only the standard library: it is sent, as source, to
the remote interpreter.
"""

from __future__ import annotations

import struct
from collections import deque

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import NoReturn

VERSION = 1
HEADER = struct.Struct("<IBI")
HSIZE = HEADER.size
WINDOW = 1 << 18  # bytes in flight per channel and direction
GRANT = WINDOW // 4  # credit is granted in lumps this big (see the module doc)
MAX_FRAME = 1 << 16  # largest DATA payload written: bounds a frame's stall of the others
MAX_PAYLOAD = 1 << 24  # larger is garbage (CONTROL messages carry module sources)

OPEN, DATA, EOF, CLOSE, CREDIT, CONTROL = 1, 2, 3, 4, 5, 6
_KINDS = frozenset((OPEN, DATA, EOF, CLOSE, CREDIT, CONTROL))
_U32 = struct.Struct("<I")


class MuxError(Exception):
    """The peer broke the multiplexing protocol (garbage, an unknown
    channel, more data than its window)."""


class Event:
    """What the peer said: ``kind`` (OPEN, DATA, EOF, CLOSE or CONTROL), the
    channel and the payload (for OPEN, what the channel is for)."""

    __slots__ = ("channel", "data", "kind")

    def __init__(self, kind: int, channel: int, data: bytes) -> None:
        self.kind = kind
        self.channel = channel
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.kind}, {self.channel}, {self.data[:32]!r}{'...' if len(self.data) > 32 else ''})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Event) and (self.kind, self.channel, self.data)
                == (other.kind, other.channel, other.data))

    def __hash__(self) -> int:
        return hash((self.kind, self.channel, self.data))


class _Channel:
    __slots__ = ("closed_here", "closed_there", "eof_here", "eof_sent", "eof_there", "pending",
                 "pending_bytes", "send_window", "unacked", "ungranted")

    def __init__(self) -> None:
        self.send_window = WINDOW  # bytes the peer lets us send now
        self.unacked = 0  # bytes we received and our driver has not consumed
        self.ungranted = 0  # bytes our driver consumed and the peer has no credit for yet
        self.pending: deque[memoryview] = deque()  # DATA waiting for window
        self.pending_bytes = 0
        self.eof_here = False  # we queued EOF (sent once pending is out)
        self.eof_sent = False  # and it went out: nothing more, ever
        self.eof_there = False
        self.closed_here = False
        self.closed_there = False


class Mux:
    """One end of a multiplexed connection.

    Args:
        caller: True on the caller's side (it opens odd channels), False on
            the remote side (even ones).
    """

    def __init__(self, caller: bool) -> None:
        self.caller = caller
        self._next = 1 if caller else 2
        self._channels: dict[int, _Channel] = {}
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._buf = bytearray()
        self._events: deque[Event] = deque()
        self._dead = False

    # --- sending -------------------------------------------------------------------

    def open(self, what: str) -> int:
        """Open a channel; its number."""
        ch = self._next
        self._next += 2
        self._channels[ch] = _Channel()
        self._frame(ch, OPEN, what.encode("utf-8", "surrogatepass"))
        return ch

    def send(self, ch: int, data: bytes | memoryview) -> None:
        """Queue bytes on ``ch``; what the window doesn't allow waits here."""
        c = self._chan(ch)
        if c.eof_here or c.closed_here:
            raise MuxError(f"channel {ch}: send after EOF")
        if not data:
            return
        view = memoryview(data).cast("B")
        c.pending.append(view)
        c.pending_bytes += len(view)
        self._pump(ch, c)

    def pending(self, ch: int) -> int:
        """Bytes queued on ``ch`` that the peer's window does not allow yet
        (a driver stops reading the local source of ``ch`` while this is large)."""
        c = self._channels.get(ch)
        return 0 if c is None else c.pending_bytes

    def sent_all(self, ch: int) -> bool:
        """Whether everything queued on ``ch`` and its EOF have gone out and
        the peer has handed every byte on (its credit is all back), or the
        channel is gone: only then may it be closed without losing data.
        (A CLOSE ends the channel at the peer at once: bytes it still held
        for its local socket would be dropped.)"""
        c = self._channels.get(ch)
        return c is None or c.closed_here or (c.eof_sent and c.send_window == WINDOW)

    def eof(self, ch: int) -> None:
        """Nothing more will be sent on ``ch`` (sent after what is pending)."""
        c = self._chan(ch)
        if not c.eof_here:
            c.eof_here = True
            self._pump(ch, c)

    def close(self, ch: int) -> None:
        """Close ``ch`` for good: pending data is dropped, the peer is told."""
        c = self._channels.get(ch)
        if c is None or c.closed_here:
            return
        c.closed_here = True
        c.pending.clear()
        c.pending_bytes = 0
        self._frame(ch, CLOSE, b"")
        if c.closed_there:
            del self._channels[ch]

    def consumed(self, ch: int, n: int) -> None:
        """The driver handed ``n`` received bytes of ``ch`` on: grant them back."""
        c = self._channels.get(ch)
        if c is None or c.closed_here or n <= 0:
            return
        c.unacked -= n
        c.ungranted += n
        if c.ungranted >= GRANT or c.eof_there:
            self._grant(ch, c)

    def _grant(self, ch: int, c: _Channel) -> None:
        self._frame(ch, CREDIT, _U32.pack(c.ungranted))
        c.ungranted = 0

    def control(self, data: bytes) -> None:
        """Queue a message of the connection itself (channel 0)."""
        self._frame(0, CONTROL, data)

    def data_to_send(self) -> list[bytes | memoryview]:
        """The bytes to write, in order (taken: the caller writes them all)."""
        out, self._out = self._out, []
        self._out_bytes = 0
        return out

    def has_output(self) -> bool:
        return bool(self._out)

    def channels(self) -> list[int]:
        return list(self._channels)

    # --- receiving -----------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Bytes read from the connection; b"" at its end."""
        if self._dead:
            raise MuxError("connection already failed")
        if not data:
            if self._buf:
                self._fail("the connection ended inside a frame")
            self._dead = True
            return
        self._buf += data
        try:
            self._parse()
        except MuxError:
            self._dead = True
            raise

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[Event]:
        while self._events:
            yield self._events.popleft()

    # --- inside ----------------------------------------------------------------------

    def _chan(self, ch: int) -> _Channel:
        c = self._channels.get(ch)
        if c is None:
            raise MuxError(f"no channel {ch}")
        return c

    def _frame(self, ch: int, kind: int, payload: bytes | memoryview) -> None:
        self._out.append(HEADER.pack(ch, kind, len(payload)))
        if payload:
            self._out.append(payload)
        self._out_bytes += HSIZE + len(payload)

    def _pump(self, ch: int, c: _Channel) -> None:
        while c.pending and c.send_window > 0:
            view = c.pending[0]
            n = min(len(view), c.send_window, MAX_FRAME)
            self._frame(ch, DATA, view[:n])
            c.send_window -= n
            c.pending_bytes -= n
            if n == len(view):
                c.pending.popleft()
            else:
                c.pending[0] = view[n:]
        if not c.pending and c.eof_here and not c.closed_here and not c.eof_sent:
            self._frame(ch, EOF, b"")
            c.eof_sent = True

    def _fail(self, why: str) -> NoReturn:
        self._dead = True
        raise MuxError(why)

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HSIZE:
            ch, kind, length = HEADER.unpack_from(buf, pos)
            if kind not in _KINDS:
                self._fail(f"unknown frame kind {kind}")
            if length > MAX_PAYLOAD:
                self._fail(f"frame length {length} is absurd")
            if len(buf) - pos - HSIZE < length:
                break
            payload = bytes(buf[pos + HSIZE : pos + HSIZE + length])
            pos += HSIZE + length
            self._handle(ch, kind, payload)
        del buf[:pos]

    def _handle(self, ch: int, kind: int, payload: bytes) -> None:
        if kind == CONTROL:
            if ch != 0:
                self._fail(f"CONTROL on channel {ch}")
            self._events.append(Event(CONTROL, 0, payload))
            return
        if ch == 0:
            self._fail("channel 0 carries only CONTROL")
        if kind == OPEN:
            theirs = (ch % 2 == 0) == (self._next % 2 == 1)
            if not theirs or ch in self._channels:
                self._fail(f"OPEN of channel {ch}, which is not the peer's to open")
            self._channels[ch] = _Channel()
            self._events.append(Event(OPEN, ch, payload))
            return
        c = self._channels.get(ch)
        if c is None:
            self._fail(f"frame kind {kind} on unknown channel {ch}")
        if kind == CLOSE:
            # The peer is done with ch.  Answer with our CLOSE unless ours is
            # already on its way; either way the channel is gone once both
            # CLOSEs have crossed, so no late frame can ever name it.
            c.closed_there = True
            if not c.closed_here:
                self._events.append(Event(CLOSE, ch, b""))
                self.close(ch)
            else:
                del self._channels[ch]
            return
        if c.closed_there:
            self._fail(f"frame kind {kind} on channel {ch} after its CLOSE")
        if c.closed_here:
            return  # sent before the peer heard our CLOSE: dropped
        if kind == DATA:
            if c.eof_there:
                self._fail(f"DATA on channel {ch} after its EOF")
            c.unacked += len(payload)
            if c.unacked > WINDOW:
                self._fail(f"channel {ch}: the peer sent beyond its window")
            self._events.append(Event(DATA, ch, payload))
        elif kind == CREDIT:
            if len(payload) != 4:
                self._fail("CREDIT of the wrong size")
            # (Credit keeps coming after our EOF: sent_all waits for all of it.)
            c.send_window += _U32.unpack(payload)[0]
            if c.send_window > WINDOW:
                self._fail(f"channel {ch}: credit beyond the window")
            self._pump(ch, c)
        else:  # EOF
            if c.eof_there:
                self._fail(f"second EOF on channel {ch}")
            c.eof_there = True
            if c.ungranted:
                self._grant(ch, c)  # nothing more comes: the peer's sent_all waits for this
            self._events.append(Event(EOF, ch, b""))

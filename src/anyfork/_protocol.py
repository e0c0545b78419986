"""The wire protocol between a caller and the processes it prepares.

Theory of operation
-------------------
Every process anyfork creates runs the serve loop (``_serve.py``) on one end of
a private ``AF_UNIX`` stream socketpair; the caller holds the other end.  The
caller writes *commands* (require, eval, send_arg, send_fh, fork, run, ...).
A process that has been forked from (a *template*) also gets a second
socketpair, its *report channel*, on which it tells the caller the pid and
the exit status of each process it forked.  Nothing of anyfork's is ever
written back on a command socket, so the socket ``run`` hands to both ends
carries only what the user writes on it.

A fork comes two ways.  ``FORK`` carries the child's end of a socketpair
the caller made; the template forks and reports ``PID``.  ``SPAWN`` asks the
template to fork *ahead*: it makes the socketpair itself and sends the
caller's end back with the pid in a ``SPARE`` report, so the process is
already waiting on its socket when the caller hands it out.

Both directions use the same framing::

    header = <version u8> <kind u8> <number of fds u16> <payload length u64>
    frame  = header payload

All integers are little endian.  Every frame carries the version, so a stream
never needs a handshake and a process forked mid-stream starts a fresh one.

Descriptors travel with SCM_RIGHTS.  A frame that carries descriptors is sent
in its own ``sendmsg`` whose ancillary data holds exactly that frame's
descriptors (at most 253, the kernel's per-message limit; larger sets are
split over several frames by the encoder's callers).  The kernel delivers
ancillary data together with the first byte of the message it was sent with,
so by the time the decoder sees a frame's first byte it has that frame's
descriptors, and any descriptor left over when the buffered bytes run out
belongs to no frame: that is a protocol error.

Payloads that hold strings are a sequence of items, each
``<tag u8> <length u64> <bytes>`` with tag ``b`` for bytes and ``s`` for text
(UTF-8 with surrogates passed through, so any Python ``str`` round-trips).

This module does no I/O beyond closing descriptors it owns.  ``Decoder``
takes bytes and descriptors in and hands frames out (h11 style: ``feed`` then
``next_frame`` until it returns ``None``); ``Outbox`` holds encoded frames
until a driver has written them.  The blocking and asyncio drivers and the
serve loop are short loops around these two.  It imports only the standard
library and nothing else of anyfork's, because the serve loop, which must
start fast and will one day be shipped to remote hosts, imports it.
"""

from __future__ import annotations

import os
import struct
from collections import deque

# Not "from typing import TYPE_CHECKING": see _serve.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    Buffer = bytes | memoryview
    Item = bytes | str

VERSION = 1
HEADER = struct.Struct("<BBHQ")
MAX_FDS = 253  # SCM_MAX_FD on Linux; fewer would do elsewhere
# A length beyond this is garbage, not a real payload: refuse it before
# waiting for a terabyte that will never come.
MAX_PAYLOAD = 1 << 40

# Commands, caller -> process.
PATH = 1  # items: the sys.path the process should use
REQUIRE = 2  # items: module names to import
EVAL = 3  # items: code, then its args
ARG = 4  # items: arguments for run
FH = 5  # no payload; 1..MAX_FDS descriptors for run
FORK = 6  # u64 seq, u8 flags; fds: new command socket [, report socket]
RUN = 7  # UTF-8 name of the function to call
KILL = 8  # u64 seq, i32 signal: signal a process this template forked
SITE = 10  # items: directories to process as site.addsitedir does
SPAWN = 11  # u64 seq, u8 flags; fds: [report socket]: fork one ahead, connected
MAIN = 12  # items: how to find the caller's main module ("path" or "module", then it)
TIE = 13  # i32 signal, i64 owner's pid, u8 flags: get the signal when the owner dies

# Reports, template -> caller, on the report channel.
PID = 64  # u64 seq, i64 pid
EXIT = 65  # u64 seq, i64 returncode (subprocess convention)
FAILED = 66  # u64 seq, UTF-8 reason: the fork did not happen
SPARE = 67  # u64 seq, i64 pid; fd: the caller's end of that process's command socket
LOST = 68  # u64 seq, i64 pid: it exited, but someone else collected its status

# The failure record, process -> caller, one datagram on the caller's
# failure sink (see "Failures before the function" below).
FAILURE = 80  # i64 pid, i64 parent pid, u64 seq; items: type name, message, traceback

FORK_NEW_REPORTS = 1  # flag: the second descriptor is the report channel

_SEQ = struct.Struct("<Q")
_SEQ_FLAGS = FORK_PAYLOAD = struct.Struct("<QB")
_SEQ_INT = struct.Struct("<Qq")
_SEQ_SIG = struct.Struct("<Qi")
_TIE = struct.Struct("<iqB")
TIE_BY_PARENT = 1  # flag: the parent is the owner's single forking thread (PR_SET_PDEATHSIG)
_ITEM = struct.Struct("<cQ")


class Shape:
    """What a frame of one kind may carry: the policy half of the protocol.

    ``min_fds``..``max_fds`` descriptors, and a payload of exactly ``size``
    bytes (-1: any length up to ``MAX_PAYLOAD``).  ``refused``, when set,
    says why a side that knows the kind won't take it (see ``without_fds``).
    """

    __slots__ = ("max_fds", "min_fds", "refused", "size")

    def __init__(self, min_fds: int = 0, max_fds: int = 0, size: int = -1, refused: str = "") -> None:
        self.min_fds = min_fds
        self.max_fds = max_fds
        self.size = size
        self.refused = refused

    def allows(self, nfds: int, length: int) -> bool:
        return self.min_fds <= nfds <= self.max_fds and (self.size < 0 or length == self.size)

    def __repr__(self) -> str:
        refused = ", refused" if self.refused else ""
        return f"Shape({self.min_fds}..{self.max_fds} fds, size {self.size}{refused})"


# The command table: what each command carries.  The Decoder enforces it;
# the handlers of a command may check more (flags against descriptors).
COMMAND_TABLE: dict[int, Shape] = {
    PATH: Shape(),
    REQUIRE: Shape(),
    EVAL: Shape(),
    ARG: Shape(),
    FH: Shape(1, MAX_FDS, 0),
    FORK: Shape(1, 2, FORK_PAYLOAD.size),  # the command socket [, the report channel]
    RUN: Shape(),
    KILL: Shape(size=_SEQ_SIG.size),
    SITE: Shape(),
    SPAWN: Shape(0, 1, FORK_PAYLOAD.size),  # [the report channel]
    MAIN: Shape(),
    TIE: Shape(size=_TIE.size),
}
# The report table, template -> caller.
REPORT_TABLE: dict[int, Shape] = {
    PID: Shape(size=_SEQ_INT.size),
    EXIT: Shape(size=_SEQ_INT.size),
    FAILED: Shape(),  # at least the seq: decode_failed checks
    SPARE: Shape(1, 1, _SEQ_INT.size),  # the caller's end of the new process's socket
    LOST: Shape(size=_SEQ_INT.size),
}

# The failure sink's table: one kind, one frame per datagram.
FAILURE_TABLE: dict[int, Shape] = {FAILURE: Shape()}

COMMANDS = frozenset(COMMAND_TABLE)
REPORTS = frozenset(REPORT_TABLE)
_SHAPES = {**COMMAND_TABLE, **REPORT_TABLE}
NAMES = {PATH: "PATH", REQUIRE: "REQUIRE", EVAL: "EVAL", ARG: "ARG", FH: "FH", FORK: "FORK",
         RUN: "RUN", KILL: "KILL", SITE: "SITE", SPAWN: "SPAWN", MAIN: "MAIN", TIE: "TIE", PID: "PID",
         EXIT: "EXIT", FAILED: "FAILED", SPARE: "SPARE", LOST: "LOST", FAILURE: "FAILURE"}


def without_fds(table: dict[int, Shape], transport: str) -> dict[int, Shape]:
    """``table`` for a stream that can't carry descriptors (a pipe pair).

    Every kind that may carry descriptors (FH, FORK, and SPAWN, whose
    process forked ahead would come back as a descriptor) is refused at its
    header, with ``RefusedError``, instead of waiting for descriptors that
    can never come.
    """
    return {kind: Shape(refused=f"{NAMES.get(kind, kind)} carries descriptors, which {transport} can't")
            if shape.max_fds else shape for kind, shape in table.items()}


class ProtocolError(Exception):
    """The peer sent a stream that is not a well-formed anyfork stream.

    The serve loop reports this as "stream corrupted"; the caller's side
    re-raises it as ``anyfork.ProtocolError``.
    """


class RefusedError(ProtocolError):
    """A well-formed frame of a kind this side refuses (``Shape.refused``)."""


class TruncatedError(ProtocolError):
    """The stream ended inside a frame: its writer stopped part-way (a caller
    that cancelled a write, or exited), not garbage."""


class Frame:
    """One decoded frame: its kind, its payload and the descriptors it carried.

    The descriptors belong to whoever takes the frame; ``close`` closes the
    ones still attached.
    """

    __slots__ = ("fds", "kind", "payload")

    def __init__(self, kind: int, payload: bytes, fds: list[int]) -> None:
        self.kind = kind
        self.payload = payload
        self.fds = fds

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            close_fd(fd)

    def __repr__(self) -> str:
        return f"Frame(kind={self.kind}, len={len(self.payload)}, fds={self.fds})"


def close_fd(fd: int) -> None:
    """Close a descriptor we own, ignoring one that is already gone."""
    try:
        os.close(fd)
    except OSError:
        pass


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        close_fd(fd)


# --- encoding ----------------------------------------------------------------


def encode_items(items: Iterable[Item]) -> list[Buffer]:
    """Encode bytes/str items as payload parts, without copying large bytes."""
    parts: list[Buffer] = []
    for item in items:
        if isinstance(item, str):
            data = item.encode("utf-8", "surrogatepass")
            parts.append(_ITEM.pack(b"s", len(data)))
            parts.append(data)
        else:
            parts.append(_ITEM.pack(b"b", len(item)))
            if item:
                parts.append(memoryview(item))
    return parts


def frame(kind: int, parts: Sequence[Buffer] = (), nfds: int = 0) -> list[Buffer]:
    """Prefix payload parts with a header; the result is one frame's bytes."""
    length = sum(len(p) for p in parts)
    return [HEADER.pack(VERSION, kind, nfds, length), *parts]


def items_frame(kind: int, items: Iterable[Item]) -> list[Buffer]:
    return frame(kind, encode_items(items))


def fork_frame(seq: int, new_reports: bool) -> list[Buffer]:
    flags = FORK_NEW_REPORTS if new_reports else 0
    return frame(FORK, [_SEQ_FLAGS.pack(seq, flags)], 2 if new_reports else 1)


def spawn_frame(seq: int, new_reports: bool) -> list[Buffer]:
    flags = FORK_NEW_REPORTS if new_reports else 0
    return frame(SPAWN, [_SEQ_FLAGS.pack(seq, flags)], 1 if new_reports else 0)


def run_frame(name: str) -> list[Buffer]:
    return frame(RUN, [name.encode("utf-8", "surrogatepass")])


def kill_frame(seq: int, sig: int) -> list[Buffer]:
    return frame(KILL, [_SEQ_SIG.pack(seq, sig)])


def fh_frame(nfds: int) -> list[Buffer]:
    return frame(FH, (), nfds)


# Reports are sent by templates between forks, where every object touched costs
# a copy-on-write fault: keep them to a header constant and one pack.
_PID_HEADER = HEADER.pack(VERSION, PID, 0, _SEQ_INT.size)
_EXIT_HEADER = HEADER.pack(VERSION, EXIT, 0, _SEQ_INT.size)
_SPARE_HEADER = HEADER.pack(VERSION, SPARE, 1, _SEQ_INT.size)


def pid_report(seq: int, pid: int) -> bytes:
    return _PID_HEADER + _SEQ_INT.pack(seq, pid)


def exit_report(seq: int, returncode: int) -> bytes:
    return _EXIT_HEADER + _SEQ_INT.pack(seq, returncode)


def lost_report(seq: int, pid: int) -> bytes:
    return b"".join(frame(LOST, [_SEQ_INT.pack(seq, pid)]))


def spare_report(seq: int, pid: int) -> bytes:
    """A SPARE report; its one descriptor goes in the same sendmsg."""
    return _SPARE_HEADER + _SEQ_INT.pack(seq, pid)


def failed_report(seq: int, reason: str) -> bytes:
    return b"".join(frame(FAILED, [_SEQ.pack(seq), reason.encode("utf-8", "replace")]))


# Failures before the function
# ----------------------------
# A process that fails in anyfork's own work before its function runs (a
# require, an eval, looking the function up, calling it with the wrong
# arguments) exits with status 1, as one that fails in the function does.
# To tell the caller why, it first sends one FAILURE record, as a datagram,
# to the *failure sink*: an AF_UNIX datagram socket of the caller's, whose
# sending end every local process inherits (exec'd ones on descriptor 4).
# A datagram arrives whole or not at all, so processes that fail at once
# can't interleave, and the record is queued before the process exits: a
# caller that sees status 1 finds it there.  Nothing is sent otherwise.
# The record names the process by pid, its parent's pid and its sequence
# number in that parent (0 for a process the caller spawned), so that a
# record nobody collected never passes for a later process with the same pid.
_FAILURE_IDS = struct.Struct("<qqQ")
FAILURE_TEXT_MAX = 8192  # characters per text: a record must fit in one datagram


def failure_record(ids: tuple[int, int, int], texts: tuple[str, str, str]) -> bytes:
    """A FAILURE: ``ids`` (pid, parent pid, seq), ``texts`` (type name,
    message, traceback), each text cut to its last ``FAILURE_TEXT_MAX``."""
    cut = [t if len(t) <= FAILURE_TEXT_MAX else "..." + t[-FAILURE_TEXT_MAX:] for t in texts]
    return b"".join(frame(FAILURE, [_FAILURE_IDS.pack(*ids), *encode_items(cut)]))


def decode_failure(payload: bytes) -> tuple[tuple[int, int, int], list[str]]:
    """A FAILURE's payload: ((pid, parent pid, seq), [type name, message, traceback])."""
    if len(payload) < _FAILURE_IDS.size:
        raise ProtocolError("truncated failure record")
    ids = _FAILURE_IDS.unpack_from(payload)
    texts = decode_strs(payload[_FAILURE_IDS.size :])
    if len(texts) != 3:
        raise ProtocolError(f"failure record with {len(texts)} texts, expected 3")
    return ids, texts


# --- decoding payloads ---------------------------------------------------------


def decode_items(payload: bytes) -> list[Item]:
    items: list[Item] = []
    view = memoryview(payload)
    pos, end = 0, len(payload)
    while pos < end:
        if end - pos < _ITEM.size:
            raise ProtocolError("truncated item header")
        tag, length = _ITEM.unpack_from(view, pos)
        pos += _ITEM.size
        if length > end - pos:
            raise ProtocolError("item longer than its frame")
        data = payload[pos : pos + length] if (pos or length != end) else payload
        pos += length
        if tag == b"s":
            try:
                items.append(data.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError as e:
                raise ProtocolError("text item is not UTF-8") from e
        elif tag == b"b":
            items.append(bytes(data))
        else:
            raise ProtocolError(f"unknown item tag {tag!r}")
    return items


def decode_strs(payload: bytes) -> list[str]:
    items = decode_items(payload)
    if not all(isinstance(i, str) for i in items):
        raise ProtocolError("expected text items")
    return items  # type: ignore[return-value]


def decode_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise ProtocolError("name is not UTF-8") from e


def _unpack(st: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) != st.size:
        raise ProtocolError(f"payload of {len(payload)} bytes, expected {st.size}")
    return st.unpack(payload)


def decode_fork(payload: bytes) -> tuple[int, bool]:
    """FORK's and SPAWN's payload: the sequence number, and whether the frame
    brings the template's report channel."""
    seq, flags = _unpack(_SEQ_FLAGS, payload)
    if flags & ~FORK_NEW_REPORTS:
        raise ProtocolError("unknown fork flags")
    return seq, bool(flags & FORK_NEW_REPORTS)


def decode_seq_int(payload: bytes) -> tuple[int, int]:
    seq, value = _unpack(_SEQ_INT, payload)
    return seq, value


def decode_kill(payload: bytes) -> tuple[int, int]:
    seq, sig = _unpack(_SEQ_SIG, payload)
    return seq, sig


def tie_frame(sig: int, owner: int, flags: int) -> list[Buffer]:
    return frame(TIE, [_TIE.pack(sig, owner, flags)])


def decode_tie(payload: bytes) -> tuple[int, int, int]:
    sig, owner, flags = _unpack(_TIE, payload)
    return sig, owner, flags


def decode_failed(payload: bytes) -> tuple[int, str]:
    if len(payload) < _SEQ.size:
        raise ProtocolError("truncated failure report")
    (seq,) = _SEQ.unpack_from(payload)
    return seq, payload[_SEQ.size :].decode("utf-8", "replace")


# --- the decoder -------------------------------------------------------------------


class Decoder:
    """Turns a byte stream plus received descriptors into frames.

    Framing only: what each kind may carry is the table's (``COMMAND_TABLE``,
    ``REPORT_TABLE``, or one made by ``without_fds``).

    Args:
        table: kind -> ``Shape`` for the kinds this side accepts; any other
            kind is an error.  A set of kinds takes their shapes from the
            tables above.

    ``wanted()`` tells how many bytes complete the current header or payload,
    so a reader that must not read past a frame (the serve loop, which hands
    the rest of its socket to user code after ``RUN``) can ask for exactly
    that much.  After a ``ProtocolError`` the decoder is dead; ``close()``
    closes every descriptor it still holds.
    """

    __slots__ = ("_buf", "_dead", "_fds", "_frame_fds", "_have", "_kind", "_length", "_parts", "_table")

    def __init__(self, table: dict[int, Shape] | frozenset[int]) -> None:
        self._table = table if isinstance(table, dict) else {k: _SHAPES[k] for k in table}
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        # The header of the frame being received, once known.
        self._kind = -1
        self._length = 0
        self._frame_fds: list[int] = []
        self._parts: list[bytes] = []
        self._have = 0  # payload bytes collected in _parts
        self._dead = False

    def wanted(self) -> int:
        if self._kind < 0:
            return HEADER.size - len(self._buf)
        return self._length - self._have - len(self._buf)

    def idle(self) -> bool:
        """True at a frame boundary with nothing buffered."""
        return self._kind < 0 and not self._buf and not self._fds

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the descriptors that arrived with them.

        The decoder owns the descriptors from here on, even if it raises.
        """
        self._fds.extend(fds)
        if self._dead:
            self.close()
            raise ProtocolError("decoder already failed")
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        try:
            return self._next()
        except ProtocolError:
            self._dead = True
            self.close()
            raise

    def _next(self) -> Frame | None:
        if self._dead:
            raise ProtocolError("decoder already failed")
        buf = self._buf
        if self._kind < 0:
            if len(buf) < HEADER.size:
                if not buf and self._fds:
                    raise ProtocolError("descriptors arrived with no frame")
                return None
            version, kind, nfds, length = HEADER.unpack_from(buf)
            if version != VERSION:
                raise ProtocolError(f"protocol version {version}, expected {VERSION}")
            shape = self._table.get(kind)
            if shape is None:
                raise ProtocolError(f"unexpected frame kind {kind}")
            if shape.refused:
                raise RefusedError(shape.refused)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame length {length} is absurd")
            if not shape.allows(nfds, length):
                raise ProtocolError(f"frame kind {kind} with {nfds} descriptors and {length} bytes")
            if len(self._fds) < nfds:
                raise ProtocolError("frame arrived without its descriptors")
            del buf[: HEADER.size]
            self._kind, self._length = kind, length
            self._frame_fds = [self._fds.popleft() for _ in range(nfds)]
        need = self._length - self._have
        if len(buf) < need:
            if buf and need > 65536:
                # Large payload: keep its pieces aside instead of growing the
                # buffer, so collecting it stays linear in its size.
                self._parts.append(bytes(buf))
                self._have += len(buf)
                buf.clear()
            return None
        if self._parts:
            self._parts.append(bytes(buf[:need]))
            payload = b"".join(self._parts)
            self._parts, self._have = [], 0
        else:
            payload = bytes(buf[:need])
        del buf[:need]
        result = Frame(self._kind, payload, self._frame_fds)
        self._kind, self._length, self._frame_fds = -1, 0, []
        if not buf and self._fds:
            result.close()
            raise ProtocolError("descriptors arrived with no frame")
        return result

    def eof(self) -> None:
        """The stream ended: fine at a frame boundary, an error inside one."""
        if not self.idle():
            self._dead = True
            self.close()
            raise TruncatedError("stream ended inside a frame")

    def close(self) -> None:
        for fd in self._frame_fds:
            close_fd(fd)
        self._frame_fds = []
        while self._fds:
            close_fd(self._fds.popleft())


# --- matchers ------------------------------------------------------------------------
#
# The serve loop's hot paths (a forked child's first command, a template's
# fork loop) read a frame without a Decoder: every object a freshly forked
# process touches costs a copy-on-write fault.  These say which frames they
# may take that way; anything else they hand, as read, to a Decoder, which
# owns the errors.  A property test checks that they agree with the Decoder
# and the command table on every frame.  They are flat on purpose: a bytes
# compare or two and one unpack, no objects made.

_RUN_HEAD = HEADER.pack(VERSION, RUN, 0, 0)[:4]  # version, kind, no descriptors
_FORK_ON_CHANNEL = HEADER.pack(VERSION, FORK, 1, FORK_PAYLOAD.size)
_SPAWN_ON_CHANNEL = HEADER.pack(VERSION, SPAWN, 0, FORK_PAYLOAD.size)
_FORK_PLAIN = b"\0"  # the flags byte of a fork payload on the current report channel


def match_run(header: bytes) -> int:
    """The payload length, if ``header`` is a whole header of a RUN that
    carries no descriptors; -1 for any other bytes."""
    if len(header) == HEADER.size and header.startswith(_RUN_HEAD):
        length = int.from_bytes(header[4:], "little")
        if length <= MAX_PAYLOAD:
            return length
    return -1


def match_fork(header: bytes) -> int:
    """1 if ``header`` is a whole header of a FORK on the current report
    channel (one descriptor: the command socket), 0 if of a SPAWN on it (no
    descriptor), -1 for any other bytes.  The number is the descriptors the
    frame carries; its payload is ``FORK_PAYLOAD.size`` bytes."""
    if header == _FORK_ON_CHANNEL:
        return 1
    if header == _SPAWN_ON_CHANNEL:
        return 0
    return -1


def match_fork_payload(payload: bytes) -> int:
    """The sequence number, if ``payload`` is a whole FORK/SPAWN payload
    without flags (no new report channel); -1 otherwise."""
    if len(payload) == FORK_PAYLOAD.size and payload.endswith(_FORK_PLAIN):
        return int.from_bytes(payload[:8], "little")
    return -1


# --- the outbox ----------------------------------------------------------------------


class Outbox:
    """Encoded frames waiting to be written, with the descriptors they carry.

    The outbox owns the descriptors queued with it (callers hand it their own
    duplicates) and closes each once the kernel has taken it, or on
    ``close()``.  A driver loops::

        while outbox:
            buffers, fds = outbox.chunk()
            n = sock.sendmsg(buffers, ancillary(fds))
            outbox.sent(n)
    """

    __slots__ = ("_segments",)

    # Each segment: [remaining bytes of one buffer, descriptors to send with its
    # first byte (None once sent or when it has none)].
    def __init__(self) -> None:
        self._segments: deque[list[object]] = deque()

    def __bool__(self) -> bool:
        return bool(self._segments)

    def __len__(self) -> int:
        """Bytes queued (counted, not kept: a count kept beside the queue
        could be left wrong by an exception between the two)."""
        return sum(len(seg[0]) for seg in self._segments)  # type: ignore[misc, arg-type]

    def put(self, parts: Sequence[Buffer], fds: Sequence[int] = ()) -> None:
        """Queue one frame's parts, all or none: they go in with one C call,
        so an exception at a bytecode boundary (a signal handler's, which
        holding signals on one thread can't keep out of a threaded program)
        never queues a header without its payload."""
        segments: list[list[object]] = []
        queue = self._segments
        try:
            first = True
            for p in parts:
                if not len(p):
                    continue
                view = p if isinstance(p, memoryview) else memoryview(p)
                segments.append([view.cast("B"), list(fds) if first and fds else None])
                first = False
            queue.extend(segments)
        except BaseException:
            # Not queued (the queue would end with this frame's last part):
            # the descriptors are still the outbox's to close.
            if not (segments and queue and queue[-1] is segments[-1]):
                for fd in fds:
                    close_fd(fd)
            raise

    def chunk(self, limit: int = 64) -> tuple[list[memoryview], list[int]]:
        """Buffers for the next ``sendmsg`` and the descriptors to attach.

        A segment with descriptors always starts a chunk, and no later segment
        with descriptors joins it, so each set travels with its own frame.
        """
        buffers: list[memoryview] = []
        fds: list[int] = []
        for seg in self._segments:
            seg_fds = seg[1]
            if seg_fds is not None:
                if buffers:
                    break
                fds = seg_fds  # type: ignore[assignment]
            buffers.append(seg[0])  # type: ignore[arg-type]
            if len(buffers) >= limit:
                break
        return buffers, fds

    def sent(self, n: int) -> None:
        """The kernel took ``n`` bytes (n > 0 means the chunk's fds went too)."""
        if n <= 0:
            return
        segs = self._segments
        first = True
        while n:
            seg = segs[0]
            if first and seg[1] is not None:
                for fd in seg[1]:  # type: ignore[attr-defined]
                    close_fd(fd)
                seg[1] = None
            first = False
            view: memoryview = seg[0]  # type: ignore[assignment]
            if n >= len(view):
                n -= len(view)
                segs.popleft()
            else:
                seg[0] = view[n:]
                n = 0

    def close(self) -> None:
        """Drop everything unsent and close the descriptors it held."""
        for seg in self._segments:
            if seg[1] is not None:
                for fd in seg[1]:  # type: ignore[attr-defined]
                    close_fd(fd)
        self._segments.clear()


def ancillary(fds: Sequence[int], level: int, kind: int) -> list[tuple[int, int, bytes]]:
    """SCM_RIGHTS ancillary data for ``sendmsg`` (socket constants passed in)."""
    if not fds:
        return []
    return [(level, kind, struct.pack(f"{len(fds)}i", *fds))]


def unpack_fds(ancdata: Sequence[tuple[int, int, bytes]], level: int, kind: int) -> list[int]:
    """Descriptors out of ``recvmsg`` ancillary data (truncated records included)."""
    fds: list[int] = []
    for cmsg_level, cmsg_type, data in ancdata:
        if cmsg_level == level and cmsg_type == kind:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds

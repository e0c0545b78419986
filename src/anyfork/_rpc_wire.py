"""The rpc wire format, sans-io: shared by the caller (``rpc``) and the worker.

Theory of operation
-------------------
``anyfork.rpc`` runs ``_rpc_worker.serve`` in a process and then both ends
speak this protocol on the socket ``run`` returned.  Every frame is::

    header = <payload length u32> <call id u32> <kind u8> <number of fds u8>
    frame  = header payload

little endian.  The whole protocol of a call is::

    caller -> worker  HELLO   MAGIC, version, config     (first)
    worker -> caller  HELLO   MAGIC, version, flags      (first, once set up)
    caller -> worker  CALL    id, serialized (args, kwargs)
    worker -> caller  EVENT   id, serialized args         (0..n, while id runs)
    worker -> caller  RESULT  id, serialized value
                   or ERROR   id, encoded exception       (exactly one)
    caller -> worker  CLOSE                               (no more calls)
    worker -> caller  RETIRE  id of the last call it ran  (then it exits)

RETIRE (``anyfork.pool.retire()`` in a handler that runs a call at a time):
the worker answered every call up to and including ``id`` and ran none
after it; the caller fails the calls still in flight as never run (a pool
places them again) and takes no more.

The worker's HELLO flags say whether it runs calls concurrently.  If not,
the caller holds small calls back while one is running and sends them
together when its reply comes (Nagle's idea): they could not start sooner,
and a batch costs the worker one wake-up instead of one per call.

An ERROR with id 0 says the worker could not start (its handler, init or
serializer failed); the worker exits after sending it.  EOF from the caller
before CLOSE means the caller is gone: the worker exits at once.  EOF from
the worker means it exited: the caller fails what is in flight.

Each end checks the other's HELLO before it believes anything else, so a
worker of another version, or a process that writes something else on the
socket, fails the client with ``ProtocolError`` before a byte of it is
deserialized.  Frames of a kind the reader does not take, replies to calls
that are not in flight and descriptors that never arrived are protocol
errors too (the last two are checked by the caller, which knows its calls).

Descriptors travel by SCM_RIGHTS.  A frame that carries descriptors starts
a ``sendmsg`` of its own (frames after it may ride along), so the kernel
delivers them with its first byte and the decoder has them by the time the
frame is complete; it hands each frame the ones it counts, in order.

This module does no I/O and imports only the standard library: the worker
imports it without the rest of anyfork.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import socket
import struct
from collections import deque

from ._errors import ProtocolError

# typing only for the checker: importing it costs a remote worker's start
# about 4 ms (nothing there has loaded it; see rpc.WORKER_MODULES).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 3  # 2: a call with keywords is a list (see _Pickle.dumps_call); 3: _Bytes's calls
MAGIC = b"anyfork-rpc\x00"
HEADER = struct.Struct("<IIBB")
HSIZE = HEADER.size
MAX_FDS = 253  # the kernel's SCM_MAX_FD: descriptors in one sendmsg
MAX_PAYLOAD = 0xFFFFFFFF

HELLO, CALL, CLOSE, RESULT, ERROR, EVENT, RETIRE = 1, 2, 3, 4, 5, 6, 7
CONCURRENT = 1  # the worker's HELLO flag: an async handler, calls run at once
#: What each end accepts from the other.
FROM_CALLER = frozenset((HELLO, CALL, CLOSE))
FROM_WORKER = frozenset((HELLO, RESULT, ERROR, EVENT, RETIRE))
_NAMES = {HELLO: "HELLO", CALL: "CALL", CLOSE: "CLOSE", RESULT: "RESULT", ERROR: "ERROR", EVENT: "EVENT",
          RETIRE: "RETIRE"}

_U32 = struct.Struct("<I")
_VER = struct.Struct("<H")


if TYPE_CHECKING:
    from typing import NamedTuple

    class Frame(NamedTuple):
        kind: int
        id: int
        payload: bytes
        fds: list[int]
else:
    from collections import namedtuple

    Frame = namedtuple("Frame", ("kind", "id", "payload", "fds"))


_new_frame = tuple.__new__  # a Frame without NamedTuple's __new__, a Python call per frame


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


# --- framing ------------------------------------------------------------------------------


def header(kind: int, call_id: int, payload_len: int, nfds: int = 0) -> bytes:
    if payload_len > MAX_PAYLOAD:
        raise ValueError(f"an rpc message is limited to 4 GiB; this one is {payload_len} bytes")
    if nfds > MAX_FDS:
        raise ValueError(f"an rpc message carries at most {MAX_FDS} descriptors, not {nfds}")
    return HEADER.pack(payload_len, call_id, kind, nfds)


class Decoder:
    """Bytes and descriptors in, frames out.

    ``feed(data, fds)`` with what one receive returned (``b""`` at EOF), then
    ``frames()`` for every frame now complete.  The first frame must be a
    well-formed HELLO of this version; anything else raises ProtocolError.

    ``feed`` borrows ``data`` (it may be a view of the receiver's buffer)
    until the next ``frames()`` or ``feed``: when nothing is buffered, whole
    frames are cut from it directly and only a partial one is copied.
    """

    __slots__ = ("_accept", "_buf", "_fds", "_hello", "_lent", "eof")

    def __init__(self, accept: frozenset[int]) -> None:
        self._accept = accept
        self._buf = bytearray()
        self._lent: bytes | bytearray | memoryview | None = None  # fed, not yet copied
        self._fds: deque[int] = deque()
        self._hello = False
        self.eof = False

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self._fds.extend(fds)
        if data:
            if self._lent is not None:
                self._buf += self._lent
                self._lent = None
            if self._buf:
                self._buf += data
            else:
                self._lent = data
        elif not fds:
            self.eof = True

    def holding(self) -> bool:
        """Whether bytes or descriptors of a frame not yet whole are kept."""
        return bool(self._buf or self._lent is not None or self._fds)

    def frames(self) -> list[Frame]:
        lent = self._lent
        buf = self._buf
        view = memoryview(buf if lent is None else lent)
        n = len(view)
        pos = 0
        out: list[Frame] = []
        unpack, accept, new, frame = HEADER.unpack_from, self._accept, _new_frame, Frame  # (the loop's)
        try:
            while n - pos >= HSIZE:
                length, call_id, kind, nfds = unpack(view, pos)
                if kind not in accept or not self._hello:
                    if not self._hello:
                        self._check_hello(view, pos, length, kind)
                    else:
                        head = bytes(view[pos:pos + HSIZE])
                        raise ProtocolError(f"unexpected rpc frame kind {kind} (header {head!r})")
                start = pos + HSIZE
                end = start + length
                if end > n:
                    break
                fds: list[int] = []
                if nfds:
                    if len(self._fds) < nfds:
                        raise ProtocolError(
                            f"an rpc frame claims {nfds} descriptors; {len(self._fds)} arrived")
                    fds = [self._fds.popleft() for _ in range(nfds)]
                out.append(new(frame, (kind, call_id, view[start:end].tobytes(), fds)))
                pos = end
        finally:
            if lent is not None:
                self._lent = None
                if pos < n:
                    buf += view[pos:]  # a partial frame: kept for the next feed
                view.release()
            else:
                view.release()
                if pos:
                    del buf[:pos]
        if self.eof and buf:
            raise ProtocolError(f"the stream ended inside an rpc frame ({len(buf)} bytes left)")
        return out

    def _check_hello(self, buf: memoryview, pos: int, length: int, kind: int) -> None:
        start = bytes(buf[pos:pos + HSIZE + len(MAGIC) + _VER.size])
        if kind != HELLO or length < len(MAGIC) + _VER.size or length > 1 << 20:
            raise ProtocolError(f"the peer does not speak anyfork rpc: it sent {start!r}")
        have = len(buf) - pos - HSIZE
        magic = bytes(buf[pos + HSIZE:pos + HSIZE + min(have, len(MAGIC))])
        if not MAGIC.startswith(magic):
            raise ProtocolError(f"the peer does not speak anyfork rpc: it sent {start!r}")
        if have >= len(MAGIC) + _VER.size:
            (version,) = _VER.unpack_from(buf, pos + HSIZE + len(MAGIC))
            if version != VERSION:
                raise ProtocolError(
                    f"the peer speaks anyfork rpc version {version}; this end speaks version {VERSION}")
            self._hello = True

    def close(self) -> None:
        """Close descriptors that arrived for frames never completed."""
        self._lent = None
        fds = list(self._fds)
        self._fds.clear()
        close_fds(fds)


def hello(config: bytes = b"") -> bytes:
    body = MAGIC + _VER.pack(VERSION) + config
    return header(HELLO, 0, len(body)) + body


def hello_config(frame: Frame) -> bytes:
    return frame.payload[len(MAGIC) + _VER.size:]


class Outbox:
    """Frames waiting to be written, with the descriptors they carry.

    The outbox owns those descriptors (duplicates made when the frame was
    encoded) and closes each once it has been sent, or when discarded.
    """

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        # Each frame as it was added (bytes: a view is made only for the rest
        # of one that went out in part), with its descriptors.
        self._chunks: deque[tuple[bytes | memoryview, list[int]]] = deque()
        self.size = 0  # bytes queued: 0 exactly when empty (a frame is never empty), and cheaper than bool()

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def add(self, data: bytes, fds: list[int] | None = None) -> None:
        self._chunks.append((data, fds or []))
        self.size += len(data)

    def pending(self, limit: int = 1 << 20) -> tuple[list[bytes | memoryview], list[int]]:
        """What to pass to one ``sendmsg``: buffers and descriptors."""
        chunks = self._chunks
        first, fds = chunks[0]
        bufs = [first]
        total = len(first)
        for i in range(1, min(len(chunks), 512)):
            if total >= limit:
                break
            data, more = chunks[i]
            if more:
                break
            bufs.append(data)
            total += len(data)
        return bufs, fds

    def sent(self, n: int) -> None:
        chunks = self._chunks
        self.size -= n
        first = True
        while n:
            data, fds = chunks[0]
            if first and fds:
                close_fds(fds)  # they went with the first byte
            first = False
            if n >= len(data):
                n -= len(data)
                chunks.popleft()
            else:
                chunks[0] = (memoryview(data)[n:], fds)
                n = 0

    def discard(self) -> None:
        for _, fds in self._chunks:
            close_fds(fds)
        self._chunks.clear()
        self.size = 0


# --- errors, as they travel ---------------------------------------------------------------


def encode_error(type_name: str, message: str, tb: str, pickled: bytes = b"") -> bytes:
    parts = [s.encode("utf-8", "surrogatepass") for s in (type_name, message, tb)]
    return b"".join(_U32.pack(len(p)) + p for p in parts) + pickled


def decode_error(payload: bytes) -> tuple[str, str, str, bytes]:
    """(type name, message, traceback text, pickled exception or b"")."""
    try:
        pos = 0
        strs = []
        for _ in range(3):
            (n,) = _U32.unpack_from(payload, pos)
            if pos + 4 + n > len(payload):
                raise ValueError("short")
            strs.append(payload[pos + 4:pos + 4 + n].decode("utf-8", "surrogatepass"))
            pos += 4 + n
    except (struct.error, ValueError) as e:
        raise ProtocolError(f"a malformed rpc error report: {payload[:40]!r}") from e
    return strs[0], strs[1], strs[2], payload[pos:]


# --- serializers --------------------------------------------------------------------------
#
# Each turns call arguments and values into bytes plus the descriptors they
# carry, and back.  dumps_* return descriptors the caller of dumps owns
# (duplicates); loads_* take ownership of the ones they are given.


def _has_fd(obj: object, depth: int = 0) -> bool:
    if isinstance(obj, (socket.socket, io.IOBase)):
        return True
    if depth < 8 and isinstance(obj, (list, tuple, set, frozenset)):
        return any(_has_fd(o, depth + 1) for o in obj)
    if depth < 8 and isinstance(obj, dict):
        return any(_has_fd(o, depth + 1) for o in obj.values())
    return False


class _Codec:
    name = "custom"
    carries_fds = False
    # Shortcuts for the caller's common cases, a layer of Python calls less
    # (None: there is none, use dumps_call and loads).  ``quick_args(args)``
    # is the payload of a call with positional arguments only, exactly as
    # dumps_call makes it; it may raise, and the caller then takes
    # dumps_call, which carries the descriptors or says what is wrong.
    # ``quick_loads(data)`` is the value of a message that came without
    # descriptors, as loads gives it.  ``quick_one(arg)`` is the payload of
    # a call with one positional argument, made by a C callable (no Python
    # frame), or raises TypeError for an argument it does not take.
    quick_args: Any = None
    quick_one: Any = None
    quick_loads: Any = None
    # A value message that starts with this byte is the bytes after it, as
    # loads gives them (the bytes codec's: the caller takes them without a
    # call), or None.
    bytes_tag: bytes | None = None

    def __init__(self, impl: Any = None) -> None:
        self.impl = impl

    def dumps(self, obj: object) -> tuple[bytes, list[int]]:
        try:
            data = self.impl.dumps(obj)
        except Exception as e:
            if _has_fd(obj):
                raise TypeError(f"the {self.name} serializer can't carry descriptors (sockets, files); "
                                "use serializer='pickle'") from e
            raise
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"the {self.name} serializer's dumps() returned {type(data).__name__}, not bytes")
        return bytes(data), []

    def loads(self, data: bytes, fds: list[int]) -> Any:
        if fds:
            close_fds(fds)
            raise ProtocolError(f"descriptors arrived with a {self.name} message")
        return self.impl.loads(data)

    def dumps_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[int]]:
        return self.dumps([list(args), kwargs])

    def loads_call(self, data: bytes, fds: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = self.loads(data, fds)
        return tuple(args), dict(kwargs)


class _Json(_Codec):
    name = "json"

    def __init__(self) -> None:
        import json

        super().__init__(self)
        self._enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        self._dec = json.JSONDecoder().decode

    def dumps(self, obj: object) -> tuple[bytes, list[int]]:
        try:
            return self._enc(obj).encode("utf-8", "surrogatepass"), []
        except TypeError as e:
            if _has_fd(obj):
                raise TypeError("the json serializer can't carry descriptors (sockets, files); "
                                "use serializer='pickle'") from e
            raise

    def loads(self, data: bytes, fds: list[int]) -> Any:
        if fds:
            close_fds(fds)
            raise ProtocolError("descriptors arrived with a json message")
        return self._dec(data.decode("utf-8", "surrogatepass"))


class _Bytes(_Codec):
    """Arguments and values are bytes or str, sent as they are.

    A value is ``b"b"`` and the bytes, or ``b"s"`` and the str in UTF-8.  A
    call with one bytes-like argument is ``b"B"`` and its bytes (made by
    ``bytes.__add__``, a C call: a tiny call costs the caller less than
    pickle's); any other call is ``b"L"`` and each value, length-prefixed
    (u32)."""

    name = "bytes"

    def __init__(self) -> None:
        super().__init__()
        if type(self) is _Bytes:  # (a subclass's own methods are never skipped)
            self.quick_args = self._quick_args
            self.quick_one = b"B".__add__
            self.quick_loads = self._quick_loads
            self.bytes_tag = b"b"

    def _quick_args(self, args: tuple[Any, ...]) -> bytes:
        return self.dumps_call(args, {})[0]

    def _quick_loads(self, data: bytes) -> Any:
        if data[:1] == b"b":
            return data[1:]
        return self.loads(data, [])

    def dumps(self, obj: object) -> tuple[bytes, list[int]]:
        if isinstance(obj, bytes):
            return b"b" + obj, []
        if isinstance(obj, str):
            return b"s" + obj.encode("utf-8", "surrogatepass"), []
        if isinstance(obj, (bytearray, memoryview)):
            return b"b" + bytes(obj), []
        if isinstance(obj, (socket.socket, io.IOBase)):
            raise TypeError("the bytes serializer can't carry descriptors; use serializer='pickle'")
        raise TypeError(f"the bytes serializer takes bytes or str, not {type(obj).__name__}")

    def loads(self, data: bytes, fds: list[int]) -> Any:
        if fds:
            close_fds(fds)
            raise ProtocolError("descriptors arrived with a bytes message")
        if data[:1] == b"b":
            return data[1:]
        if data[:1] == b"s":
            return data[1:].decode("utf-8", "surrogatepass")
        raise ProtocolError(f"a malformed bytes message: {data[:20]!r}")

    def dumps_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[int]]:
        if kwargs:
            raise TypeError("the bytes serializer takes positional arguments only")
        if len(args) == 1:
            try:
                return b"B" + args[0], []  # (any C-contiguous buffer, as quick_one takes it)
            except TypeError:
                pass  # not a buffer, or a memoryview with gaps: the list form says which
        parts = [b"L"]
        for a in args:
            p, _ = self.dumps(a)
            parts.append(_U32.pack(len(p)) + p)
        return b"".join(parts), []

    def loads_call(self, data: bytes, fds: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if fds:
            close_fds(fds)
            raise ProtocolError("descriptors arrived with a bytes message")
        kind = data[:1]
        if kind == b"B":
            return (data[1:],), {}  # one bytes argument, the common call
        if kind != b"L":
            raise ProtocolError(f"a malformed bytes call: {data[:20]!r}")
        n = len(data)
        args = []
        pos = 1
        while pos < n:
            if pos + 4 > n:
                raise ProtocolError("a malformed bytes message")
            (k,) = _U32.unpack_from(data, pos)
            if pos + 4 + k > n:
                raise ProtocolError("a malformed bytes message")
            args.append(self.loads(data[pos + 4:pos + 4 + k], []))
            pos += 4 + k
        return tuple(args), {}


def _rebuild_fd(*_: object) -> None:
    raise pickle.UnpicklingError("a descriptor reference outside an anyfork rpc message")


class _FdPickler(pickle.Pickler):
    """Pickles sockets and file objects as references to descriptors that
    travel beside the bytes (duplicated here: the sender may close its own)."""

    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.fds = fds

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, socket.socket):
            spec: tuple[object, ...] = ("socket",)
        elif isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
            mode = getattr(obj, "mode", "rb" if not isinstance(obj, io.TextIOBase) else "r")
            mode = str(mode).replace("x", "w")
            if isinstance(obj, io.TextIOBase):
                spec = ("text", mode, getattr(obj, "encoding", None), getattr(obj, "errors", None))
            elif isinstance(obj, io.RawIOBase):
                spec = ("raw", mode)
            else:
                spec = ("buffered", mode)
        else:
            return NotImplemented
        if isinstance(obj, (io.BufferedIOBase, io.TextIOBase)) and not obj.closed and obj.writable():
            obj.flush()  # what it buffered belongs before what the receiver writes
        fd = obj.fileno()
        if fd < 0:
            raise ValueError(f"{obj!r} is closed")
        if len(self.fds) >= MAX_FDS:
            raise ValueError(f"an rpc message carries at most {MAX_FDS} descriptors")
        self.fds.append(os.dup(fd))
        return _rebuild_fd, (len(self.fds) - 1, *spec)


class _FdUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file)
        self.fds = fds
        self.taken: set[int] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_rebuild_fd":
            return self._rebuild
        return super().find_class(module, name)

    def _rebuild(self, index: int, kind: str, mode: str = "rb", encoding: Any = None,
                 errors: Any = None) -> object:
        if not 0 <= index < len(self.fds) or index in self.taken:
            raise pickle.UnpicklingError(f"a reference to descriptor {index} that did not arrive")
        self.taken.add(index)
        fd = self.fds[index]
        if kind == "socket":
            return socket.socket(fileno=fd)
        if kind == "text":
            return open(fd, mode, encoding=encoding, errors=errors)
        return open(fd, mode, buffering=0 if kind == "raw" else -1)


class _Pickle(_Codec):
    name = "pickle"
    carries_fds = True

    def __init__(self) -> None:
        super().__init__()
        # C callables both: no Python frame per call.  Only where they do
        # what this class's methods do: a subclass's own (a remote host's
        # restricted loads) is never skipped.
        cls = type(self)
        if cls.dumps is _Pickle.dumps and cls.dumps_call is _Pickle.dumps_call:
            self.quick_args = functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL)
        if cls.loads is _Pickle.loads:
            self.quick_loads = pickle.loads

    def dumps(self, obj: object) -> tuple[bytes, list[int]]:
        try:
            return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), []
        except Exception:
            # Sockets and files don't pickle: try again with them as descriptors
            # (a rare path, so the common one stays the C pickler's; anything
            # else that fails fails again, the same way).
            pass
        fds: list[int] = []
        buf = io.BytesIO()
        try:
            _FdPickler(buf, fds).dump(obj)
        except BaseException:
            close_fds(fds)
            raise
        return buf.getvalue(), fds

    def loads(self, data: bytes, fds: list[int]) -> Any:
        if not fds:
            return pickle.loads(data)
        u = _FdUnpickler(io.BytesIO(data), fds)
        try:
            obj = u.load()
        except BaseException:
            close_fds([fd for i, fd in enumerate(fds) if i not in u.taken])
            raise
        # Sent but not referenced: nobody else will close them.
        close_fds([fd for i, fd in enumerate(fds) if i not in u.taken])
        return obj

    # A call is its arguments' tuple, or with keywords the list [args,
    # kwargs]: a list, which no tuple of arguments can be taken for (as a
    # tuple, f((1,), {}) arrived as f(1)).
    def dumps_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[int]]:
        return self.dumps([args, kwargs] if kwargs else args)

    def loads_call(self, data: bytes, fds: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        obj = self.loads(data, fds)
        if type(obj) is tuple:
            return obj, {}
        if type(obj) is list and len(obj) == 2 and type(obj[0]) is tuple and type(obj[1]) is dict:
            return obj[0], obj[1]
        raise ProtocolError(f"a malformed {self.name} call: {type(obj).__name__}")


class _Module(_Codec):
    """msgpack or cbor2, by name, when installed."""

    def __init__(self, name: str) -> None:
        mod = __import__(name)
        pack, unpack = (mod.packb, mod.unpackb) if name == "msgpack" else (mod.dumps, mod.loads)
        impl = type("impl", (), {"dumps": staticmethod(pack), "loads": staticmethod(unpack)})()
        super().__init__(impl)
        self.name = name


NAMED = ("pickle", "json", "bytes", "msgpack", "cbor2")


def serializer(spec: str | object) -> _Codec:
    """The codec for what ``rpc.run(serializer=...)`` was given."""
    if isinstance(spec, str):
        if spec == "pickle":
            return _Pickle()
        if spec == "json":
            return _Json()
        if spec == "bytes":
            return _Bytes()
        if spec in ("msgpack", "cbor2"):
            return _Module(spec)
        raise ValueError(f"unknown serializer {spec!r}: use one of {', '.join(NAMED)}, "
                         "or an object with dumps() and loads()")
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise TypeError(f"a serializer needs dumps() and loads(); {spec!r} has not both")
    return _Codec(spec)


def describe(kind: int) -> str:
    return _NAMES.get(kind, str(kind))

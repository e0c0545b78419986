"""What both of rpc's worker loops (plain and asyncio) and its caller side
use to move frames: one receive into a decoder, one send out of an outbox,
and the frames that answer a call.  Standard library only."""

from __future__ import annotations

import socket

from . import _rpc_wire as W
from ._errors import ProtocolError

TYPE_CHECKING = False  # (typing, the module, costs a remote worker's start: see _rpc_wire)
if TYPE_CHECKING:
    from typing import Any

_RECV = 1 << 18
_ANC = socket.CMSG_SPACE(W.MAX_FDS * 4)
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag arithmetic costs a microsecond
# One operation that doesn't block on a socket that does (Linux, the BSDs,
# macOS; 0 elsewhere, where the caller's socket stays non-blocking).
DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))


def recv(sock: socket.socket, decoder: W.Decoder, scratch: bytearray, flags: int = _RECV_FLAGS) -> int:
    """One receive into ``decoder`` (shared with the caller's side); how
    many bytes came.  Into ``scratch``, a buffer of ``_RECV`` bytes the
    caller keeps: ``recvmsg`` would allocate one that size each time, and
    that is an mmap, page faults and a munmap per receive.  The decoder
    borrows a view of it: call ``decoder.frames()`` before the next receive."""
    n, anc, msg_flags, _ = sock.recvmsg_into([scratch], _ANC, flags)
    return feed(decoder, scratch, n, anc, msg_flags)


def feed(decoder: W.Decoder, scratch: bytearray, n: int, anc: list[tuple[int, int, bytes]],
         msg_flags: int) -> int:
    """Give ``decoder`` what one ``recvmsg_into`` put in ``scratch`` (see ``recv``)."""
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(raw[: len(raw) - len(raw) % 4]).cast("i"))
    decoder.feed(memoryview(scratch)[:n] if n else b"", fds)  # lent: frames() comes next
    if msg_flags & _CTRUNC:
        raise ProtocolError("descriptors were lost in transit (MSG_CTRUNC)")
    return n


def send(sock: socket.socket, outbox: W.Outbox, flags: int = 0) -> None:
    """One send out of ``outbox`` (raises BlockingIOError if it would block)."""
    bufs, fds = outbox.pending()
    if fds:
        n = sock.sendmsg(bufs, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack_fds(fds))], flags)
    elif len(bufs) == 1:
        n = sock.send(bufs[0], flags)
    else:
        n = sock.sendmsg(bufs, (), flags)
    outbox.sent(n)


def _pack_fds(fds: list[int]) -> bytes:
    import array

    return array.array("i", fds).tobytes()


def error_frame(call_id: int, e: BaseException, codec: W._Codec, what: str = "") -> bytes:
    """An ERROR frame for ``e``: its type, message and traceback as text, and
    the exception itself when the serializer is pickle and it pickles."""
    import traceback

    cls = type(e)
    tb = "".join(traceback.format_exception(cls, e, e.__traceback__))
    pickled = b""
    if codec.carries_fds and not what:
        try:
            import pickle

            pickled = pickle.dumps(e, pickle.HIGHEST_PROTOCOL)
        except Exception:
            pickled = b""
    message = f"{what}{e}" if what else str(e)
    payload = W.encode_error(f"{cls.__module__}.{cls.__qualname__}", message, tb, pickled)
    return W.header(W.ERROR, call_id, len(payload)) + payload


def result_frame(conn: Any, call_id: int, result: object) -> tuple[bytes, list[int]]:
    codec = conn.codec
    try:
        payload, fds = codec.dumps(result)
    except BaseException as e:
        return error_frame(call_id, e, codec, f"the result can't be serialized ({codec.name}): "), []
    return W.header(W.RESULT, call_id, len(payload), len(fds)) + payload, fds

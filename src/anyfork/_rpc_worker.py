"""The worker side of ``anyfork.rpc``: what runs in the process.

Theory of operation
-------------------
``rpc.run`` has the process import this module (without the rest of
anyfork: it is stdlib-only, like the serve loop) and run ``serve``.  It
says HELLO, reads the caller's HELLO with the configuration, finds the
handler, runs ``init``, and then, for a plain function::

    read requests; for each: call the handler, write the reply; repeat

For a coroutine function it runs an asyncio loop that reads while handlers
run, up to the caller's ``max_in_flight`` at once.  Concurrency is the
caller's business: this loop only ever waits to read (between calls) or to
write (a reply or an event), never both, because the caller always reads
while it writes.  A write that fails (the caller is gone) or EOF before
CLOSE ends the worker at once; CLOSE ends it with status 0 after the calls
before it.
"""

from __future__ import annotations

import sys

from . import _rpc_wire as W
from ._errors import ProtocolError
from ._rpc_io import _ANC, _CTRUNC, _RECV, _RECV_FLAGS, error_frame, feed, recv, result_frame, send

TYPE_CHECKING = False  # (typing, the module, costs a remote worker's start: see _rpc_wire)
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

# The package's path as this module was imported with it: the boot's
# stand-in package (see ``rpc._boot``), or the real one.
_PATH = list(getattr(sys.modules.get(__package__ or ""), "__path__", ()))

_QUICK = 100e-6  # a call this quick lets the replies before it wait for the next
_UNPACK_HEADER = W.HEADER.unpack_from
_PACK_HEADER = W.HEADER.pack
_new_frame = tuple.__new__  # (as _rpc_wire's)
_BATCH = 1 << 16
_REPLY_BATCH = 16


class _Conn:
    """The worker's end: a blocking socket, the decoder, and what the
    handler is serving now (for ``event``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = W.Decoder(W.FROM_CALLER)
        self.outbox = W.Outbox()
        self.scratch = bytearray(_RECV)
        self.codec: W._Codec = W._Pickle()
        self.call_id = 0
        self.async_loop: Any = None  # set while an async worker runs

    def write(self, data: bytes, fds: list[int] | None = None) -> None:
        self.outbox.add(data, fds)
        self.flush()

    def flush(self) -> None:
        while self.outbox.size:
            send(self.sock, self.outbox)

    def read(self) -> list[W.Frame]:
        """The next frames; [] at EOF."""
        while True:
            recv(self.sock, self.decoder, self.scratch)
            frames = self.decoder.frames()
            if frames or self.decoder.eof:
                return frames


_conn: _Conn | None = None
_retiring = False  # retire() was called: the worker stops after this call


def retire() -> None:
    """In a handler that runs a call at a time: finish this call, then exit.

    The caller is told which calls were never run (RETIRE), so that a pool
    sends them to another worker.
    """
    global _retiring
    conn = _conn
    if conn is None:
        raise RuntimeError("retire() is for handlers running in an rpc worker")
    if conn.async_loop is not None:
        raise RuntimeError("retire() is for handlers that run a call at a time, not coroutines")
    _retiring = True


def event(*args: Any) -> None:
    """Send an event to the caller from the call being served."""
    conn = _conn
    if conn is None:
        raise RuntimeError("anyfork.rpc.event() is for handlers running in an rpc worker")
    call_id = conn.call_id if conn.async_loop is None else sibling("_rpc_worker_async").current_call()
    payload, fds = conn.codec.dumps_call(args, {})
    frame = W.header(W.EVENT, call_id, len(payload), len(fds)) + payload
    if conn.async_loop is not None:
        conn.async_loop.queue(frame, fds)
    else:
        conn.write(frame, fds)


def sibling(name: str) -> ModuleType:
    """This package's module ``name``, imported without the package.

    A worker runs only the serve loop's modules and these: importing
    ``anyfork`` itself would load the whole library (about 8 ms in a new
    worker), or on a remote host fetch it from the caller.  So, as the boot
    did, the module is imported under a stand-in package with the same path."""
    full = f"{__package__}.{name}"
    module = sys.modules.get(full)
    if module is not None:
        return module
    package = __package__ or ""
    if package in sys.modules:
        return __import__(full, fromlist=("_",))
    stub = type(sys)(package)
    stub.__path__ = list(_PATH)
    sys.modules[package] = stub
    try:
        __import__(full)
    finally:
        if sys.modules.get(package) is stub:
            del sys.modules[package]
    return sys.modules[full]


_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE


class _Method:
    def method(self) -> None:
        pass


_METHOD_TYPE = type(_Method().method)
_FUNCTION_TYPE = type(_Method.method)


def coroutine_function(fn: object) -> bool:
    """``inspect.iscoroutinefunction(fn)``, without importing inspect (5 ms
    in a new worker) when nothing has: then nothing can have been marked
    with ``inspect.markcoroutinefunction`` either, and its test of the code
    flags, through bound methods and partials, is all there is."""
    inspect = sys.modules.get("inspect")
    if inspect is not None:
        return bool(inspect.iscoroutinefunction(fn))
    return by_code_flags(fn)


def by_code_flags(fn: object) -> bool:
    partial = getattr(sys.modules.get("functools"), "partial", None)
    while True:
        if type(fn) is _METHOD_TYPE:
            fn = fn.__func__  # type: ignore[attr-defined]
        elif partial is not None and isinstance(fn, partial):
            fn = fn.func
        else:
            break
    return type(fn) is _FUNCTION_TYPE and bool(fn.__code__.co_flags & _CO_COROUTINE)


def resolve(name: str) -> Callable[..., Any]:
    """The function ``name`` names, found as ``Process.run`` finds it (the
    serve loop's ``resolve``: "mod:attr.attr", "pkg.mod.attr", or a name in
    ``__main__``), so that rpc and run() take the same names the same way."""
    modules = sys.modules
    # The serve loop this process runs: on a remote host it is the hub's
    # copy (``_anyfork_remote._serve``), and ``from ._serve import`` would
    # fetch and run the whole anyfork package from the caller for it.
    serve: Any = modules.get("anyfork._serve") or modules.get("_anyfork_remote._serve")
    if serve is None:
        from . import _serve as serve
    fn: Callable[..., Any] = serve.resolve(name, modules["__main__"].__dict__)
    return fn


def reply(conn: _Conn, call_id: int, fn: Callable[..., Any], frame: W.Frame) -> tuple[bytes, list[int]]:
    """Call the handler for one CALL frame; the frame to answer with."""
    codec = conn.codec
    payload = frame.payload
    if codec.bytes_tag is not None and payload[:1] == b"B" and not frame.fds:
        # The bytes codec's common call, one bytes argument and a bytes
        # result, without its Python methods (loads_call, dumps): the
        # serializer meant to be the fastest must not cost what pickle's C does.
        try:
            result = fn(payload[1:])
        except BaseException as e:
            return error_frame(call_id, e, codec), []
        if type(result) is bytes and len(result) < W.MAX_PAYLOAD:
            return b"".join((_PACK_HEADER(len(result) + 1, call_id, W.RESULT, 0), b"b", result)), []
        return result_frame(conn, call_id, result)
    try:
        args, kwargs = codec.loads_call(frame.payload, frame.fds)
        result = fn(*args, **kwargs)
    except BaseException as e:  # a task's SystemExit too is its caller's error
        return error_frame(call_id, e, codec), []
    return result_frame(conn, call_id, result)


def _configure(conn: _Conn, items: tuple[Any, ...]
               ) -> tuple[Callable[..., Any], int, list[W.Frame]] | None:
    """Read the caller's HELLO and set up; the handler, max_in_flight and the
    frames that came after the HELLO.  None at EOF."""
    frames: list[W.Frame] = []
    while not frames:
        frames = conn.read()
        if conn.decoder.eof and not frames:
            return None
    hello = frames.pop(0)
    fields = W.hello_config(hello).split(b"\0", 4)
    func_name, init_name, ser_name, max_in_flight = (f.decode() for f in fields[:4])
    if ser_name == "custom":
        import pickle

        conn.codec = W.serializer(pickle.loads(fields[4]))
    else:
        conn.codec = W.serializer(ser_name)
    fn = resolve(func_name)
    if init_name:
        resolve(init_name)(*items)
    return fn, int(max_in_flight), frames


def serve(sock: socket.socket, *items: Any) -> None:
    """What ``rpc.run`` runs: serve calls on ``sock`` until CLOSE or EOF."""
    global _conn
    conn = _conn = _Conn(sock)
    try:
        try:
            setup = _configure(conn, items)
        except ProtocolError:
            conn.write(W.hello())  # the caller sees our version, and says so
            sys.exit(2)
        except BaseException as e:
            conn.write(W.hello() + error_frame(0, e, conn.codec))
            sys.exit(1)
        if setup is None:
            return
        fn, max_in_flight, frames = setup
        concurrent = coroutine_function(fn)
        # Our HELLO says whether calls run one at a time: then the caller
        # may hold small calls back while one runs, and send them in a batch.
        conn.write(W.hello(bytes((W.CONCURRENT if concurrent else 0,))))
        if concurrent:
            sibling("_rpc_worker_async").serve_async(conn, fn, max_in_flight, frames)
        else:
            _serve_sync(conn, fn, frames)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the caller is gone
    finally:
        _conn = None
        conn.decoder.close()
        conn.outbox.discard()
        sock.close()


def _serve_sync(conn: _Conn, fn: Callable[..., Any], frames: list[W.Frame]) -> None:
    from time import perf_counter

    outbox = conn.outbox
    quick = False  # the last handler took under _QUICK seconds
    replies = 0  # in the outbox, not yet written
    while True:
        for frame in frames:
            if frame.kind == W.CALL:
                # Replies to a batch of calls go out together, in one write:
                # a write per reply costs more than a tiny call.  But a reply
                # must not wait behind a slow call, so they go out first
                # unless the last call was quick (the hazard left: a quick
                # call's reply waits for one slow call after it).
                if outbox.size and not quick:
                    conn.flush()
                conn.call_id = frame.id
                start = perf_counter()
                data, fds = reply(conn, frame.id, fn, frame)
                quick = perf_counter() - start < _QUICK
                conn.call_id = 0
                outbox.add(data, fds)
                if _retiring:
                    outbox.add(W.header(W.RETIRE, frame.id, 0))
                    conn.flush()
                    return
                replies += 1
                if outbox.size > _BATCH or replies >= _REPLY_BATCH:
                    conn.flush()
                    replies = 0
            elif frame.kind == W.CLOSE:
                conn.flush()
                return
            else:
                raise ProtocolError(f"unexpected {W.describe(frame.kind)} from the caller")
        conn.flush()
        replies = 0
        frames = _read_or_answer(conn, fn)
        if not frames:
            return  # EOF before CLOSE, or retired: the caller is told


def _read_or_answer(conn: _Conn, fn: Callable[..., Any]) -> list[W.Frame]:
    """``conn.read()``, but a read that is exactly one CALL (a round trip:
    the caller waits for its reply) is answered here and the next read
    taken, without the decoder and the outbox, which cost a tiny call a
    third of the worker's time.  Anything else is fed to the decoder as
    read.  [] at EOF, or once retired (the RETIRE is written)."""
    sock, decoder, scratch = conn.sock, conn.decoder, conn.scratch
    while True:
        n, anc, flags, _ = sock.recvmsg_into([scratch], _ANC, _RECV_FLAGS)
        if n > W.HSIZE and not anc and not flags & _CTRUNC and not decoder.holding():
            length, call_id, kind, nfds = _UNPACK_HEADER(scratch)
            if kind == W.CALL and not nfds and n == W.HSIZE + length:
                conn.call_id = call_id
                payload = bytes(scratch[W.HSIZE:n])
                data, fds = reply(conn, call_id, fn, _new_frame(W.Frame, (kind, call_id, payload, [])))
                conn.call_id = 0
                if fds or _retiring:
                    conn.outbox.add(data, fds)
                    if _retiring:
                        conn.outbox.add(W.header(W.RETIRE, call_id, 0))
                        conn.flush()
                        return []
                    conn.flush()
                else:
                    sock.sendall(data)
                continue
        feed(decoder, scratch, n, anc, flags)
        frames = decoder.frames()
        if frames or decoder.eof:
            return frames

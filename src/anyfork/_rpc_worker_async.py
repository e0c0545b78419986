"""The worker side of ``anyfork.rpc`` for a coroutine handler.

An asyncio loop reads requests while handlers run (up to the caller's
``max_in_flight`` of them, which the caller enforces) and writes each reply
or event as it comes, through one outbox.  It reads and writes at once, so
it never waits on a full socket without also draining the other direction.
CLOSE: finish the running calls, flush, return.  EOF or a failed write: the
caller is gone; cancel everything and return.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any

from . import _rpc_wire as W
from ._errors import ProtocolError
from ._rpc_io import error_frame, recv, result_frame, send

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._rpc_worker import _Conn

_call_id: contextvars.ContextVar[int] = contextvars.ContextVar("anyfork_rpc_call", default=0)


def current_call() -> int:
    return _call_id.get()


class _Loop:
    def __init__(self, conn: _Conn, fn: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.fn = fn
        self.loop = loop
        self.fd = conn.sock.fileno()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.writing = False
        self.done: asyncio.Future[None] = loop.create_future()

    def queue(self, data: bytes, fds: list[int] | None = None) -> None:
        self.conn.outbox.add(data, fds)
        if not self.writing:
            self._write()

    def _finish(self, exc: BaseException | None = None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    def _write(self) -> None:
        outbox = self.conn.outbox
        try:
            while outbox:
                send(self.conn.sock, outbox)
        except BlockingIOError:
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.fd, self._write)
            return
        except OSError as e:  # the caller is gone
            self._finish(e)
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.closing and not self.tasks and not self.conn.outbox:
            self._finish()

    def _read(self) -> None:
        decoder = self.conn.decoder
        try:
            recv(self.conn.sock, decoder, self.conn.scratch)
            frames = decoder.frames()
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as e:
            self._finish(e)
            return
        self.handle(frames)

    def handle(self, frames: list[W.Frame]) -> None:
        decoder = self.conn.decoder
        for frame in frames:
            if frame.kind == W.CALL and not self.closing:
                task = self.loop.create_task(self._call(frame))
                self.tasks.add(task)
            elif frame.kind == W.CLOSE:
                self.closing = True
                self.loop.remove_reader(self.fd)
                self._maybe_done()
                return
            else:
                self._finish(ProtocolError(f"unexpected {W.describe(frame.kind)} from the caller"))
                return
        if decoder.eof:
            self._finish(EOFError())

    async def _call(self, frame: W.Frame) -> None:
        _call_id.set(frame.id)
        codec = self.conn.codec
        try:
            try:
                args, kwargs = codec.loads_call(frame.payload, frame.fds)
                result = await self.fn(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self.queue(error_frame(frame.id, e, codec))
            else:
                self.queue(*result_frame(self.conn, frame.id, result))
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            self._maybe_done()

    async def run(self, frames: list[W.Frame]) -> None:
        self.conn.sock.setblocking(False)
        self.loop.add_reader(self.fd, self._read)
        self.handle(frames)
        try:
            await self.done
        except (OSError, EOFError):
            pass  # the caller is gone
        finally:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)


def serve_async(conn: _Conn, fn: Callable[..., Any], max_in_flight: int, frames: list[W.Frame]) -> None:
    async def main() -> None:
        loop = _Loop(conn, fn, asyncio.get_running_loop())
        conn.async_loop = loop
        try:
            await loop.run(frames)
        finally:
            conn.async_loop = None

    del max_in_flight  # enforced by the caller, which knows what it has sent
    asyncio.run(main())

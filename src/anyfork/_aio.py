"""The asyncio driver: ``Process.run_async``.

The same steps as the blocking ``run``, with every wait handed to the event
loop: writes use ``MSG_DONTWAIT`` and wait for writability with
``add_writer``, so a 64 MiB argument lets other tasks run between chunks;
the pid report is awaited through ``add_reader`` on the template's report
channel, shared by every task of that loop waiting on the same template.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from . import _protocol as P
from ._fds import close_sock

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._process import Process, _Reports

_SEND_FLAGS = int(getattr(socket, "MSG_NOSIGNAL", 0)) | int(getattr(socket, "MSG_DONTWAIT", 0))


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()
    loop.add_writer(fd, _set, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _flush(proc: Process, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    out = proc._out
    try:
        while out:
            buffers, fds = out.chunk()
            anc = P.ancillary(fds, socket.SOL_SOCKET, socket.SCM_RIGHTS)
            try:
                n = sock.sendmsg(buffers, anc, _SEND_FLAGS)
            except BlockingIOError:
                await _writable(loop, sock.fileno())
                continue
            out.sent(n)
    except OSError as e:
        out.close()
        raise proc._broken(e) from e


async def _await_reports(reports: _Reports, done: Callable[[], bool]) -> None:
    """Wait until ``done()``, reading the report channel from the loop.

    asyncio allows one reader per descriptor, and several tasks may wait on
    the same template, so each loop gets one shared reader per channel
    (counted in ``reports.async_loops``): it pumps the channel, and every
    pump that reads something wakes every waiter, who then check their own
    condition.  If the channel ends meanwhile, its socket is not closed under
    the loop: the last task to unregister closes it (``reports.closing``).
    """
    loop = asyncio.get_running_loop()
    while not done():
        with reports.cond:
            fd = reports.fileno()
            if fd < 0:
                return
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut)
            reports.async_waiters.append(entry)
            count = reports.async_loops.get(loop, 0)
            reports.async_loops[loop] = count + 1
        if count == 0:
            loop.add_reader(fd, reports.pump, 0)
        try:
            reports.pump(0, done)
            if done() or reports.fileno() < 0:
                return
            await fut
        finally:
            _unregister(loop, reports, entry, fd)


def _unregister(loop: asyncio.AbstractEventLoop, reports: _Reports, entry: tuple[Any, Any],
                fd: int) -> None:
    with reports.cond:
        reports.async_waiters.remove(entry)
        left = reports.async_loops[loop] - 1
        if left:
            reports.async_loops[loop] = left
        else:
            del reports.async_loops[loop]
        closing = reports.closing if not reports.async_loops else None
        if closing is not None:
            reports.closing = None
    if not left:
        loop.remove_reader(fd)  # before the close below, never after
    if closing is not None:
        close_sock(closing)


def _watch_exit(loop: asyncio.AbstractEventLoop, proc: Process) -> None:
    """Let the running loop reap a process the caller spawned, as it exits."""
    d = proc._direct
    if d is None:
        return
    with d.lock:  # a reap in another thread must not close the pidfd in between
        if d.pidfd < 0 or d.loop is not None or d.done():
            return
        d.loop = loop
        loop.add_reader(d.pidfd, d.poll)


async def run(proc: Process, sock: socket.socket) -> socket.socket:
    """Flush ``proc`` (its RUN already queued), then wait for its pid."""
    parent = proc._parent
    try:
        if parent is not None:
            with parent._lock:
                parent._flush()  # normally empty: fork() already wrote the FORK
        await _flush(proc, sock)
    except BaseException:
        # Cancelled or failed part-way: a frame may be half written and RUN is
        # still queued.  The process can't be prepared any further; let it go.
        proc.close()
        raise
    with proc._lock:
        proc._finish_run(sock)
    try:
        if proc._pid is None:
            assert parent is not None
            assert parent._reports is not None
            reports = parent._reports
            await _await_reports(reports, lambda: proc._pid is not None or proc._failed is not None)
            proc._check_pid(reports)
    except BaseException:
        sock.close()
        raise
    _watch_exit(asyncio.get_running_loop(), proc)
    sock.setblocking(False)
    return sock

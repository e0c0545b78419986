"""The asyncio driver: ``Process.run_async`` and ``Process.wait_async``.

Each is the blocking method's operation (``_process``), run by
``_backend.run_async`` in the running loop instead of ``run_blocking`` in
the calling thread: writes use ``MSG_DONTWAIT`` and wait for writability in
the loop, reports and exits are awaited through the loop's readers, and no
threading lock is held across an ``await``.  A cancellation is thrown into
the operation at its wait, which cleans up (a half-written process is let
go) before it goes on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._backend import run_async
from ._direct import Direct

if TYPE_CHECKING:
    import socket

    from ._process import Process


async def run(proc: Process, func: object) -> socket.socket:
    """``proc.run(func)`` in the running loop; the socket comes back non-blocking."""
    proc._start_run(func)
    sock = await run_async(proc._run_op())
    sock.setblocking(False)
    child = proc._child
    if isinstance(child, Direct):
        _watch_exit(asyncio.get_running_loop(), child)
    return sock


def _watch_exit(loop: asyncio.AbstractEventLoop, d: Direct) -> None:
    """Let the running loop reap a process the caller spawned, as it exits,
    whether or not anyone waits for it."""
    shared = d.pidfd
    fd = shared.enter() if shared is not None else -1
    if fd < 0:
        return
    assert shared is not None
    left = False

    def leave(unregister: bool = True) -> None:
        nonlocal left
        if left:
            return
        left = True
        if unregister and not loop.is_closed():
            loop.remove_reader(fd)  # before the pidfd is closed, never after
        shared.leave()

    def exited() -> None:
        if d.poll():
            leave()

    def closing() -> None:  # someone reaped it: the pidfd is to be closed (any thread)
        if loop.is_closed():
            leave(unregister=False)  # its selector, and the registration, are gone
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here or not loop.is_running():
            leave()
            return
        try:
            loop.call_soon_threadsafe(leave)
        except RuntimeError:  # closed just now
            leave(unregister=False)

    shared.on_close(closing)
    try:
        loop.add_reader(fd, exited)
    except BaseException:
        leave(unregister=False)
        raise


async def wait(proc: Process, timeout: float | None) -> int:
    """``proc.wait(timeout)`` in the running loop."""
    return await run_async(proc._wait_op(timeout))

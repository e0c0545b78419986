"""Handlers the rpc tests run in workers (imported there by name)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from anyfork import rpc

served = 0
init_items: tuple[Any, ...] = ()
in_flight = 0
most_in_flight = 0


def echo(*args: Any, **kwargs: Any) -> Any:
    global served
    served += 1
    if kwargs:
        return [list(args), kwargs]
    return args[0] if len(args) == 1 else list(args)


def echo_count(x: Any) -> list[Any]:
    """``x`` and how many calls this worker has been sent."""
    global served
    served += 1
    return [x, served]


def raise_value(message: str) -> None:
    raise ValueError(message)


class Unpicklable(Exception):  # noqa: N818
    """Pickles, but won't unpickle: its __init__ takes two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


def raise_unpicklable() -> None:
    raise Unpicklable("left", "right")


def bad_result() -> Any:
    return lambda: None  # not picklable


def events(n: int) -> str:
    for i in range(n):
        rpc.event("tick", i)
    return "done"


async def aevents(n: int) -> str:
    for i in range(n):
        rpc.event("tick", i)
        await asyncio.sleep(0)
    return "done"


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def asleep(seconds: float, value: Any = None) -> Any:
    global in_flight, most_in_flight
    in_flight += 1
    most_in_flight = max(most_in_flight, in_flight)
    try:
        await asyncio.sleep(seconds)
    finally:
        in_flight -= 1
    return value


async def asleep_most(seconds: float, value: Any) -> list[Any]:
    """``value`` and the most calls this worker has had running at once."""
    await asleep(seconds)
    return [value, most_in_flight]


def hard_exit(code: int) -> None:
    os._exit(code)


def size_and_blob(data: bytes, size: int) -> tuple[int, bytes]:
    return len(data), b"r" * size


async def asize_and_blob(data: bytes, size: int) -> tuple[int, bytes]:
    return len(data), b"r" * size


def blob(size: int) -> bytes:
    return b"r" * size


def record_init(*items: Any) -> None:
    global init_items
    init_items = tuple(type(i).__name__ if isinstance(i, socket.socket) else i for i in items)


def get_init() -> list[Any]:
    return list(init_items)


def use_socket(sock: socket.socket, data: bytes) -> socket.socket:
    """Write to the socket it was sent, and send back a new one."""
    sock.sendall(data)
    sock.close()
    mine, theirs = socket.socketpair()
    mine.sendall(b"from the worker")
    mine.close()
    return theirs


def read_file(f: Any) -> str:
    with f:
        return str(f.read())


def garbage() -> None:
    """Write bytes that are no rpc frame on the worker's own socket."""
    from anyfork import _rpc_worker

    conn = _rpc_worker._conn
    assert conn is not None
    conn.sock.sendall(b"\xff" * 64)
    time.sleep(10)


def pid() -> int:
    return os.getpid()


class Reverse:
    """A custom serializer: bytes, reversed on the wire."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        import json

        return json.dumps(obj).encode()[::-1]

    @staticmethod
    def loads(data: bytes) -> Any:
        import json

        return json.loads(data[::-1])


def recv_one(sock: socket.socket) -> bytes:
    """Return once the caller writes a byte on the socket it was sent."""
    with sock:
        return sock.recv(1)


def retire_on(x: str) -> str:
    """Retire (as a pool's handler may) when asked; answer in any case."""
    if x == "retire":
        import anyfork.pool

        anyfork.pool.retire()
    return x

"""Handlers the pool and Executor tests run in workers (imported there by name)."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def square(x: int) -> int:
    return x * x


def pid(*_: object) -> int:
    return os.getpid()


def boom(message: str) -> None:
    raise KeyError(message)


def die(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def stuck_with_a_child(pidfile: str) -> None:
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(0.05)


def read_file(path: str) -> str:
    with open(path) as f:  # a fifo's: blocks until the test opens the other end
        return f.read()


def retiring(x: int) -> tuple[int, int]:
    import anyfork.pool

    anyfork.pool.retire()
    return os.getpid(), x


def progress(n: int) -> int:
    import anyfork.rpc

    for i in range(n):
        anyfork.rpc.event("step", i)
    return n


def fail_init(*items: Any) -> None:
    raise RuntimeError("this init always fails")


def record_init(*items: Any) -> None:
    os.environ["POOL_INIT"] = repr(items)


def init_seen() -> str | None:
    return os.environ.get("POOL_INIT")


def raise_system_exit() -> None:
    raise SystemExit(3)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


# --- a task's stages, each made to fail (test_executor) -------------------------------------


def _load_only_in(pid: int) -> str:
    if os.getpid() != pid:
        raise ValueError(f"this object unpickles only in process {pid}")
    return "loaded"


def _load_except_in(pid: int) -> str:
    if os.getpid() == pid:
        raise ValueError(f"this object does not unpickle in process {pid}")
    return "loaded"


class LoadsOnlyIn:
    """Pickles anywhere; unpickles only in process ``pid`` (so: not in a worker)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        return _load_only_in, (self.pid,)


class LoadsExceptIn(LoadsOnlyIn):
    """Unpickles anywhere but in process ``pid`` (so: not in the caller)."""

    def __reduce__(self) -> tuple[object, ...]:
        return _load_except_in, (self.pid,)


def returns_unloadable(caller: int) -> LoadsExceptIn:
    return LoadsExceptIn(caller)


def returns_a_lock() -> object:
    import threading

    return threading.Lock()


def square_or_die(x: float) -> float:
    """``x`` squared; for a negative ``x``, wait a moment (so that the calls
    after it reach the worker), then exit with status ``-x``; a float is
    slept for, and returned."""
    if isinstance(x, float):
        time.sleep(x)
        return x
    if x < 0:
        time.sleep(0.3)
        os._exit(-x)
    return x * x


def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def loaded(*names: str) -> list[str]:
    """Which of the modules ``names`` this process has imported."""
    import sys

    return [n for n in names if n in sys.modules]


async def loaded_async(*names: str) -> list[str]:
    return loaded(*names)

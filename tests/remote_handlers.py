"""Handlers the remote tests run on the far side, which gets this module
from the caller on demand (``_importer``): it is not on that host's path."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import os
import uuid
from typing import Any


@dataclasses.dataclass
class Point:
    x: int
    y: int


def point(x: int, y: int) -> Point:
    return Point(x, y)


def values() -> list[Any]:
    """Values the restricted unpickler lets through by default."""
    return [1, 2.5, 3j, "s", b"b", bytearray(b"x"), [1], {"a": 1}, {1}, frozenset({2}), (1,), range(3),
            slice(1, 2), None, True, ..., decimal.Decimal("1.5"), fractions.Fraction(1, 3),
            datetime.datetime(2026, 12, 2, 4, 0, tzinfo=datetime.timezone.utc), datetime.timedelta(1),
            collections.OrderedDict(a=1), collections.deque([1]), collections.Counter("aab"),
            uuid.UUID(int=7)]


def fails() -> None:
    raise KeyError("k")


class RunsInTheCaller:
    """What a compromised host could send: unpickling it calls os.getpid
    where it is unpickled (any function could be named the same way)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getpid, ())


def crafted() -> RunsInTheCaller:
    return RunsInTheCaller()


def crafted_event() -> str:
    from anyfork._rpc_worker import event  # the worker's own, forwarded with it

    event(RunsInTheCaller())
    return "sent"


class CraftedError(Exception):
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, self.args)


def crafted_error(path: str) -> None:
    raise CraftedError(path)


remembered = ""


def remember(what: str) -> None:
    """An Executor's initializer."""
    global remembered
    remembered = what


def sleep_then_parent(seconds: float) -> tuple[int, str]:
    import time

    time.sleep(seconds)  # long enough that a second worker takes some of the calls
    return os.getppid(), remembered

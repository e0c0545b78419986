"""The caller side's module state, in one object: ``runtime``.

What anyfork keeps between calls: the default template behind ``new()``, the
early process (``anyfork.early``), the processes the caller spawned itself
and must reap, and the *generation*.  The generation moves on in every
process forked from the caller and at interpreter exit; an object made in
an older generation is dead (its descriptors were closed by ``_fds``, and
their numbers may be someone else's by now), and says so with
ProcessStateError instead of touching them.

Everything that reads or changes this state goes through the object, never
through aliases of its fields: ``anyfork.early`` calls :meth:`Runtime.set_early`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from . import _fds
from ._errors import ProcessStateError

if TYPE_CHECKING:
    from ._failures import Sink
    from ._process import Process


class Reaped(Protocol):
    """A process the caller spawned itself (see ``_direct.Direct``)."""

    def poll(self) -> bool: ...

    def forget(self) -> None: ...


class Runtime:
    """The state of anyfork in this process (see the module's doc)."""

    __slots__ = (
        "default",
        "default_path",
        "default_site",
        "directs",
        "early",
        "early_site",
        "failures",
        "failures_lock",
        "generation",
        "lock",
        "shut_down",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards replacing the default template
        self.generation = 0
        self.shut_down = False
        self.default: Process | None = None
        self.default_path: list[str] = []  # sys.path as the default template has it
        self.default_site: list[str] = []  # site directories the default template processed
        self.early: Process | None = None
        self.early_site: list[str] = []  # site directories the program had when early forked
        self.directs: dict[int, Reaped] = {}  # pid -> child the caller must reap
        self.failures: Sink | None = None  # the failure sink (see _failures), made on first use
        self.failures_lock = threading.Lock()

    def set_early(self, proc: Process, site: list[str]) -> None:
        """Make ``proc`` the early process: ``new_exec`` and ``new`` fork from it."""
        self.early = proc
        self.early_site = site

    def check(self, gen: int, what: str) -> None:
        """Raise unless an object of generation ``gen`` is still alive here."""
        if gen != self.generation:
            raise ProcessStateError(
                f"{what} belongs to the process this one was forked from"
                if not self.shut_down
                else f"{what}: anyfork has shut down (interpreter exit)")

    def reap_directs(self) -> None:
        """Reap exited direct children, including ones whose Process was dropped."""
        for d in list(self.directs.values()):
            d.poll()

    def _after_fork_in_child(self) -> None:
        self.generation += 1
        self.lock = threading.Lock()  # another thread may have held it at the fork
        for d in self.directs.values():
            d.forget()  # its pidfd is closed by _fds with the rest; the number may be reused
        self.directs.clear()
        self.default = None
        self.early = None
        self.failures = None  # its ends are closed by _fds; a new one is made on use
        self.failures_lock = threading.Lock()

    def _at_exit(self) -> None:
        self.generation += 1
        self.shut_down = True
        for d in list(self.directs.values()):
            d.forget()  # its pidfd is closed by _fds with the rest


runtime = Runtime()
_fds.on_fork(runtime._after_fork_in_child)
_fds.on_exit(runtime._at_exit)

"""Shared helpers for the reliability tests (issue 5).

Slow tests (the full-size soak and friends) run only with ANYFORK_SLOW=1.
Every wait here has a deadline: a test that would hang fails instead.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ANYFORK_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set ANYFORK_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class Helpers:
    """Small deadline-bounded tools, handed to tests as the ``h`` fixture."""

    @staticmethod
    def until(pred: Callable[[], object], timeout: float, what: str | Callable[[], str]) -> None:
        """Poll ``pred`` until true; fail the test after ``timeout`` seconds.

        ``what`` says what was awaited; a callable is asked at the failure.
        """
        deadline = time.monotonic() + timeout
        delay = 0.002
        while not pred():
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout} s: {what() if callable(what) else what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def call_with_deadline(
        fn: Callable[[], Any], timeout: float, what: str
    ) -> tuple[Any, BaseException | None]:
        """Run ``fn`` in a thread; fail if it has not returned or raised in time.

        Returns (result, exception).  The thread is a daemon, so a hang fails
        this test without keeping the interpreter alive.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            pytest.fail(f"hung for more than {timeout} s: {what}")
        return box.get("result"), box.get("error")

    @staticmethod
    def proc_state(pid: int) -> str | None:
        """The /proc state letter of ``pid`` (None: no such process)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        return data[data.rindex(b")") + 2 :].split()[0].decode()

    @classmethod
    def gone(cls, pid: int) -> bool:
        """True once ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
        return cls.proc_state(pid) in (None, "Z", "X")

    @staticmethod
    def ppid(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        return int(data[data.rindex(b")") + 2 :].split()[1])

    @classmethod
    def children(cls, pid: int) -> list[int]:
        """Live and zombie children of ``pid``, from /proc."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit() and cls.ppid(int(name)) == pid:
                out.append(int(name))
        return out

    @classmethod
    def descendants(cls, pid: int) -> list[int]:
        parents: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                pp = cls.ppid(int(name))
                if pp is not None:
                    parents.setdefault(pp, []).append(int(name))
        out, todo = [], [pid]
        while todo:
            for c in parents.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    @classmethod
    def zombies(cls, parent: int) -> list[int]:
        return [c for c in cls.children(parent) if cls.proc_state(c) == "Z"]

    @staticmethod
    def fds(pid: int | str = "self") -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}

    @staticmethod
    def fd_count(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    @staticmethod
    def rss_kib(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {pid}")

    @staticmethod
    def recv_all(sock: Any, timeout: float = 10.0) -> bytes:
        """Read until EOF, with a deadline on each read."""
        sock.settimeout(timeout)
        chunks = []
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers


@pytest.fixture
def default_template_pid() -> Callable[[], int]:
    """The pid of anyfork's default template (starting it if needed)."""

    def get() -> int:
        import anyfork
        from anyfork import _runtime

        p = anyfork.new()
        p.close()
        tpl = _runtime.runtime.default
        assert tpl is not None
        return tpl.pid

    return get


@pytest.fixture
def make_proc() -> Any:
    """A factory for processes of each kind the reliability tests cover.

    ``make_proc("new")``: forked from the default template; ``make_proc("new_exec")``: a
    fresh interpreter; ``make_proc("fork")``: forked from a user template (a
    ``new_exec`` process), which is kept alive until the test ends.
    """
    import anyfork

    templates: list[anyfork.Process] = []

    def factory(kind: str) -> anyfork.Process:
        if kind == "new":
            return anyfork.new()
        if kind == "new_exec":
            return anyfork.new_exec()
        if kind == "fork":
            tpl = anyfork.new_exec()
            templates.append(tpl)
            return tpl.fork()
        raise ValueError(kind)

    yield factory
    for tpl in templates:
        tpl.close()

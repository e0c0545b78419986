"""Fixtures shared by the test modules.

``check_leaks`` is what the modules that start processes opt into (with
``pytestmark``): after the test it diffs ``/proc/self/fd`` against the
snapshot taken before, and looks for zombie children.  The default template
is long-lived by design, so it is started once per session before any
snapshot, and only the descriptors it owns at the end of a test (it may have
been replaced during the test, and the processes it forked ahead are) are
allowed to be new.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _failures, _runtime
import xdist_alone
from helpers import open_fds, zombie_children

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# How long exiting processes get to be reaped and their descriptors closed
# before a test counts as leaking.
SETTLE = 3.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that runs alone first waits for the tests running beside it to
    # end (the bench's, 150 s at most): its pytest-timeout bound covers that wait too.
    for item in items:
        if _alone(item) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(240))


def _alone(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) is not None for m in ("timing", "heavy"))


@pytest.fixture(autouse=True)
def _timing_tests_run_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist, a test marked "timing" (bound in time) or "heavy"
    (a load that would push others past their bounds, on 3.13t above all)
    runs while no other does."""
    with xdist_alone.turn(_alone(request.node)):
        yield


@pytest.fixture(scope="session")
def default_template() -> None:
    """Start the default template (and its report channel) once."""
    anyfork.new().close()


def _default_template_fds() -> set[int]:
    """What the default template owns now: its socket, its report channel,
    its pidfd, and the processes it keeps forked ahead, ready for new()
    (replaced as they are handed out, so they change from test to test);
    and anyfork.rpc's reader thread's epoll, long-lived by design too."""
    tpl = _runtime.runtime.default
    fds = set() if tpl is None else tpl._descriptors()
    fds |= _failures.descriptors()  # the failure sink: made on first use, kept
    rpc = sys.modules.get("anyfork.rpc")
    reactor = getattr(rpc, "_the_reactor", None)
    if reactor is not None and reactor.epoll is not None:
        fds.add(reactor.epoll.fileno())
    return fds


def _leaks(before: dict[int, str]) -> tuple[dict[int, str], list[int]]:
    # Processes the test dropped are collected, and children that exited are
    # reaped, by the next call into anyfork: make that call.
    gc.collect()
    _runtime.runtime.reap_directs()
    now = open_fds()
    allowed = _default_template_fds()
    leaked = {fd: target for fd, target in now.items()
              if fd not in allowed and before.get(fd) != target}
    return leaked, zombie_children()


@pytest.fixture
def check_leaks(default_template: None) -> Iterator[None]:
    """Fail the test if it leaves descriptors open or zombies behind."""
    gc.collect()
    before = open_fds()
    yield
    deadline = time.monotonic() + SETTLE
    while True:
        leaked, zombies = _leaks(before)
        if not leaked and not zombies:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"descriptors left open: {leaked}"
    assert not zombies, f"zombie children left: {zombies}"


def _ways(request: pytest.FixtureRequest) -> Iterator[Callable[[], anyfork.Process]]:
    if request.param == "new":
        yield anyfork.new
    elif request.param == "new_exec":
        yield anyfork.new_exec
    else:
        # Made on first use (so it sees what the test put on sys.path), and
        # held in a list so that nothing refers to it once it is closed (a
        # closed template keeps its report channel while referenced).
        templates: list[anyfork.Process] = []

        def fork() -> anyfork.Process:
            if not templates:
                templates.append(anyfork.new_exec())
            return templates[0].fork()

        yield fork
        if templates:
            template = templates.pop()
            template.close()
            assert template.wait(SETTLE) == 0


@pytest.fixture(params=["new", "new_exec", "fork"])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[[], anyfork.Process]]:
    """Each way of getting a process: from the default template, a fresh
    interpreter, or a fork of a template of the test's own."""
    yield from _ways(request)


@pytest.fixture(params=["new", "fork"])
def forked(request: pytest.FixtureRequest) -> Iterator[Callable[[], anyfork.Process]]:
    """The ways of getting a process a template forks, whose first command is
    read without the decoder when it is RUN.  (Raw frames skip the PATH
    command a new_exec process needs before it can import the test's helpers.)"""
    yield from _ways(request)

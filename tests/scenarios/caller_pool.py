"""What the caller_pool_* programs share: the default template's pool of
processes forked ahead, filled, and checks that they are gone."""

import os
import signal
import time

import anyfork
import helpers
from anyfork import _failures, _process


def fill_pool(tpl):
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    return [child.pid for child, _ in tpl._tpl.state.pool.values()]


def template_fds(tpl):
    """The template's descriptors, and the failure sink (made once, kept)."""
    return tpl._descriptors() | _failures.descriptors()


def still_alive(pids):
    deadline = time.monotonic() + 3
    alive = [pid for pid in pids if not helpers.wait_exited(pid, max(0, deadline - time.monotonic()))]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # clean up what the test started
    return alive


def start():
    """The descriptors open before anyfork's, once the default template runs."""
    before = helpers.open_fds()
    anyfork.new().close()
    return before

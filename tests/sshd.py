"""The remote tests' throwaway OpenSSH servers on loopback: anyfork._sshd
(which the bench uses too), and how a test gets them."""

from __future__ import annotations

import os
import sys

from anyfork._sshd import KEYGEN as KEYGEN
from anyfork._sshd import SSH as SSH
from anyfork._sshd import SSHD as SSHD
from anyfork._sshd import Hosts as Hosts
from anyfork._sshd import Sshd as Sshd
from anyfork._sshd import _keygen as _keygen
from anyfork._sshd import available as available


def remote_python() -> str:
    """The interpreter a remote command should start: this one, by absolute path."""
    return sys.executable


def hosts_or_skip(*aliases: str) -> Hosts:
    """Servers for ``aliases``; skips the test where OpenSSH is missing, fails in CI."""
    import pytest

    reason = available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it, remote tests never skip in CI")
        pytest.skip(reason)
    h = Hosts()
    try:
        for alias in aliases:
            h.start(alias)
    except BaseException:
        h.close()
        raise
    return h

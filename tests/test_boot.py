"""The exec bootstrap (``_boot``): what a new_exec process runs before the loop."""

from __future__ import annotations

import os
import time

import pytest

import anyfork
from anyfork import _exec, _serve
from helpers import outcome

pytestmark = pytest.mark.usefixtures("check_leaks")


def test_an_exec_process_loads_the_bootstrap_and_the_loop_and_nothing_else_of_anyfork() -> None:
    """Issue 9: the bootstrap is a module apart from the loop; the stand-in
    package it came through is gone by the time anything runs."""
    names = ["anyfork", "anyfork._boot", "anyfork._serve", "anyfork._protocol", "anyfork._exec",
             "anyfork._process", "typing"]
    got = outcome(anyfork.new_exec().send_arg(*names), "helpers:imported")
    assert got == {"anyfork": False, "anyfork._boot": True, "anyfork._serve": True,
                   "anyfork._protocol": True, "anyfork._exec": False, "anyfork._process": False,
                   "typing": False}


def test_the_serve_loop_holds_no_exec_bootstrap() -> None:
    assert not hasattr(_serve, "main")
    assert "anyfork._boot import main" in _exec.boot_code()


def test_an_exec_process_has_a_short_readable_command_line_and_argv() -> None:
    """Issue 14: ps showed 'python3 -B -S -c exec("import sys\\nm = type(sys)...'."""
    p = anyfork.new_exec()
    # posix_spawn returns once the child is in execve, and the kernel shows an
    # empty cmdline until execve has set up the new image: look again a moment.
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        if argv or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert argv[-1] == f"anyfork process of {os.getpid()}".encode()
    assert argv[-3] == b"-c", argv
    assert len(argv[-2]) < 60, argv
    assert len(b" ".join(argv)) < len(_exec.find_python()) + 120, argv
    # What the code run there sees: no tag in sys.argv, no bootstrap in its environment.
    got = outcome(p.eval("import os, sys\ndef look(s):\n"
                         "    s.sendall(repr((sys.argv, 'ANYFORK_BOOT' in os.environ)).encode())\n"),
                  "look")
    assert got == (["-c"], False)


def test_ld_bind_now_set_for_the_bootstrap_alone_is_gone_when_code_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LD_BIND_NOW", raising=False)
    p = anyfork.new_exec().eval(
        "import os\ndef env(sock):\n"
        "    env = os.environ\n"
        "    sock.sendall(repr((env.get('LD_BIND_NOW'), env.get('ANYFORK_UNSET_BIND_NOW'))).encode())\n")
    assert outcome(p, "env") == (None, None)
    monkeypatch.setenv("LD_BIND_NOW", "1")  # the caller's own: it stays
    p = anyfork.new_exec().eval(
        "import os\ndef env(sock):\n    sock.sendall(repr(os.environ.get('LD_BIND_NOW')).encode())\n")
    assert outcome(p, "env") == "1"
    assert os.environ["LD_BIND_NOW"] == "1"

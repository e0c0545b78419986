"""Regression tests for the defects code reviews found, not yet moved beside their module.

The caller side's moved to the test file of the module each pins (tests/
test_process.py, test_reports.py, test_direct.py, test_fds.py, test_aio.py,
test_template.py, test_early.py), their programs to tests/scenarios/caller_*.py.

Each test pins the behaviour a defect broke.  Scenarios that could hang the
test process, fork it, or leave it with a stuck thread run in a caller of
their own (``[sys.executable, "-c", code]``, killed at a deadline); the
caller prints one JSON line of facts and the test checks them.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import anyfork
from anyfork import _protocol as wire
from helpers import read_all, read_exactly, run_source

if TYPE_CHECKING:
    from collections.abc import Callable

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20
_SRC = str(Path(anyfork.__file__).resolve().parent.parent)
_TESTS = str(Path(__file__).resolve().parent)


def run_caller(code: str, timeout: float = 30.0) -> dict[str, Any]:
    """Run ``code`` as a caller of its own; the JSON line of facts it printed
    (helpers.run_program, the one harness, on a file made of it)."""
    with tempfile.TemporaryDirectory() as d:
        return run_source(Path(d), code, timeout=timeout).facts


# --- status -----------------------------------------------------------------------------


# --- kill -------------------------------------------------------------------------------


# --- after os.fork ----------------------------------------------------------------------


# --- the default template's forked-ahead processes --------------------------------------


# --- threads ----------------------------------------------------------------------------


# --- asyncio ----------------------------------------------------------------------------


# --- descriptors and reaping ------------------------------------------------------------


# --- second review ----------------------------------------------------------------------


# Defect r2-lost-status: a child reaped by code eval'd in its template made wait() hang.
_REAPED_IN_TEMPLATE = """
import anyfork, json, time
tpl = anyfork.new_exec()
kid = tpl.fork()
s = kid.run("helpers:wait_eof")
tpl.eval(f"import os\\nos.waitpid({kid.pid}, 0)\\n")
extra = tpl.fork()  # writes the eval: the template blocks in waitpid
s.close()  # the kid exits, and the template's own code collects its status
t0 = time.monotonic()
try:
    got = kid.wait(5)
except anyfork.Error as e:
    got = type(e).__name__
elapsed = time.monotonic() - t0
extra.close()
tpl.close()
print(json.dumps({"got": got, "elapsed": elapsed, "template": tpl.wait(5)}))
"""


def test_child_reaped_by_code_in_its_template_raises_exit_status_lost() -> None:
    facts = run_caller(_REAPED_IN_TEMPLATE, timeout=30)
    assert facts["got"] == "ExitStatusLostError", f"wait() on a child its template reaped: {facts}"
    assert facts["elapsed"] < 3, facts


# Defect r2-pth: .pth import lines the caller never ran (a plain sys.path directory) ran in every child.
_UNRUN_PTH = """
import anyfork, json, os, sys
sys.path.insert(0, DIR)  # like a script's own directory: never processed by site
for make in (anyfork.new_exec, anyfork.new):
    p = make()
    p.run("builtins:id").close()
    p.wait(5)
mark = os.path.join(DIR, "ran")
print(json.dumps({"ran_in": open(mark).read().split() if os.path.exists(mark) else []}))
"""


@pytest.mark.parametrize("hook", [
    pytest.param("import anyfork_pth_hook\n", id="imports-a-module"),
    pytest.param(
        "import sys; open(MARK, 'a').write('%d\\n' % sys.modules['os'].getpid())\n",
        id="demo-import-sys"),
])
def test_pth_hook_the_caller_never_ran_runs_in_no_child(tmp_path: Path, hook: str) -> None:
    mark = str(tmp_path / "ran")
    (tmp_path / "anyfork_pth_hook.py").write_text(
        f"import os\nopen({mark!r}, 'a').write('%d\\n' % os.getpid())\n")
    (tmp_path / "hook.pth").write_text(hook.replace("MARK", repr(mark)))
    facts = run_caller(_UNRUN_PTH.replace("DIR", repr(str(tmp_path))), timeout=30)
    assert facts["ran_in"] == [], f"a .pth hook the caller never ran ran in processes {facts}"


# --- the third review (of the first-command path and the template-made socket) -----------------


# Defect r3-site-stdout: a template started with site skipped its stdio flush, and every child
# wrote again what sitecustomize had left in the template's stdout buffer.
def test_output_site_left_in_a_template_is_written_once(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.stdout.write('from sitecustomize')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # block-buffered: only a flush gets it out
    monkeypatch.setattr(anyfork._exec, "site_plan", lambda path: (True, []))  # start it with site
    tpl = anyfork.new_exec()
    for _ in range(3):
        child = tpl.fork()
        child.run("builtins:id").close()
        assert child.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0
    assert capfd.readouterr().out.count("from sitecustomize") == 1


# Defect r3-patched-socket: a template whose code replaced socket.socket (gevent, eventlet) died on
# its next fork; before the first fork, its children were still given the original class.
_GREEN = """
import socket, _socket
class GreenSocket:  # like gevent's: wraps a real socket, is not one
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        self._sock = _socket.socket(family, type, proto, fileno)
    def __getattr__(self, name):
        return getattr(self._sock, name)
    def close(self):
        self._sock.close()
socket.socket = GreenSocket
"""


@pytest.mark.parametrize("forked_before", [False, True], ids=["patched-first", "patched-later"])
def test_a_template_that_patches_socket_gives_children_the_patched_class(forked_before: bool) -> None:
    tpl = anyfork.new_exec().eval("def kind(sock):\n    sock.sendall(type(sock).__name__.encode())\n")
    if forked_before:
        first = tpl.fork()
        with first.run("kind") as sock:
            assert read_exactly(sock, 6) == b"socket"
        assert first.wait(5) == 0
    tpl.eval(_GREEN)
    for _ in range(2):
        child = tpl.fork()
        with child.run("kind") as sock:
            assert read_exactly(sock, 11) == b"GreenSocket"
        assert child.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0


# Defect r3-closed-flag: a worker that closed its socket and then became a template with
# fork_template() handed its children that very object, flagged closed: closing a makefile()
# object then closed their socket.
_CLOSED_FLAG = """
def grandchild(sock):
    f = sock.makefile("rb")
    f.close()  # must leave the socket open
    sock.sendall(b"still open")

def worker(sock):
    sock.close()
    import anyfork
    sub = anyfork.fork_template()
    p = sub.fork()
    s = p.run("grandchild")
    s.settimeout(5)
    got = b"".join(iter(lambda: s.recv(100), b""))
    status = p.wait(5)
    sub.close()
    with open(RESULT, "w") as f:
        f.write(repr((got, status)))
"""


def test_a_worker_that_becomes_a_template_gives_its_children_open_sockets(tmp_path: Path) -> None:
    result = tmp_path / "result"
    tpl = anyfork.new_exec().eval(_CLOSED_FLAG).eval(f"RESULT = {str(result)!r}")
    worker = tpl.fork()  # forked: its first command is RUN, so it gets the template-made socket
    worker.run("worker").close()
    assert worker.wait(15) == 0
    assert result.read_text() == repr((b"still open", 0))
    tpl.close()
    assert tpl.wait(5) == 0


# Defect r3-stack: each generation of forks (a child forked from a child ...) nested another serve
# loop, until one hit RecursionError around the 190th generation.
def test_a_long_chain_of_forks_keeps_a_flat_stack() -> None:
    p = anyfork.new_exec().eval(
        "import inspect\n"
        "def depth(sock):\n"
        "    sock.sendall(b'%d' % len(inspect.stack(0)))\n"
    )
    chain = [p]
    for _ in range(250):
        chain.append(chain[-1].fork())
    with chain[-1].run("depth") as sock:
        depth = int(read_exactly(sock, 3) or b"0")
    assert 0 < depth < 20
    assert chain[-1].wait(10) == 0
    for q in reversed(chain[:-1]):  # each one's template reports its status, so it goes last
        q.close()
        assert q.wait(10) == 0


# Defect r3-emfile-first-fork: making the template's socket object opened a descriptor, so a
# template one descriptor short failed its first fork (or died of it, forking ahead).
def test_a_template_one_descriptor_short_still_forks() -> None:
    tpl = anyfork.new_exec().eval(
        "import helpers, os\n"
        "HOG = helpers.exhaust_descriptors(64)\n"
        "for fd in HOG[-4:]:\n"
        "    os.close(fd)  # what a first fork needs: the 2 descriptors it brings, a wake pipe\n"
        "del HOG[-4:]\n"
    )
    child = tpl.fork()
    child.run("builtins:id").close()
    assert child.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0


# Defect r3-fds-on-run: descriptors sent with a first RUN's payload were dropped and the function
# ran; the stream is malformed (RUN takes none) and must be refused.
def test_descriptors_with_a_first_run_payload_are_a_corrupted_stream() -> None:
    tpl = anyfork.new_exec()
    p = tpl.fork()
    sock = p._cmd.sock
    assert sock is not None
    r, w = os.pipe()
    try:
        name = b"builtins:id"
        sock.sendall(wire.HEADER.pack(wire.VERSION, wire.RUN, 0, len(name)))
        time.sleep(0.2)  # the header alone first: the payload is a read of its own
        sock.sendmsg([name], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
    finally:
        os.close(r)
        os.close(w)
    assert p.wait(5) == 2
    p.close()
    tpl.close()
    assert tpl.wait(5) == 0


# Defect r3-reap-foreign (there before the change): a zombie of the template's own code first in
# line stopped reaping, and the statuses of children behind it were never reported.
def test_statuses_behind_a_zombie_of_the_templates_own_code_are_reported() -> None:
    tpl = anyfork.new_exec().eval("def wait_eof(sock):\n    while sock.recv(4096):\n        pass\n")
    a = tpl.fork()
    sa = a.run("wait_eof")
    tpl.eval("import subprocess\nhelper = subprocess.Popen(['true'])")  # not waited for: a zombie
    b = tpl.fork()
    sb = b.run("wait_eof")
    time.sleep(0.5)  # the helper has exited
    os.kill(tpl.pid, signal.SIGSTOP)  # let both workers exit before the template looks
    try:
        sa.close()
        sb.close()
        time.sleep(0.5)
    finally:
        os.kill(tpl.pid, signal.SIGCONT)
    assert a.wait(5) == 0
    assert b.wait(5) == 0
    tpl.eval("helper.wait()")
    tpl.close()
    assert tpl.wait(5) == 0


# --- the fourth review (of the third one's fixes) ------------------------------------------------


# Defect r4-lost: a child reaped by code run in its template was never reported LOST when another
# child's status came in the same pass.
def test_a_child_reaped_behind_the_templates_back_is_lost_even_beside_another_exit() -> None:
    tpl = anyfork.new_exec().eval(
        "import os, time\ndef quick(sock): time.sleep(0.5)\ndef later(sock): time.sleep(0.3)\n")
    a = tpl.fork()
    a.run("quick").close()
    b = tpl.fork()
    b.run("later").close()
    tpl.eval("os.waitpid(int(args[0]), 0)\ntime.sleep(1.0)\n", str(a.pid))
    assert b.wait(5) == 0
    with pytest.raises(anyfork.ExitStatusLostError):
        a.wait(5)
    tpl.close()
    assert tpl.wait(5) == 0


def _blocking_facts(sock: socket.socket) -> tuple[object, bool]:
    return sock.gettimeout(), os.get_blocking(sock.fileno())


# Defect r4-spare-timeout: under socket.setdefaulttimeout() in a template, the caller's ends of the
# processes it forked ahead came back O_NONBLOCK, so run()'s socket raised BlockingIOError.
def test_sockets_of_processes_a_timeout_template_forked_ahead_are_blocking() -> None:
    tpl = anyfork.new_exec().eval("import socket\nsocket.setdefaulttimeout(5)\n").fork_ahead(2)
    for _ in range(4):  # from processes it forked ahead
        p = tpl.fork()
        with p.run("builtins:id") as sock:
            assert _blocking_facts(sock) == (None, True)
        assert p.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0


# Defect r4-report-timeout: the same template's report channel had the timeout: a send it could not
# make at once waited for it, then the report was dropped as if the caller had gone.
def test_a_timeout_templates_report_channel_has_no_timeout(tmp_path: Path) -> None:
    out = tmp_path / "timeout"
    tpl = anyfork.new_exec().eval("import socket\nsocket.setdefaulttimeout(5)\n")
    p = tpl.fork()  # the first fork brings the report channel
    p.run("builtins:id").close()
    assert p.wait(5) == 0
    tpl.eval(
        "import gc, anyfork._serve as s\n"
        "gc.unfreeze()  # frozen objects are not in gc.get_objects()\n"
        "tpl = next(o for o in gc.get_objects() if isinstance(o, s._Template))\n"
        f"open({str(out)!r}, 'w').write(repr(tpl.reports.gettimeout()))\n")
    p = tpl.fork()  # sends the eval along
    p.run("builtins:id").close()
    assert p.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0
    assert out.read_text() == "None"


# Defect r4-patched-first: a program that replaced socket.socket before importing anyfork (what
# gevent advises) could not fork from fork_template(): the template died of a TypeError.
_PATCHED_FIRST = """
import json, socket
real = socket.socket
class GreenSocket:
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        self._sock = real(family, type, proto, fileno)
    def __getattr__(self, name):
        return getattr(self._sock, name)
socket.socket = GreenSocket
import anyfork

def kind(sock):
    sock.sendall(type(sock).__name__.encode())

tpl = anyfork.fork_template()
got = []
for _ in range(2):
    p = tpl.fork()
    s = p.run("kind")
    got.append(s.recv(100).decode())
    s.close()
    p.wait(5)
tpl.close()
print(json.dumps({"got": got, "template": tpl.wait(5)}))
"""


def test_socket_patched_before_anyfork_was_imported_reaches_the_children() -> None:
    facts = run_caller(_PATCHED_FIRST, timeout=30)
    assert facts == {"got": ["GreenSocket", "GreenSocket"], "template": 0}


# Defect r4-foreign-exit (there before): code eval'd in a process forked a helper that ended with
# sys.exit(); the helper unwound into the serve loop it inherited and drained the process's queued
# commands from their shared socket (the RUN among them), so the function never ran.
def test_a_helper_forked_by_eval_that_exits_leaves_the_process_alone() -> None:
    p = anyfork.new_exec()
    p.eval("import os, sys, time\nif os.fork() == 0:\n    sys.exit(0)\ntime.sleep(0.3)\n")
    p.eval("def f(sock):\n    sock.sendall(b'ran')\n")
    with p.run("f") as sock:
        assert read_all(sock) == b"ran"
    assert p.wait(5) == 0


# Defect r4-signals (there before): a handler or mask set by code eval'd in an exec'd template
# reached the function of every process forked from it (README: a fresh interpreter's).
def test_signals_set_by_code_in_a_template_do_not_reach_the_function() -> None:
    tpl = anyfork.new_exec().eval(
        "import signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "def show(sock):\n"
        "    state = (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,\n"
        "             signal.pthread_sigmask(signal.SIG_BLOCK, ()))\n"
        "    sock.sendall(repr(state).encode())\n"
        "    sock.recv(1)\n")
    p = tpl.fork()
    with p.run("show") as sock:
        sock.settimeout(10)
        assert sock.recv(100) == b"(True, set())"
        p.kill()
        assert p.wait(5) == -signal.SIGTERM
    tpl.close()
    assert tpl.wait(5) == 0

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

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import anyfork
from helpers import run_source

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




# --- the fourth review (of the third one's fixes) ------------------------------------------------





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


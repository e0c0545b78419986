"""anyfork.early: the program forked at its first import, as the default template.

Each scenario is its own main program (importing anyfork.early forks whoever
imports it), run as ``[sys.executable, script]``; it prints one JSON line of
facts.  ``subprocess.run`` reads stdout to EOF, which the early process and
its children hold too: every test also checks that they exit with the
program.
"""

from __future__ import annotations

import asyncio  # noqa: F401
import json
import os
import select  # noqa: F401
import struct  # noqa: F401
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import anyfork
from anyfork import _protocol as wire  # noqa: F401
from anyfork._backend import deadline_after, run_blocking  # noqa: F401
from anyfork._caller import TemplateState  # noqa: F401
from anyfork._reports import ReportChannel  # noqa: F401
from helpers import read_all, run_program, run_source, wait_exited, zombie_children  # noqa: F401

_SRC = str(Path(anyfork.__file__).resolve().parent.parent)

pytestmark = pytest.mark.usefixtures("check_leaks")

# Defines, in a process forked from the early process, a function that
# reports where it runs.  The early process's __main__ holds only what the
# program defined before ``import anyfork.early``, so it is sent with eval.
REPORT = '''
import gc, json, os, sys
def report(sock):
    sock.sendall(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(),
        "mark": globals().get("MARK"),             # set in __main__ before the fork
        "frozen": gc.get_freeze_count(),
        "path_tail": sys.path[-1],
        "fds": sorted(map(int, os.listdir("/proc/self/fd"))) if os.path.isdir("/proc/self/fd") else None,
    }).encode())
'''


PROGRAM = """
    MARK = "set before the fork"
    import anyfork.early
    import atexit, json, os, sys
    import anyfork

    atexit.register(lambda: os.write(1, f"ATEXIT {os.getpid()}\\n".encode()))
    sys.path.append(os.path.join(os.getcwd(), "added-after-the-fork"))
    REPORT = __REPORT__

    def ask(proc):
        s = proc.eval(REPORT).run("report")
        got = json.loads(s.recv(4096))
        s.close()
        got["rc"] = proc.wait(5)
        return got

    seen = [ask(anyfork.new_exec()) for _ in range(3)] + [ask(anyfork.new()) for _ in range(2)]
    print(json.dumps({"me": os.getpid(), "early": anyfork.early.process.pid, "seen": seen}))
""".replace("__REPORT__", repr(REPORT))


def test_new_exec_and_new_fork_from_the_early_process(tmp_path: Path) -> None:
    facts, stderr = run_source(tmp_path, PROGRAM, "-X", "dev")
    assert stderr == ""  # no LateImportWarning, and (-X dev) no ResourceWarning at exit
    me, early = facts["me"], facts["early"]
    assert early != me
    seen = facts["seen"]
    assert len({s["pid"] for s in seen}) == 5
    for s in seen:
        assert s["ppid"] == early  # one parent for all of them
        assert s["mark"] == "set before the fork"  # forked, not exec'ed: __main__ is the program's
        assert s["frozen"] > 0  # the early process froze its heap before forking them
        assert s["path_tail"].endswith("added-after-the-fork")  # sys.path as of the call
        assert s["rc"] == 0
        if s["fds"] is not None:  # stdio, its socket, listdir's own: nothing of the early process's
            assert len(s["fds"]) == 5, s["fds"]


def test_program_atexit_runs_once(tmp_path: Path) -> None:
    program = PROGRAM.replace("print(json.dumps(", "sys.stdout.flush(); print(json.dumps(")
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(program))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=20, env=env, cwd=tmp_path, check=True)
    facts = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    ran_atexit = [line for line in proc.stdout.splitlines() if line.startswith("ATEXIT")]
    assert ran_atexit == [f"ATEXIT {facts['me']}"]


def test_back_to_exec_once_the_early_process_is_gone(tmp_path: Path) -> None:
    facts, stderr = run_source(tmp_path, """
        import anyfork.early
        import json, os
        import anyfork

        REPORT = "import os\\ndef report(s): s.sendall(str(os.getppid()).encode())"

        def ppid(proc):
            s = proc.eval(REPORT).run("report")
            n = int(s.recv(64))
            s.close()
            return n

        anyfork.early.process.close()
        rc = anyfork.early.process.wait(5)
        print(json.dumps({"me": os.getpid(), "rc": rc,
                          "exec_ppid": ppid(anyfork.new_exec()), "new_ok": ppid(anyfork.new()) > 0}))
    """)
    assert stderr == ""
    assert facts["rc"] == 0
    assert facts["exec_ppid"] == facts["me"]  # spawned by the program itself
    assert facts["new_ok"] is True


@pytest.mark.parametrize("how", ["script", "-m"])
def test_first_import_does_not_warn(tmp_path: Path, how: str) -> None:
    source = """
        import anyfork.early
        import json
        print(json.dumps({"early": anyfork.early.process.pid}))
    """
    if how == "-m":
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "__init__.py").write_text("")
        facts, stderr = run_source(tmp_path, source, "-W", "error", "-m", "app.main", name="app/main.py")
    else:
        facts, stderr = run_source(tmp_path, source, "-W", "error")
    assert stderr == ""
    assert facts["early"] > 0


@pytest.mark.parametrize(
    ("before", "why"),
    [
        ("import json", "json"),
        ("import threading; threading.Thread(target=threading.Event().wait, daemon=True).start()", "thread"),
    ],
    ids=["modules", "threads"],
)
def test_late_import_warns_once_and_still_works(tmp_path: Path, before: str, why: str) -> None:
    facts, stderr = run_source(tmp_path, f"""
        {before}
        import anyfork.early
        import json, os
        import anyfork
        REPORT = {REPORT!r}
        s = anyfork.new_exec().eval(REPORT).run("report")
        got = json.loads(s.recv(4096))
        s.close()
        print(json.dumps({{"early": anyfork.early.process.pid, "ppid": got["ppid"]}}))
    """)
    assert stderr.count("LateImportWarning") == 1, stderr
    assert "anyfork.early was not the first import" in stderr
    assert why in stderr.partition("LateImportWarning")[2]
    assert "main.py:3" in stderr  # attributed to the program's import line
    assert facts["ppid"] == facts["early"]


def test_no_socket_left_unclosed_at_exit(tmp_path: Path) -> None:
    _facts, stderr = run_source(tmp_path, """
        import os, sys
        sys.unraisablehook = lambda u: os.write(2, f"UNRAISABLE {u.exc_value!r}\\n".encode())
        import anyfork.early
        import json
        import anyfork
        # the early process gets a report channel; no reference to it is kept
        anyfork.new().eval("def f(s): pass").run("f").close()
        print(json.dumps({}))
    """, "-W", "error::ResourceWarning")
    assert "UNRAISABLE" not in stderr, stderr


# --- regressions: what broke once, pinned (moved from test_regressions.py) -------------


# Pins r2-inflight: closing a template left its forked-ahead processes still on their way alive.


def test_closing_the_early_template_lets_go_of_processes_forked_ahead_on_their_way() -> None:
    facts = run_program("caller_close_with_spawns_in_flight.py", timeout=30).facts
    assert facts["status"] == 0, facts
    assert facts["left"] == [], f"processes forked ahead outlived their closed template: {facts}"


# Pins r2-pth-early: under anyfork.early, new_exec() ran a hook again the early process had run.


def test_hook_is_not_run_twice_in_processes_of_the_early_process(tmp_path: Path) -> None:
    (tmp_path / "anyfork_pth_count.py").write_text(
        "count = 0\n\ndef bump():\n    global count\n    count += 1\n")
    (tmp_path / "count.pth").write_text("import anyfork_pth_count; anyfork_pth_count.bump()\n")
    facts = run_program("caller_early_site_twice.py", str(tmp_path), timeout=30).facts
    assert facts == {"caller": 1, "new": 1, "new_exec": 1}, f"times the hook ran: {facts}"


# Pins r2-early-lock: in a process of the early process, another thread importing anyfork.early hung.


def test_thread_importing_anyfork_early_in_a_process_of_the_early_process_completes() -> None:
    facts = run_program("caller_early_import_in_thread.py", timeout=30).facts
    assert facts["said"] == "imported", f"the thread's import did not complete: {facts}"

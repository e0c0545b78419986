"""anyfork.early: the program forked at its first import, as the default template.

Each scenario is its own main program (importing anyfork.early forks whoever
imports it), run as ``[sys.executable, script]``; it prints one JSON line of
facts.  ``subprocess.run`` reads stdout to EOF, which the early process and
its children hold too: every test also checks that they exit with the
program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import anyfork

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


def run_program(tmp_path: Path, source: str, *python_args: str, name: str = "main.py") -> tuple[Any, str]:
    script = tmp_path / name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, *python_args]
    if "-m" not in python_args:
        argv.append(str(script))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    facts = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(facts) == 1, proc.stdout + proc.stderr
    return json.loads(facts[0]), proc.stderr


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
    facts, stderr = run_program(tmp_path, PROGRAM, "-X", "dev")
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
    facts, stderr = run_program(tmp_path, """
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
        facts, stderr = run_program(tmp_path, source, "-W", "error", "-m", "app.main", name="app/main.py")
    else:
        facts, stderr = run_program(tmp_path, source, "-W", "error")
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
    facts, stderr = run_program(tmp_path, f"""
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
    _facts, stderr = run_program(tmp_path, """
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

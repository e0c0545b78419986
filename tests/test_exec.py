"""Starting fresh interpreters: which python, with or without site, and
what the new process inherits (one descriptor, default signal handling)."""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import textwrap
import types
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _exec
from helpers import outcome

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("check_leaks")

SRC = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))

HOOK_FINDER = textwrap.dedent("""\
    import importlib.abc, importlib.util, sys

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "virtualmod_anyfork":
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            exec("def hello(sock):\\n    sock.sendall(b'hello from a hook')\\n", module.__dict__)

    def install():
        sys.meta_path.append(Finder())
""")


def site_dir(tmp_path: Path, pth: str) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    (d / "hookfinder.py").write_text(HOOK_FINDER)
    (d / "extra.pth").write_text(pth)
    return d


@pytest.fixture
def hook_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the caller had processed extra.pth: the module it imports is loaded."""
    monkeypatch.setitem(sys.modules, "hookfinder", types.ModuleType("hookfinder"))


@pytest.fixture(autouse=True)
def _no_site_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_exec, "_site_cache", None)


# --- site or no site --------------------------------------------------------------------------


@pytest.mark.usefixtures("hook_ran")
def test_needs_site_for_a_pth_import_line_in_a_site_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = site_dir(tmp_path, "# a comment\nimport hookfinder; hookfinder.install()\n")
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(d)])
    assert _exec.site_plan([str(d)]) == (True, [])


@pytest.mark.usefixtures("hook_ran")
def test_an_added_site_directory_with_a_pth_import_line_is_sent_not_sited(tmp_path: Path) -> None:
    # Not one of the interpreter's own site directories: the child's site
    # would not process it, so it goes in the SITE command, and -S stays.
    d = site_dir(tmp_path, "# a comment\nimport hookfinder; hookfinder.install()\n")
    assert _exec.site_plan([str(d)]) == (False, [str(d)])


def test_a_pth_file_the_caller_never_processed_is_left_alone(tmp_path: Path) -> None:
    # A directory on sys.path that nobody processed as a site directory (a
    # script's own, a PYTHONPATH entry): its .pth import lines never ran here,
    # so they must not run in a child either.
    d = site_dir(tmp_path, "import hookfinder; hookfinder.install()\n")
    assert "hookfinder" not in sys.modules
    assert _exec.site_plan([str(d)]) == (False, [])


def test_no_site_needed_for_pth_path_lines_only(tmp_path: Path) -> None:
    d = site_dir(tmp_path, "# a comment\n/some/dir\nimportant-not-an-import\n")
    assert _exec.needs_site([str(d)]) is False


def test_distutils_precedence_pth_does_not_count(tmp_path: Path) -> None:
    (tmp_path / "distutils-precedence.pth").write_text("import os; os.environ.get('X')\n")
    assert _exec.needs_site([str(tmp_path)]) is False


def test_no_site_needed_for_plain_directories_and_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text("")
    assert _exec.needs_site([str(tmp_path), str(tmp_path / "missing"), "/dev/null"]) is False


def test_needs_site_when_sitecustomize_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sitecustomize", types.ModuleType("sitecustomize"))
    assert _exec.needs_site([]) is True


def test_no_site_in_a_caller_that_did_not_run_site(tmp_path: Path) -> None:
    d = site_dir(tmp_path, "import hookfinder; hookfinder.install()\n")
    code = f"from anyfork import _exec; print(_exec.needs_site([{str(d)!r}]))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=20,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.usefixtures("hook_ran")
def test_command_uses_dash_s_exactly_when_site_is_not_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "-S" in _exec.command([str(plain)])
    hooked = site_dir(tmp_path, "import hookfinder; hookfinder.install()\n")
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(hooked)])
    assert "-S" not in _exec.command([str(hooked)])


def test_new_exec_process_runs_site_as_decided() -> None:
    expected = 0 if _exec.needs_site(sys.path) else 1
    assert outcome(anyfork.new_exec(), "helpers:no_site") == expected


CALLER = textwrap.dedent("""\
    import site, sys
    site.addsitedir(sys.argv[1])
    import virtualmod_anyfork  # only the .pth's import hook provides it
    import anyfork
    from anyfork import _exec
    print("sent as SITE", _exec.site_plan(sys.path)[1] == [sys.argv[1]])
    for make in (anyfork.new_exec, anyfork.new):
        p = make().require("virtualmod_anyfork")
        with p.run("virtualmod_anyfork:hello") as sock:
            sock.settimeout(10)
            data = sock.recv(100).decode()
        print(make.__name__, data or "-", p.wait(10))
""")


def test_child_imports_a_module_only_a_pth_import_hook_provides(tmp_path: Path) -> None:
    d = site_dir(tmp_path, "import hookfinder; hookfinder.install()\n")
    proc = subprocess.run([sys.executable, "-c", CALLER, str(d)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.stdout.splitlines() == [
        "sent as SITE True",
        "new_exec hello from a hook 0",
        "new hello from a hook 0",
    ], proc.stderr


# --- which python -----------------------------------------------------------------------------


def test_find_python_is_sys_executable_when_it_looks_like_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFORK_PYTHON", raising=False)
    if not os.path.basename(sys.executable).startswith("python"):
        pytest.skip(f"sys.executable is {sys.executable!r}")
    assert _exec.find_python() == sys.executable


def test_anyfork_python_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYFORK_PYTHON", "/from/the/environment")
    assert _exec.find_python() == "/from/the/environment"
    monkeypatch.setattr(anyfork, "PYTHON", "/from/the/attribute")
    assert _exec.find_python() == "/from/the/attribute"


@pytest.mark.parametrize("bad", ["", "python3", "/usr/bin/not-an-interpreter", "/nonexistent/python3"])
def test_find_python_falls_back_when_sys_executable_is_unusable(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    real = os.path.realpath(sys.executable)
    monkeypatch.delenv("ANYFORK_PYTHON", raising=False)
    monkeypatch.setattr(sys, "executable", bad)
    monkeypatch.setattr(sys, "_base_executable", real, raising=False)
    found = _exec.find_python()
    assert os.path.isabs(found)
    assert os.access(found, os.X_OK)
    assert found != bad


def test_find_python_without_any_candidate_is_an_anyfork_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFORK_PYTHON", raising=False)
    monkeypatch.setattr(sys, "executable", "")
    monkeypatch.setattr(sys, "_base_executable", "", raising=False)
    monkeypatch.setattr(_exec.sysconfig, "get_config_var", lambda name: None)
    with pytest.raises(anyfork.Error, match="PYTHON"):
        _exec.find_python()


def test_new_exec_runs_the_python_it_is_told_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "used"
    wrapper = tmp_path / "wrapped-python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(anyfork, "PYTHON", str(wrapper))
    pid, _ = outcome(anyfork.new_exec(), "helpers:pids")
    assert pid > 0
    assert "-c" in marker.read_text()


def test_new_exec_that_cannot_start_is_an_anyfork_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anyfork, "PYTHON", "/nonexistent/bin/python3")
    with pytest.raises(anyfork.Error, match="nonexistent"):
        anyfork.new_exec()


def test_interpreter_options_are_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "warnoptions", ["ignore::DeprecationWarning"])
    monkeypatch.setattr(sys, "_xoptions", {"faulthandler": True, "importtime": "2"})
    argv = _exec.command(sys.path)
    assert "-Wignore::DeprecationWarning" in argv
    assert "-Xfaulthandler" in argv
    assert "-Ximporttime=2" in argv


# --- what the new process inherits ------------------------------------------------------------


def test_ignored_signals_in_the_caller_are_default_in_the_process() -> None:
    """exec keeps ignored signals ignored: spawn must reset them."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        p = anyfork.new_exec()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert outcome(p, "helpers:signals")["SIGUSR1"] == "SIG_DFL"


def test_blocked_signals_in_the_caller_are_unblocked_in_the_process() -> None:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2, signal.SIGTERM])
    try:
        p = anyfork.new_exec()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert outcome(p, "helpers:signals")["mask"] == []


_forks: list[int] = []
_counting = False


def _count_fork() -> None:
    if _counting:
        _forks.append(os.getpid())


os.register_at_fork(before=_count_fork)


def test_the_caller_never_forks() -> None:
    global _counting
    _counting = True
    try:
        assert outcome(anyfork.new_exec(), "helpers:pids")
        assert outcome(anyfork.new(), "helpers:pids")
        t = anyfork.new_exec()
        assert outcome(t.fork(), "helpers:pids")
        t.close()
        assert t.wait(5) == 0
    finally:
        _counting = False
    assert _forks == []


# --- frozen programs --------------------------------------------------------------------------


def test_freeze_support_does_nothing_in_a_normal_program() -> None:
    assert anyfork.freeze_support() is None


def test_frozen_program_reruns_itself_with_the_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    argv = _exec.command(sys.path)
    assert argv == [sys.executable, _exec.FROZEN_MARKER, str(_exec.CHILD_FD)]


def test_frozen_program_serves_through_freeze_support(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = tmp_path / "frozen-app"
    frozen.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        sys.frozen = True
        import anyfork
        anyfork.freeze_support()
        raise SystemExit("freeze_support returned in a process anyfork started")
    """))
    frozen.chmod(0o755)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(frozen))
    p = anyfork.new_exec()
    monkeypatch.undo()
    pid, _ = outcome(p, "helpers:pids")
    assert pid == p.pid
    assert p.wait(5) == 0


# --- the bootstrap where anyfork isn't installed (_stage1) ---------------------------------

_MARKED = "import sys\ndef main():\n    sys.stdout.write({!r})\n"


def _stage1_runs(code: bytes, *flags: str) -> str:
    """What ``_stage1`` runs when module ``m`` comes as ``_MARKED`` saying
    "source", with ``code`` as its compiled form; the entry is ``m:main``."""
    source = _MARKED.format("source").encode()
    preamble = b"".join([(1).to_bytes(4, "little"), (1).to_bytes(4, "little"), b"m",
                         len(source).to_bytes(8, "little"), source, len(code).to_bytes(8, "little"), code,
                         (6).to_bytes(4, "little"), b"m:main"])
    out = subprocess.run([sys.executable, *flags, "-S", "-I", "-c", _exec.stage1()], input=preamble,
                         capture_output=True, timeout=30, check=True)
    return out.stdout.decode()


def test_the_far_side_takes_the_callers_compiled_code_when_its_python_is_the_same() -> None:
    # Broke (speed): the far side compiled every module it was sent, about
    # 15 ms of each connection's start (the hub's modules) and 7 ms of an rpc
    # worker's; the caller compiles once per process instead.
    code = _exec.compiled(_MARKED.format("code").encode(), "<anyfork m>")
    assert _stage1_runs(code) == "code"
    assert _stage1_runs(b"\0\0\0\0" + code[4:]) == "source"  # another Python's magic: the source
    assert _stage1_runs(b"") == "source"
    assert _stage1_runs(code, "-O") == "source"  # compiled without -O: a far side with it compiles its own
    assert _exec.compiled(_MARKED.format("code").encode(), "<anyfork m>") is code  # once per process


def test_compiled_code_does_not_inherit_the_callers_future_flags() -> None:
    # _exec itself has `from __future__ import annotations`: compile() would
    # hand that on to the code it makes, and annotations would become strings.
    import marshal

    from importlib.util import MAGIC_NUMBER

    code = _exec.compiled(b"def f(x: int) -> None: pass\n", "<anyfork flags>")
    namespace: dict[str, object] = {}
    exec(marshal.loads(code[len(MAGIC_NUMBER):]), namespace)
    assert namespace["f"].__annotations__ == {"x": int, "return": None}  # type: ignore[attr-defined]

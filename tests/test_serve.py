"""The serve loop: what every process runs until ``run``, and how it calls
the function and exits.

Name lookup and descriptor wrapping are tested in this process; everything
else through real processes.  Tests that read a process's stderr use
``new_exec`` (or a template of the test's own), whose stdio is this test's
captured stdio; the default template's stdio is the session's.
"""

from __future__ import annotations

import array
import ast
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _exec, _serve
from anyfork import _protocol as wire
from helpers import Greeter, finish, outcome, read_all, read_exactly, result, wait_exited, wait_failed

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")


# --- name lookup (in this process) ------------------------------------------------------------


def test_resolve_module_colon_name() -> None:
    assert _serve.resolve("os.path:join", {}) is os.path.join
    assert _serve.resolve("helpers:Greeter.hello", {}) is Greeter.hello


def test_resolve_dotted_walks_modules_then_attributes() -> None:
    assert _serve.resolve("os.path.join", {}) is os.path.join
    assert _serve.resolve("helpers.Greeter.hello", {}) is Greeter.hello
    assert _serve.resolve("email.message.Message.get", {}) is __import__("email.message").message.Message.get


def test_resolve_dotted_name_makes_no_failed_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: "socket.socket.close" tried to import socket.socket.close and
    socket.socket (each a search of sys.path) before it found socket."""
    import builtins
    import email.message

    real = builtins.__import__
    tried: list[str] = []

    def recording(name: str, *args: object, **kwargs: object) -> object:
        tried.append(name)
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", recording)
    assert _serve.resolve("socket.socket.close", {}) is socket.socket.close
    assert _serve.resolve("os.path.join", {}) is os.path.join
    assert _serve.resolve("email.message.Message.get", {}) is email.message.Message.get
    assert tried == []  # all of them were loaded: nothing to import at all


def test_resolve_dotted_imports_the_submodules_it_needs_and_only_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    pkg = f"pkg_{uuid.uuid4().hex}"
    (tmp_path / pkg / "sub").mkdir(parents=True)
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "sub" / "__init__.py").write_text("")
    (tmp_path / pkg / "sub" / "mod.py").write_text("class C:\n    @staticmethod\n    def f(sock): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = builtins.__import__
    failed: list[str] = []

    def recording(name: str, *args: object, **kwargs: object) -> object:
        try:
            return real(name, *args, **kwargs)  # type: ignore[arg-type]
        except ImportError:
            failed.append(name)
            raise

    monkeypatch.setattr(builtins, "__import__", recording)
    try:
        f = _serve.resolve(f"{pkg}.sub.mod.C.f", {})
    finally:
        monkeypatch.setattr(builtins, "__import__", real)
    assert f is sys.modules[f"{pkg}.sub.mod"].C.f  # type: ignore[attr-defined]
    assert failed == []
    for mod in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[mod]


def test_resolve_dotted_missing_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _serve.resolve("os.no_such_attribute_x", {})  # os is a module, not a package
    with pytest.raises(AttributeError):
        _serve.resolve("email.no_such_name_x", {})  # a package: no such submodule either
    with pytest.raises(AttributeError):
        _serve.resolve("socket.socket.no_such_method_x", {})


def test_resolve_does_not_hide_a_broken_submodule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = f"pkg_{uuid.uuid4().hex}"
    dep = f"missingdep_{uuid.uuid4().hex}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "bad.py").write_text(f"import {dep}\ndef f(sock): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            _serve.resolve(f"{pkg}.bad.f", {})
        assert info.value.name == dep
    finally:
        for mod in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            del sys.modules[mod]


def test_resolve_bare_name_comes_from_the_namespace() -> None:
    def f() -> None:
        pass

    assert _serve.resolve("f", {"f": f}) is f


def test_resolve_main_dotted_uses_main_module() -> None:
    main = sys.modules["__main__"]
    name = f"_anyfork_test_{uuid.uuid4().hex}"
    setattr(main, name, len)
    try:
        assert _serve.resolve(f"__main__.{name}", {}) is len
    finally:
        delattr(main, name)


def test_resolve_missing_module_raises_module_not_found() -> None:
    with pytest.raises(ModuleNotFoundError):
        _serve.resolve("no_such_module_for_anyfork.f", {})


def test_resolve_does_not_hide_a_broken_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that exists but fails to import is the real error, not
    "try a shorter prefix"."""
    mod = f"brokenmod_{uuid.uuid4().hex}"
    dep = f"missingdep_{uuid.uuid4().hex}"
    (tmp_path / f"{mod}.py").write_text(f"import {dep}\ndef f(sock): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        _serve.resolve(f"{mod}.f", {})
    assert info.value.name == dep


def test_resolve_rejects_what_is_not_callable() -> None:
    with pytest.raises(TypeError, match="not callable"):
        _serve.resolve("os:sep", {})
    with pytest.raises(AttributeError):
        _serve.resolve("os:no_such_attribute", {})


# --- descriptors as the function gets them (in this process) ---------------------------------


def test_wrap_fd_socket_becomes_socket() -> None:
    a, b = socket.socketpair()
    with b:
        wrapped = _serve._wrap_fd(a.detach())
        assert isinstance(wrapped, socket.socket)
        with wrapped:
            wrapped.sendall(b"ok")
            assert b.recv(2) == b"ok"


def test_wrap_fd_pipe_ends_become_unbuffered_files_with_their_mode() -> None:
    r, w = os.pipe()
    rf, wf = _serve._wrap_fd(r), _serve._wrap_fd(w)
    with rf, wf:
        assert isinstance(rf, io.FileIO)
        assert isinstance(wf, io.FileIO)
        assert (rf.mode, wf.mode) == ("rb", "wb")
        wf.write(b"x")
        assert rf.read(1) == b"x"


@pytest.mark.parametrize(
    ("flags", "mode"),
    [(os.O_RDONLY, "rb"), (os.O_WRONLY, "wb"), (os.O_RDWR, "rb+"), (os.O_WRONLY | os.O_APPEND, "ab")],
)
def test_wrap_fd_file_keeps_its_access_mode(tmp_path: Path, flags: int, mode: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    wrapped = _serve._wrap_fd(os.open(path, flags))
    with wrapped:
        assert isinstance(wrapped, io.FileIO)
        assert wrapped.mode == mode


def test_wrap_fd_directory_stays_a_bare_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert _serve._wrap_fd(fd) == fd
    finally:
        os.close(fd)


def test_serve_imports_nothing_of_anyfork_but_protocol_and_not_typing() -> None:
    """It is what every process runs first: small, stdlib only."""
    pkg = os.path.dirname(anyfork.__file__)
    code = (
        "import sys\n"
        f"m = type(sys)('anyfork'); m.__path__ = [{pkg!r}]; sys.modules['anyfork'] = m\n"
        "import anyfork._serve\n"
        "print(sorted(n for n in sys.modules if n.startswith('anyfork')), 'typing' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    assert out.split("] ")[0] + "]" == "['anyfork', 'anyfork._protocol', 'anyfork._serve']"
    assert out.strip().endswith("False")


# --- how the function is called ---------------------------------------------------------------


def test_function_gets_its_socket_then_items_in_queue_order(make: Make) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        p = make().send_arg(b"one").send_fh(r).send_arg("two").send_fh(a, w).send_arg(b"")
        got = outcome(p, "helpers:items")
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    sock, *rest = got
    assert sock == ("socket", True, False)  # blocking, close-on-exec
    assert [x[0] for x in rest] == ["bytes", "FileIO", "str", "socket", "FileIO", "bytes"]
    assert rest[1] == ("FileIO", "rb")
    assert rest[4] == ("FileIO", "wb")
    assert rest[3][1:] == (True, False)
    assert p.wait(5) == 0


def test_bytes_after_run_reach_the_function_unchanged(make: Make) -> None:
    # Looks like a command: the serve loop must not read it as one.
    payload = b"".join(bytes(b) for b in wire.run_frame("evil")) + os.urandom(200_000)
    p = make().send_arg(b"arg")
    with p.run("helpers:echo") as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == payload
    assert p.wait(5) == 0


def test_bytes_right_behind_a_first_run_reach_the_function(forked: Make) -> None:
    """RUN as a forked process's first command is read without the decoder:
    it must still stop at the frame's end, even when the bytes behind it
    arrive in the same read."""
    payload = b"".join(bytes(b) for b in wire.run_frame("evil")) + os.urandom(100_000)
    p = forked()
    sock = p._cmd.sock
    assert sock is not None
    frame = b"".join(bytes(b) for b in wire.run_frame("helpers:echo"))
    sock.sendall(frame + payload)  # one write: the process may read them together
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == payload
    assert p.wait(5) == 0
    p.close()


@pytest.mark.parametrize(
    ("name", "status"),
    [
        (b"builtins:" + b"x" * 5000, 1),  # longer than the short path takes: the decoder's, then lookup fails
        (b"builtins:\xed\xb3\xbf", 1),  # a lone surrogate (surrogatepass): decodes, lookup fails
        (b"builtins:\xff\xfe", 2),  # not UTF-8 at all: the stream is corrupt
    ],
    ids=["long", "surrogate", "not-utf8"],
)
def test_a_first_run_that_cannot_be_run_fails_with_its_status(forked: Make, name: bytes, status: int) -> None:
    p = forked()
    corrupt(p, wire.HEADER.pack(wire.VERSION, wire.RUN, 0, len(name)) + name)
    if status == 1:
        wait_failed(p, 5)  # a name that decodes: its lookup failed
    else:
        assert p.wait(5) == status
    p.close()


def test_first_run_cut_short_by_eof_is_never_run(forked: Make) -> None:
    p = forked()
    corrupt(p, b"".join(bytes(b) for b in wire.run_frame("helpers:echo"))[:-3], eof=True)
    assert p.wait(5) == 2
    p.close()


def test_a_default_timeout_set_in_a_template_leaves_its_childrens_sockets_blocking() -> None:
    with anyfork.new_exec().eval("import socket; socket.setdefaulttimeout(3.5)") as tpl:
        assert outcome(tpl.fork(), "helpers:timeout_of") is None
        assert outcome(tpl.fork().fork(), "helpers:timeout_of") is None  # a child that became a template
        tpl.close()
        assert tpl.wait(5) == 0


def test_a_forked_child_that_becomes_a_template_gives_each_child_its_own_socket(make: Make) -> None:
    """The template re-initialises one socket object for each child it forks;
    a child that forks in turn must not hand its own command socket on."""
    parent = make().require("helpers")
    children = [parent.fork() for _ in range(3)]
    for child in children:
        with child.run("helpers:echo") as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b"ping"
        assert child.wait(5) == 0
    parent.close()
    assert parent.wait(5) == 0


def test_function_returning_exits_0_even_with_a_non_daemon_thread(make: Make) -> None:
    """Exit is os._exit: no interpreter shutdown waiting on threads."""
    p = make().eval(
        "import threading\n"
        "def start_thread_and_return(sock):\n"
        "    threading.Thread(target=threading.Event().wait).start()\n"
    )
    assert finish(p, "start_thread_and_return") == 0


# --- exit statuses and error reports ----------------------------------------------------------


def test_error_in_function_prints_traceback_and_exits_1(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec()
    assert finish(p, "helpers:fail") == 1
    err = capfd.readouterr().err
    assert "Traceback" in err
    assert "failure raised by helpers.fail" in err


def test_error_in_eval_prints_traceback_and_exits_1(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec().eval("raise ValueError('eval failed on purpose')")
    p.run("helpers:pids").close()
    assert wait_failed(p).type_name == "ValueError"
    err = capfd.readouterr().err
    assert "Traceback" in err
    assert "eval failed on purpose" in err


def test_error_in_require_exits_1(make: Make) -> None:
    p = make().require("no_such_module_for_anyfork_tests")
    p.run("helpers:pids").close()
    assert wait_failed(p).type_name == "ModuleNotFoundError"


@pytest.mark.parametrize("name", ["helpers:no_such_function", "no_such_bare_name", "no_such_mod_x.f"])
def test_failed_name_lookup_exits_1(make: Make, name: str) -> None:
    p = make()
    p.run(name).close()
    wait_failed(p)


def test_sys_exit_code_is_the_exit_status(make: Make) -> None:
    assert finish(make().send_arg("3"), "helpers:exit_with") == 3


def test_sys_exit_in_eval_is_the_exit_status(make: Make) -> None:
    assert finish(make().eval("import sys; sys.exit(4)"), "helpers:pids") == 4


def test_sys_exit_with_message_prints_it_and_exits_1(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec().eval("def bye(sock):\n    raise SystemExit('goodbye message')\n")
    assert finish(p, "bye") == 1
    assert "goodbye message" in capfd.readouterr().err


def test_keyboard_interrupt_out_of_the_function_dies_of_sigint(make: Make) -> None:
    assert finish(make(), "helpers:interrupt") == -signal.SIGINT


def test_error_drains_queued_commands_so_the_caller_reads_eof_not_reset(make: Make) -> None:
    p = make().eval("raise ValueError('eval failed on purpose')").send_arg(b"x" * 100_000)
    with p.run("helpers:items") as sock:
        assert read_all(sock) == b""  # not ConnectionResetError
    wait_failed(p, 5)


def test_stdout_is_the_callers_and_flushed_at_exit(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # so that the exit path must flush
    p = anyfork.new_exec().send_arg("unflushed text from the child")
    assert finish(p, "helpers:print_and_return") == 0
    assert capfd.readouterr().out == "unflushed text from the child"


@pytest.mark.parametrize("how", ["eval", "require"])
def test_output_a_template_buffered_is_written_once_not_by_each_child(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    """A template flushes stdio before forking once code of the user's ran in it."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # block-buffered: the flush matters
    name = f"writes_at_import_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import sys\nsys.stdout.write('from the template')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tpl = anyfork.new_exec()
    tpl = tpl.eval(f"import {name}") if how == "eval" else tpl.require(name)
    for _ in range(3):
        assert finish(tpl.fork(), "builtins:id") == 0
    tpl.close()
    assert tpl.wait(5) == 0
    assert capfd.readouterr().out.count("from the template") == 1


# --- malformed command streams ----------------------------------------------------------------


def corrupt(p: anyfork.Process, data: bytes, fds: list[int] | None = None, eof: bool = False) -> None:
    """Write raw bytes on the command socket, past anyfork's own framing."""
    sock = p._cmd.sock
    assert sock is not None
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.sendall(data)
    if eof:
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        bytes([9]) + bytes(11),  # wrong version
        bytes([wire.VERSION, 250]) + bytes(10),  # unknown command
    ],
    ids=["text", "version", "kind"],
)
def test_garbage_says_stream_corrupted_and_exits_2(
    garbage: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    p = anyfork.new_exec()
    corrupt(p, garbage)
    assert p.wait(5) == 2
    assert "stream corrupted" in capfd.readouterr().err
    p.close()


def test_garbage_from_a_forked_process_exits_2(make: Make) -> None:
    p = make()
    corrupt(p, b"\xff" * 64)
    assert p.wait(5) == 2
    p.close()


def test_truncated_command_is_never_executed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').close()"
    frame = b"".join(bytes(b) for b in wire.items_frame(wire.EVAL, [code]))
    p = anyfork.new_exec()
    corrupt(p, frame[:-1], eof=True)
    assert p.wait(5) == 2
    # The caller stopped part-way (a cancelled run_async): on purpose, so the
    # process says nothing about it (issue 14); it used to say "stream corrupted".
    assert capfd.readouterr().err == ""
    assert not marker.exists()
    p.close()


def test_descriptors_on_a_command_that_takes_none_exit_2(capfd: pytest.CaptureFixture[str]) -> None:
    r, w = os.pipe()
    try:
        p = anyfork.new_exec()
        corrupt(p, b"".join(bytes(b) for b in wire.items_frame(wire.ARG, [b"x"])), fds=[r])
    finally:
        os.close(r)
        os.close(w)
    assert p.wait(5) == 2
    assert "stream corrupted" in capfd.readouterr().err
    p.close()


# --- the process's environment ----------------------------------------------------------------


def test_signal_dispositions_are_a_fresh_interpreters(make: Make) -> None:
    got = outcome(make(), "helpers:signals")
    assert got["SIGINT"] == "default_int_handler"
    assert got["interrupted"] is True  # SIGINT raises KeyboardInterrupt
    assert got["SIGCHLD"] == "SIG_DFL"
    assert got["SIGPIPE"] == "SIG_IGN"
    assert got["mask"] == []
    assert got["wakeup_fd"] == -1


def test_a_template_that_is_run_has_fresh_signal_dispositions() -> None:
    """A template reaps with a SIGCHLD handler and a wakeup fd: run() must
    undo both, so subprocess works in the function."""
    t = anyfork.new_exec()
    child = t.fork()
    got = outcome(t, "helpers:signals")
    child.close()
    assert got["SIGCHLD"] == "SIG_DFL"
    assert got["wakeup_fd"] == -1
    assert got["SIGINT"] == "default_int_handler"
    assert t.wait(5) == 0


def test_subprocess_works_in_the_function(make: Make) -> None:
    p = make().eval(
        "import subprocess, sys\n"
        "def run_child(sock):\n"
        "    sock.sendall(repr(subprocess.run([sys.executable, '-S', '-c', 'raise SystemExit(7)'])"
        ".returncode).encode())\n"
    )
    assert outcome(p, "run_child") == 7


def test_no_descriptor_leaks_into_the_function(make: Make) -> None:
    r, w = os.pipe()
    try:
        p = make().send_fh(w)
        got = outcome(p, "helpers:fds")
    finally:
        os.close(r)
        os.close(w)
    assert sorted(got["open"]) == got["given"], got["open"]


def test_no_template_descriptor_leaks_into_a_forked_function() -> None:
    """A template holds a report channel, a wakeup pipe and spares' sockets."""
    t = anyfork.new_exec()
    first = t.fork()
    assert outcome(first, "helpers:pids")
    second = t.fork()
    got = outcome(second, "helpers:fds")
    assert sorted(got["open"]) == got["given"], got["open"]
    t.close()
    assert t.wait(5) == 0


def test_no_inheritable_descriptor_of_the_caller_leaks_into_a_new_exec_process() -> None:
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    try:
        got = outcome(anyfork.new_exec(), "helpers:fds")
    finally:
        os.close(r)
        os.close(w)
    assert sorted(got["open"]) == got["given"], got["open"]


ATEXIT = "import atexit\ndef _touch(path):\n    open(path, 'w').close()\natexit.register(_touch, args[0])\n"


def test_atexit_runs_own_handlers_not_inherited_ones(tmp_path: Path) -> None:
    inherited, own = tmp_path / "inherited", tmp_path / "own"
    t = anyfork.new_exec().eval(ATEXIT, str(inherited))
    p = t.fork().eval(ATEXIT, str(own))
    assert finish(p, "helpers:wait_eof") == 0
    assert own.exists()
    assert not inherited.exists()
    t.close()
    assert t.wait(5) == 0


def test_atexit_runs_after_an_error_in_the_function(tmp_path: Path) -> None:
    own = tmp_path / "own"
    p = anyfork.new().eval(ATEXIT, str(own))
    assert finish(p, "helpers:fail") == 1
    assert own.exists()


def test_eof_before_run_exits_without_running_anything(make: Make, tmp_path: Path) -> None:
    p = make().eval(ATEXIT, str(tmp_path / "atexit"))
    p.close()
    assert p.wait(5) == 0


# --- templates --------------------------------------------------------------------------------


def test_template_ignores_sigint() -> None:
    t = anyfork.new_exec()
    assert outcome(t.fork(), "helpers:pids")  # serving, SIGINT ignored by now
    t.kill(signal.SIGINT)
    assert outcome(t.fork(), "helpers:pids")  # still serving
    assert t.returncode is None
    t.close()
    assert t.wait(5) == 0


def test_a_closed_template_exits_once_its_running_children_have() -> None:
    # Issue 14: it used to exit at once, and its children could no longer be
    # signalled or waited for.
    t = anyfork.new_exec()
    child = t.fork()
    sock = child.run("helpers:wait_eof")
    t.close()
    with pytest.raises(anyfork.TimeoutExpired):
        t.wait(0.2)
    sock.close()
    assert t.wait(5) == 0
    assert child.returncode == 0


def test_a_template_that_is_run_hands_its_children_to_the_function() -> None:
    t = anyfork.new_exec().eval(
        "import os, sys\n"
        "def exit_7_at_eof(sock):\n"
        "    while sock.recv(1):\n"
        "        pass\n"
        "    sys.exit(7)\n"
        "def reap_one(sock):\n"
        "    sock.sendall(b'ready')\n"
        "    pid, status = os.waitpid(-1, 0)\n"
        "    sock.sendall(repr((pid, os.waitstatus_to_exitcode(status))).encode())\n"
    )
    child = t.fork()
    child_sock = child.run("exit_7_at_eof")
    with t.run("reap_one") as sock:
        sock.settimeout(5)
        assert sock.recv(5) == b"ready"  # the template is in the function now
        child_sock.close()  # so the child exits, and the function reaps it
        assert result(sock) == (child.pid, 7)
    with pytest.raises(anyfork.ProcessStateError):
        child.wait(5)
    with pytest.raises(anyfork.ProcessStateError):
        child.kill()
    assert t.wait(5) == 0


def test_every_lookup_a_template_makes_for_its_children_exists() -> None:
    """The template makes its children's attribute lookups ahead (getattr
    with a default, so a misspelt or renamed one would pass silently)."""
    for obj, names in _serve._CHILD_LOOKUPS:
        for name in names:
            assert hasattr(obj, name), (obj, name)


# --- over a pipe pair, loaded from source -----------------------------------------------------


def _frames(*frames: list[wire.Buffer]) -> bytes:
    return b"".join(bytes(b) for f in frames for b in f)


def start_over_pipes(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A serve loop the way a remote host would get one: ``python -S -I``, no
    environment, cwd elsewhere, so no anyfork anywhere on its path; the
    loop's modules arrive on stdin."""
    program, preamble = _exec.pipe_bootstrap()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    err = open(tmp_path / "stderr", "wb")  # closed by the caller through proc
    proc = subprocess.Popen(["env", "-i", sys.executable, "-S", "-I", "-c", program], cwd=cwd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    err.close()
    assert proc.stdin is not None
    proc.stdin.write(preamble)
    return proc


def finish_over_pipes(proc: subprocess.Popen[bytes], tmp_path: Path) -> tuple[bytes, int, str]:
    """Close stdin; what came on stdout, the status and stderr."""
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return out, proc.returncode, (tmp_path / "stderr").read_text()


PIPE_FUNCTION = '''
import os, sys
def talk(sock, *args):
    line = b""
    while not line.endswith(b"\\n"):
        line += sock.recv(100)
    import helper_for_pipes
    print("printed by the function")  # stdout is stderr here: never in the stream
    facts = {
        "args": args, "line": line, "loaded": helper_for_pipes.LOADED, "path": sys.path[:1],
        "anyfork": sorted(n for n in sys.modules if "anyfork" in n),
        "no_site": sys.flags.no_site, "sock": type(sock).__name__,
    }
    sock.sendall(repr(facts).encode())
    sock.shutdown(1)
    while sock.recv(100):
        pass
'''


def test_the_serve_loop_runs_over_a_pipe_pair_from_source_with_no_anyfork_on_its_path(tmp_path: Path) -> None:
    """Issue 9: the loop and the protocol load from source strings and serve
    a stream with no descriptor passing; the function talks over the pipes."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helper_for_pipes.py").write_text("LOADED = 'yes'\n")
    proc = start_over_pipes(tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(_frames(
        wire.items_frame(wire.PATH, [str(lib)]),
        wire.items_frame(wire.REQUIRE, ["helper_for_pipes"]),
        wire.items_frame(wire.EVAL, [PIPE_FUNCTION]),
        wire.items_frame(wire.ARG, ["text", b"\x00bytes"]),
        wire.run_frame("talk"),
    ) + b"a line for the function\n")
    proc.stdin.flush()
    out = proc.stdout.read1(1 << 16)  # the function answers before our end closes
    while not out.endswith(b"}"):
        more = proc.stdout.read1(1 << 16)
        assert more, out
        out += more
    facts = ast.literal_eval(out.decode())
    _, status, err = finish_over_pipes(proc, tmp_path)
    assert status == 0, err
    assert facts == {
        "args": ("text", b"\x00bytes"), "line": b"a line for the function\n", "loaded": "yes",
        "path": [str(lib)],
        "anyfork": ["_anyfork_remote", "_anyfork_remote._protocol", "_anyfork_remote._serve"],
        "no_site": 1, "sock": "PipeSocket",
    }
    assert "printed by the function" in err


def test_anyfork_is_not_importable_where_the_pipe_loop_runs(tmp_path: Path) -> None:
    """The check the test above relies on: the loop did not come from disk."""
    proc = start_over_pipes(tmp_path)
    assert proc.stdin is not None
    proc.stdin.write(_frames(
        wire.items_frame(wire.EVAL, [
            "import importlib.util, sys\n"
            "def where(sock):\n"
            "    sock.sendall(repr(importlib.util.find_spec('anyfork')).encode())\n"]),
        wire.run_frame("where"),
    ))
    out, status, err = finish_over_pipes(proc, tmp_path)
    assert (out, status) == (b"None", 0), err


@pytest.mark.parametrize(
    "command",
    [_frames(wire.fork_frame(1, True)), _frames(wire.spawn_frame(1, False)), _frames(wire.fh_frame(1))],
    ids=["FORK", "SPAWN", "FH"],
)
def test_a_pipe_loop_refuses_commands_that_carry_descriptors(tmp_path: Path, command: bytes) -> None:
    """No descriptor can cross a pipe: the header alone is refused, with a
    clear message and status 2, and nothing queued behind it runs."""
    marker = tmp_path / "ran"
    proc = start_over_pipes(tmp_path)
    assert proc.stdin is not None
    proc.stdin.write(command + _frames(wire.items_frame(wire.EVAL, [f"open({str(marker)!r}, 'w').close()"])))
    out, status, err = finish_over_pipes(proc, tmp_path)
    name = wire.NAMES[command[1]]
    assert (out, status) == (b"", 2)
    assert f"anyfork: command refused: {name} carries descriptors, which a pipe pair can't" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_a_pipe_loop_reports_garbage_as_a_corrupted_stream(tmp_path: Path) -> None:
    proc = start_over_pipes(tmp_path)
    assert proc.stdin is not None
    proc.stdin.write(b"\xff" * 40)
    out, status, err = finish_over_pipes(proc, tmp_path)
    assert (out, status) == (b"", 2)
    assert "anyfork: stream corrupted" in err


# --- regressions the reviews found in the serve loop (moved from test_regressions.py) ---------------


def _blocking_facts(sock: socket.socket) -> tuple[object, bool]:
    return sock.gettimeout(), os.get_blocking(sock.fileno())


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


# --- the reaper against code eval'd in a template (issue 15, item 1) ------------------------

# Each used to make every later wait() on the template's children hang for ever.
_UNARMING = {
    "SIGCHLD ignored": "import signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)",
    "SIGCHLD blocked": "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})",
    "asyncio.run with a signal handler": (
        "import asyncio, signal\n"
        "async def main():\n"
        "    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)\n"
        "asyncio.run(main())"),
}


@pytest.mark.parametrize("code", list(_UNARMING.values()), ids=list(_UNARMING))
def test_code_eval_d_in_a_template_cannot_stop_its_reaper(code: str) -> None:
    tpl = anyfork.new_exec()
    try:
        first = tpl.fork()
        first.send_arg("0").run("helpers:exit_with").close()
        assert first.wait(10) == 0
        tpl.eval(code)
        later = [tpl.fork() for _ in range(3)]
        for c in later:
            c.send_arg("0").run("helpers:exit_with").close()
        for c in later:
            try:
                assert c.wait(10) == 0  # bounded: it used to hang here
            except anyfork.ExitStatusLostError:
                pass  # the kernel reaped it while SIGCHLD was ignored: said, not hung
        again = tpl.fork()  # and the reaper works for good from here on
        again.send_arg("7").run("helpers:exit_with").close()
        assert again.wait(10) == 7
        del first, later, again  # (a closed template's children keep its channel)
    finally:
        tpl.close()
        tpl.wait(10)


# --- what a failing process says (issue 14: readable worker output) -------------------------


def test_a_failing_function_says_who_failed_without_anyforks_frames(
        capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec()
    p.run("helpers:fail").close()
    assert p.wait(10) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"anyfork worker {p.pid} (helpers:fail):\nTraceback"), err
    assert "helpers.py" in err
    assert "_serve.py" not in err
    assert err.rstrip().endswith("RuntimeError: failure raised by helpers.fail")


def test_a_name_that_is_not_there_is_one_line_not_a_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec()
    p.run("helpers:no_such_function").close()
    wait_failed(p, 10)
    err = capfd.readouterr().err
    assert err == (f"anyfork worker {p.pid} (can't find 'helpers:no_such_function' to run):\n"
                   "AttributeError: module 'helpers' has no attribute 'no_such_function'\n"), err


def test_a_module_that_fails_to_import_keeps_its_own_traceback(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_mod_x.py").write_text("import os\nraise ValueError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = anyfork.new_exec()
    p.run("broken_mod_x:f").close()
    wait_failed(p, 10)
    err = capfd.readouterr().err
    assert "broken_mod_x.py" in err  # the user's frame, where to look
    assert "ValueError: broken at import" in err


def test_a_sys_excepthook_set_in_the_process_is_respected(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec()
    p.eval("import sys\nsys.excepthook = lambda t, e, tb: sys.stderr.write(f'HOOKED {t.__name__}\\n')")
    p.run("helpers:fail").close()
    assert p.wait(10) == 1
    assert capfd.readouterr().err == "HOOKED RuntimeError\n"


def test_tracebacks_of_many_processes_do_not_interleave(capfd: pytest.CaptureFixture[str]) -> None:
    tpl = anyfork.new_exec()
    try:
        children = [tpl.fork() for _ in range(24)]
        socks = [c.run("helpers:fail") for c in children]
        for s in socks:
            s.close()
        for c in children:
            assert c.wait(10) == 1
        err = capfd.readouterr().err
        blocks = err.split("anyfork worker ")[1:]
        assert len(blocks) == len(children)
        for block in blocks:
            # Each block whole: its header, one traceback, and its last line.
            assert block.count("Traceback") == 1, block
            assert block.rstrip().endswith("RuntimeError: failure raised by helpers.fail"), block
        del children, socks
    finally:
        tpl.close()
        tpl.wait(10)


def test_a_bare_name_is_never_silently_a_builtin(capfd: pytest.CaptureFixture[str]) -> None:
    p = anyfork.new_exec()
    p.run("print").close()  # it used to run builtins.print(sock)
    wait_failed(p, 10)
    err = capfd.readouterr().err
    assert "name 'print' is not defined in the process's __main__; a builtin is named 'builtins:print'" in err


# --- process names (issue 14) ---------------------------------------------------------------


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.mark.skipif(not os.path.exists("/proc/self/comm"), reason="names processes through Linux's /proc")
def test_templates_and_workers_are_named_for_what_they_are() -> None:
    tpl = anyfork.new_exec()
    try:
        child = tpl.fork()
        with child.run("helpers:wait_eof") as sock:
            assert _comm(tpl.pid) == "af template"
            deadline = time.monotonic() + 10
            while _comm(child.pid) != "af wait_eof" and time.monotonic() < deadline:
                time.sleep(0.01)  # it names itself as it starts the function
            assert _comm(child.pid) == "af wait_eof"
            sock.shutdown(socket.SHUT_WR)
            assert child.wait(10) == 0
        del child
    finally:
        tpl.close()
        tpl.wait(10)

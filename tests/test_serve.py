"""The serve loop: what every process runs until ``run``, and how it calls
the function and exits.

Name lookup and descriptor wrapping are tested in this process; everything
else through real processes.  Tests that read a process's stderr use
``new_exec`` (or a template of the test's own), whose stdio is this test's
captured stdio; the default template's stdio is the session's.
"""

from __future__ import annotations

import array
import io
import os
import signal
import socket
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _protocol as wire
from anyfork import _serve
from helpers import Greeter, finish, outcome, read_all, result, wait_exited

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")


# --- name lookup (in this process) ------------------------------------------------------------


def test_resolve_module_colon_name() -> None:
    assert _serve.resolve("os.path:join", {}) is os.path.join
    assert _serve.resolve("helpers:Greeter.hello", {}) is Greeter.hello


def test_resolve_dotted_takes_the_longest_importable_module_prefix() -> None:
    assert _serve.resolve("os.path.join", {}) is os.path.join
    assert _serve.resolve("helpers.Greeter.hello", {}) is Greeter.hello
    assert _serve.resolve("email.message.Message.get", {}) is __import__("email.message").message.Message.get


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
    assert finish(p, "helpers:pids") == 1
    err = capfd.readouterr().err
    assert "Traceback" in err
    assert "eval failed on purpose" in err


def test_error_in_require_exits_1(make: Make) -> None:
    p = make().require("no_such_module_for_anyfork_tests")
    assert finish(p, "helpers:pids") == 1


@pytest.mark.parametrize("name", ["helpers:no_such_function", "no_such_bare_name", "no_such_mod_x.f"])
def test_failed_name_lookup_exits_1(make: Make, name: str) -> None:
    assert finish(make(), name) == 1


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
    assert p.wait(5) == 1


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
    assert "stream corrupted" in capfd.readouterr().err
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


def test_template_exits_when_its_owner_closes_it_even_with_children_running() -> None:
    t = anyfork.new_exec()
    child = t.fork()
    sock = child.run("helpers:wait_eof")
    t.close()
    assert t.wait(5) == 0
    child_pid = child.pid
    sock.close()
    assert wait_exited(child_pid)


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

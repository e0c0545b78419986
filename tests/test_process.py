"""The caller's side: preparing a process, running it, its status, and the
default template.  Most tests run under each way of getting a process
(``make``: new, new_exec, fork of a template of the test's own)."""

from __future__ import annotations

import asyncio  # noqa: F401
import functools
import gc
import json
import os
import select
import signal
import socket
import struct  # noqa: F401
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import anyfork
import helpers
from anyfork import _process, _runtime
from anyfork import _protocol as wire  # noqa: F401
from anyfork._backend import deadline_after, run_blocking  # noqa: F401
from anyfork._caller import TemplateState  # noqa: F401
from anyfork._reports import ReportChannel  # noqa: F401
from helpers import (
    Greeter,
    digest,
    finish,
    outcome,
    read_all,
    read_exactly,
    run_program,
    wait_exited,
    zombie_children,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh package on sys.path (added after the default template started):
    <pkg>/__init__.py, <pkg>/mod.py with ``name`` and ``Class.method``."""
    name = unique("anyfork_pkg")
    d = tmp_path / name
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "mod.py").write_text(
        "def name(sock, *args):\n"
        "    sock.sendall(repr(('mod.name', len(args))).encode())\n"
        "class Class:\n"
        "    @staticmethod\n"
        "    def method(sock, *args):\n"
        "        sock.sendall(repr(('mod.Class.method', len(args))).encode())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# --- require ----------------------------------------------------------------------------------


def test_require_imports_modules_in_order(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = unique("first"), unique("second")
    for name in (first, second):
        (tmp_path / f"{name}.py").write_text(
            f"import sys\nsys.anyfork_order = getattr(sys, 'anyfork_order', []) + [{name!r}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = make().require(second, first).eval(
        "import sys\n"
        "def order(sock):\n"
        "    sock.sendall(repr(sys.anyfork_order).encode())\n")
    assert outcome(p, "order") == [second, first]


def test_require_rejects_bad_names_and_queues_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = unique("never_imported")
    (tmp_path / f"{mod}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = anyfork.new()
    with pytest.raises(TypeError):
        p.require(mod, 5)  # type: ignore[arg-type]
    for bad in ("", "not a name", "a..b", "1abc", "a.", "os:path"):
        with pytest.raises(ValueError):
            p.require(mod, bad)
    p.send_arg(mod)
    assert outcome(p, "helpers:imported") == {mod: False}


# --- eval -------------------------------------------------------------------------------------


def test_eval_defines_functions_run_finds_by_bare_name(make: Make) -> None:
    p = make().eval("def hello(sock):\n    sock.sendall(b'hello from eval')\n")
    with p.run("hello") as sock:
        assert read_all(sock) == b"hello from eval"


def test_eval_binds_args_to_the_tuple_of_its_args(make: Make) -> None:
    p = make().eval("seen = args", b"octets", "text \udcff")
    assert outcome(p.send_arg("seen"), "helpers:main_names") == {"seen": repr((b"octets", "text \udcff"))}


def test_eval_runs_in_the_processes_main_namespace(make: Make) -> None:
    p = make().eval("import __main__\nsame = __main__.__dict__ is globals()\nx = 41").eval("x += 1")
    assert outcome(p.send_arg("same", "x"), "helpers:main_names") == {"same": "True", "x": "42"}


def test_eval_rejects_bad_input_at_the_call_and_queues_nothing() -> None:
    p = anyfork.new()
    with pytest.raises(TypeError):
        p.eval(b"queued = 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        p.eval("queued = 1", 5)  # type: ignore[arg-type]
    with pytest.raises(SyntaxError):
        p.eval("queued = ")
    assert outcome(p.send_arg("queued"), "helpers:main_names") == {"queued": None}


# --- send_arg ---------------------------------------------------------------------------------

ARGS = [
    b"octets",
    bytearray(b"bytearray"),
    memoryview(b"memoryview"),
    "text",
    "lone surrogates \udcff \ud800",
    b"",
    "",
    b"a" * (64 * 1024 - 1),
    b"b" * (64 * 1024),
    b"c" * (64 * 1024 + 1),
    os.urandom(3 * MiB),
]


def test_send_arg_values_arrive_unchanged_with_their_type(make: Make) -> None:
    p = make()
    for arg in ARGS:
        p.send_arg(arg)
    expected = [digest(bytes(a) if not isinstance(a, str) else a) for a in ARGS]
    assert outcome(p, "helpers:items")[1:] == expected


def test_send_arg_takes_several_args_at_once(make: Make) -> None:
    p = make().send_arg(b"1", "2").send_arg().send_arg(b"3")
    assert outcome(p, "helpers:items")[1:] == [digest(b"1"), digest("2"), digest(b"3")]


def test_send_arg_snapshots_mutable_buffers() -> None:
    buf = bytearray(b"before")
    p = anyfork.new().send_arg(buf, memoryview(buf))
    buf[:] = b"AFTER!"
    assert outcome(p, "helpers:items")[1:] == [digest(b"before"), digest(b"before")]


@pytest.mark.parametrize("bad", [5, None, ["x"], 1.5, object()])
def test_send_arg_rejects_other_types_and_queues_nothing(bad: object) -> None:
    p = anyfork.new()
    with pytest.raises(TypeError):
        p.send_arg(b"good", bad)  # type: ignore[arg-type]
    assert outcome(p, "helpers:items")[1:] == []


# --- send_fh ----------------------------------------------------------------------------------


def read_until_eof(fd: int, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError("no EOF: someone still holds the write end")
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_send_fh_socket_arrives_as_a_socket_and_the_caller_may_close_its_own(make: Make) -> None:
    mine, theirs = socket.socketpair()
    with mine:
        p = make().send_fh(theirs)
        theirs.close()
        p.send_arg(b"through the passed socket")
        assert outcome(p, "helpers:write_to") == "written"
        mine.settimeout(5)
        assert mine.recv(100) == b"through the passed socket"
        assert mine.recv(100) == b""  # no copy left anywhere but in the exited process


def test_send_fh_pipe_arrives_as_unbuffered_file_and_caller_may_close_its_own(make: Make) -> None:
    r, w = os.pipe()
    try:
        p = make().send_fh(w)
        os.close(w)
        p.send_arg(b"through the pipe")
        assert outcome(p, "helpers:write_to") == "written"  # FileIO: unbuffered, so written at once
        assert read_until_eof(r) == b"through the pipe"
    finally:
        os.close(r)


def test_send_fh_file_objects_arrive_with_their_access_mode(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    with open(path, "rb") as rb, open(path, "ab") as ab, open(path, "r+b") as rw, open(path, "wb") as wb:
        p = make().send_fh(rb, ab, rw, wb)
    got = outcome(p, "helpers:items")[1:]
    assert got == [("FileIO", "rb"), ("FileIO", "ab"), ("FileIO", "rb+"), ("FileIO", "wb")]


def test_send_fh_takes_int_descriptors(make: Make) -> None:
    r, w = os.pipe()
    try:
        p = make().send_fh(r, w)
    finally:
        os.close(r)
        os.close(w)
    assert outcome(p, "helpers:items")[1:] == [("FileIO", "rb"), ("FileIO", "wb")]


def test_send_fh_more_descriptors_than_one_message_carries(make: Make) -> None:
    r, w = os.pipe()
    try:
        p = make().send_fh(*([w] * 300))
    finally:
        os.close(r)
        os.close(w)
    got = outcome(p, "helpers:items")[1:]
    assert got == [("FileIO", "wb")] * 300


def test_send_fh_rejects_bad_handles_and_queues_nothing(tmp_path: Path) -> None:
    r, w = os.pipe()
    closed = open(tmp_path / "f", "wb")
    closed.close()
    p = anyfork.new()
    try:
        with pytest.raises(TypeError):
            p.send_fh(w, "not a handle")
        with pytest.raises(TypeError):
            p.send_fh(w, True)
        with pytest.raises(ValueError):
            p.send_fh(w, closed)
        with pytest.raises(ValueError):
            p.send_fh(w, -1)
        # Not open, and not a descriptor number at all: ValueError at the call
        # (it was a bare OSError, and OverflowError, before).
        with pytest.raises(ValueError, match="not an open descriptor"):
            p.send_fh(w, 1_000_000)
        with pytest.raises(ValueError, match="not a descriptor number"):
            p.send_fh(w, 2**31)
    finally:
        os.close(w)
    try:
        assert outcome(p, "helpers:items")[1:] == []
        assert read_until_eof(r) == b""  # no stray copy of w anywhere
    finally:
        os.close(r)


# --- fork -------------------------------------------------------------------------------------


REPORT = (
    "import helpers\n"
    "def report(sock, *items):\n"
    "    helpers.reply(sock, (x, globals().get('y'), [helpers.describe(i) for i in items]))\n"
)


def test_fork_clone_has_what_was_queued_before_and_not_after(make: Make) -> None:
    r, w = os.pipe()
    try:
        template = make().eval(REPORT).eval("x = 'before'").send_arg(b"before").send_fh(w)
        clone = template.fork()
        template.eval("x = 'template after'").send_arg(b"template after")
        clone.eval("y = 'clone after'").send_arg(b"clone after")
        from_clone = outcome(clone, "report")
        from_template = outcome(template, "report")
    finally:
        os.close(r)
        os.close(w)
    inherited = [digest(b"before"), ("FileIO", "wb")]
    assert from_clone == ("before", "clone after", [*inherited, digest(b"clone after")])
    assert from_template == ("template after", None, [*inherited, digest(b"template after")])


def test_fork_of_a_fork_and_siblings_are_independent(make: Make) -> None:
    t = make().send_arg(b"t")
    a = t.fork().send_arg(b"a")
    b = t.fork().send_arg(b"b")
    aa = a.fork().send_arg(b"aa")
    got = {name: outcome(p, "helpers:items")[1:] for name, p in (("aa", aa), ("a", a), ("b", b))}
    t.close()
    assert got == {
        "aa": [digest(b"t"), digest(b"a"), digest(b"aa")],
        "a": [digest(b"t"), digest(b"a")],
        "b": [digest(b"t"), digest(b"b")],
    }
    pids = {aa.pid, a.pid, b.pid}
    assert len(pids) == 3


# --- run --------------------------------------------------------------------------------------


def test_run_names_module_colon_attribute(make: Make) -> None:
    assert outcome(make(), "helpers:Greeter.hello") == ("Greeter.hello", 0)


def test_run_names_dotted_module_function(make: Make, pkg: str) -> None:
    assert outcome(make().send_arg(b"x"), f"{pkg}.mod.name") == ("mod.name", 1)


def test_run_names_module_colon_function_in_a_package(make: Make, pkg: str) -> None:
    assert outcome(make(), f"{pkg}.mod:name") == ("mod.name", 0)


def test_run_names_dotted_class_method(make: Make, pkg: str) -> None:
    assert outcome(make(), f"{pkg}.mod.Class.method") == ("mod.Class.method", 0)


def test_run_takes_a_module_level_function_object(make: Make) -> None:
    pid, _ = outcome(make(), helpers.pids)
    assert pid > 0
    assert outcome(make(), Greeter.hello) == ("Greeter.hello", 0)


def _local_closure() -> Callable[..., None]:
    value = 1

    def inner(sock: socket.socket) -> None:
        sock.sendall(bytes(value))

    return inner


@pytest.mark.parametrize(
    "func",
    [lambda sock: None, _local_closure(), functools.partial(helpers.pids), 42, None],
    ids=["lambda", "closure", "partial", "int", "None"],
)
def test_run_rejects_unnamable_callables_with_type_error_and_queues_nothing(func: object) -> None:
    p = anyfork.new()
    with pytest.raises(TypeError):
        p.run(func)  # type: ignore[arg-type]
    assert outcome(p, "helpers:pids")  # still usable: nothing was queued or spent


@pytest.mark.parametrize(
    "name", ["", " ", "a b", "mod:", ":name", "a..b", "1abc", "mod:na-me", "a:b:c", "mod.", "-x", "a/b"]
)
def test_run_rejects_bad_names_with_value_error_and_queues_nothing(name: str) -> None:
    p = anyfork.new()
    with pytest.raises(ValueError):
        p.run(name)
    assert outcome(p, "helpers:pids")


def test_run_returns_a_blocking_close_on_exec_socket(make: Make) -> None:
    p = make()
    with p.run("helpers:wait_eof") as sock:
        assert isinstance(sock, socket.socket)
        assert sock.getblocking()
        assert not os.get_inheritable(sock.fileno())
        assert sock.family == socket.AF_UNIX
    assert p.wait(5) == 0


# --- pid --------------------------------------------------------------------------------------


def test_pid_is_the_processes_pid_before_and_after_run(make: Make) -> None:
    p = make()
    early = p.pid
    pid, _ = outcome(p, "helpers:pids")
    assert early == pid == p.pid


def test_new_processes_come_from_one_kept_template() -> None:
    (pid1, parent1), (pid2, parent2) = (outcome(anyfork.new(), "helpers:pids") for _ in range(2))
    assert pid1 != pid2
    assert parent1 == parent2 != os.getpid()


def test_new_exec_processes_are_our_children() -> None:
    p = anyfork.new_exec()
    assert outcome(p, "helpers:pids") == (p.pid, os.getpid())


# --- wait, returncode, kill -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("func", "arg", "status"),
    [
        ("helpers:wait_eof", None, 0),
        ("helpers:exit_with", "3", 3),
        ("helpers:hard_exit", "5", 5),
        ("helpers:fail", None, 1),
    ],
)
def test_wait_returns_the_exit_status(make: Make, func: str, arg: str | None, status: int) -> None:
    p = make()
    if arg is not None:
        p.send_arg(arg)
    assert finish(p, func) == status
    assert p.returncode == status
    assert p.wait() == status


def test_sigkill_gives_minus_9(make: Make) -> None:
    p = make()
    with p.run("helpers:wait_eof"):
        p.kill(signal.SIGKILL)
        assert p.wait(5) == -signal.SIGKILL


def test_kill_defaults_to_sigterm(make: Make) -> None:
    p = make()
    with p.run("helpers:wait_eof"):
        p.kill()
        assert p.wait(5) == -signal.SIGTERM


def test_kill_a_process_still_being_prepared(make: Make) -> None:
    p = make().send_arg(b"queued")
    p.kill(signal.SIGKILL)
    assert p.wait(5) == -signal.SIGKILL
    p.close()


def test_kill_after_exit_does_nothing(make: Make) -> None:
    p = make()
    assert finish(p, "helpers:wait_eof") == 0
    p.kill(signal.SIGKILL)
    assert p.wait() == 0


def test_returncode_is_none_while_running_and_wait_times_out(make: Make) -> None:
    p = make()
    with p.run("helpers:wait_eof"):
        assert p.returncode is None
        start = time.monotonic()
        with pytest.raises(anyfork.TimeoutExpired) as info:
            p.wait(0.1)
        assert 0.05 < time.monotonic() - start < 2
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, anyfork.Error)
        assert p.returncode is None
    assert p.wait(5) == 0


def test_wait_rejects_a_negative_timeout() -> None:
    p = anyfork.new_exec()
    with pytest.raises(ValueError):
        p.wait(-1)
    p.close()
    assert p.wait(5) == 0


# --- close, context manager, garbage collection -----------------------------------------------


def test_close_before_run_makes_the_process_exit(make: Make) -> None:
    p = make().send_arg(b"never used")
    pid = p.pid
    p.close()
    p.close()  # idempotent
    assert p.wait(5) == 0
    assert wait_exited(pid)


def test_context_manager_closes_an_unrun_process(make: Make) -> None:
    with make() as p:
        pid = p.pid
    assert p.wait(5) == 0
    assert wait_exited(pid)


def test_closed_process_refuses_preparation(make: Make) -> None:
    p = make()
    p.close()
    for call in (lambda: p.eval("1"), lambda: p.require("os"), lambda: p.send_arg(b""),
                 lambda: p.send_fh(0), p.fork, lambda: p.run("helpers:pids")):
        with pytest.raises(anyfork.ProcessStateError):
            call()
    assert p.wait(5) == 0


def test_close_after_run_leaves_the_process_running(make: Make) -> None:
    p = make()
    with p.run("helpers:wait_eof"):
        p.close()
        assert p.returncode is None
    assert p.wait(5) == 0


def test_a_dropped_unrun_process_exits(make: Make) -> None:
    p = make().send_arg(b"never used")
    pid = p.pid
    del p
    gc.collect()
    assert wait_exited(pid)


# --- a spent process --------------------------------------------------------------------------


def test_a_run_process_is_spent_but_keeps_its_status(make: Make) -> None:
    p = make()
    r, w = os.pipe()
    try:
        with p.run("helpers:wait_eof"):
            for call in (lambda: p.eval("1"), lambda: p.require("os"), lambda: p.send_arg(b""),
                         lambda: p.send_fh(w), p.fork, lambda: p.run("helpers:pids")):
                with pytest.raises(anyfork.ProcessStateError):
                    call()
            assert p.pid > 0
            assert p.returncode is None
            p.kill(signal.SIGKILL)
            assert p.wait(5) == -signal.SIGKILL
    finally:
        os.close(r)
        os.close(w)
    assert issubclass(anyfork.ProcessStateError, anyfork.Error)


# --- sys.path ---------------------------------------------------------------------------------


def test_new_sees_sys_path_entries_added_after_the_template_started(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = unique("late_path_mod")
    (tmp_path / f"{mod}.py").write_text("def f(sock):\n    sock.sendall(b'found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = make().require(mod)
    with p.run(f"{mod}:f") as sock:
        assert read_all(sock) == b"found"


def test_new_sees_the_callers_sys_path_as_of_the_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    p = anyfork.new()
    monkeypatch.undo()
    assert str(tmp_path) in outcome(p, "helpers:syspath")
    assert str(tmp_path) not in outcome(anyfork.new(), "helpers:syspath")


# --- the default template ---------------------------------------------------------------------


def test_a_dead_default_template_is_replaced() -> None:
    _, template_pid = outcome(anyfork.new(), "helpers:pids")
    os.kill(template_pid, signal.SIGKILL)  # our unreaped child: the pid can't be recycled yet
    assert wait_exited(template_pid)
    _, new_template_pid = outcome(anyfork.new(), "helpers:pids")
    assert new_template_pid not in (template_pid, os.getpid())
    assert template_pid not in zombie_children()


# --- a template that dies ---------------------------------------------------------------------


def test_wait_on_a_child_of_a_dead_template_raises_instead_of_hanging() -> None:
    t = anyfork.new_exec()
    child = t.fork()
    with child.run("helpers:wait_eof"):
        t.kill(signal.SIGKILL)
        assert t.wait(5) == -signal.SIGKILL
        with pytest.raises(anyfork.TemplateDiedError, match="template"):
            child.wait(5)
    assert wait_exited(child.pid)


def test_fork_from_a_dead_template_is_an_anyfork_error_not_broken_pipe() -> None:
    t = anyfork.new_exec()
    assert outcome(t.fork(), "helpers:pids")
    t.kill(signal.SIGKILL)
    assert t.wait(5) == -signal.SIGKILL
    with pytest.raises(anyfork.Error, match="process"):
        t.fork()
    t.close()


def test_run_of_a_child_whose_template_died_before_forking_it_raises() -> None:
    t = anyfork.new_exec().eval("import os; os._exit(9)")
    child = t.fork()  # written, but the template dies before it forks
    with pytest.raises(anyfork.Error, match="template"):
        child.run("helpers:pids")
    assert t.wait(5) == 9


def test_process_that_exits_before_taking_every_command_raises_process_exited() -> None:
    p = anyfork.new_exec().eval("import os; os._exit(4)").send_arg(b"x" * (8 * MiB))
    with pytest.raises(anyfork.ProcessExitedError) as info:
        p.run("helpers:pids")
    assert info.value.returncode == 4
    assert p.wait(5) == 4


# --- reaping ----------------------------------------------------------------------------------


def test_dropped_new_exec_child_is_reaped_by_the_next_call_into_anyfork() -> None:
    p = anyfork.new_exec()
    pid = p.pid
    p.run("helpers:wait_eof").close()
    del p
    gc.collect()
    assert wait_exited(pid)
    deadline = time.monotonic() + 5
    while pid not in zombie_children():  # it exited: a zombie until someone reaps it
        assert time.monotonic() < deadline
        time.sleep(0.001)
    anyfork.new().close()
    assert pid not in zombie_children()


# --- threads ----------------------------------------------------------------------------------


def _in_threads(n: int, target: Callable[[int], object]) -> list[object]:
    results: list[object] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait(5)
            results[i] = target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def test_many_threads_calling_new_at_once() -> None:
    def one(i: int) -> object:
        payload = os.urandom(256 * 1024) + str(i).encode()
        p = anyfork.new().send_arg(payload)
        got = outcome(p, "helpers:items")[1:]
        assert got == [digest(payload)]
        return (p.pid, p.wait(5))

    results = _in_threads(16, one)
    assert len({pid for pid, _ in results}) == 16
    assert {status for _, status in results} == {0}


def test_threads_calling_new_exec_and_fork_at_once() -> None:
    t = anyfork.new_exec()

    def one(i: int) -> object:
        p = anyfork.new_exec() if i % 2 else t.fork()
        p.send_arg(str(i))
        got = outcome(p, "helpers:items")[1:]
        return got == [digest(str(i))] and p.wait(5) == 0

    assert _in_threads(8, one) == [True] * 8
    t.close()
    assert t.wait(5) == 0


def test_process_type_is_what_constructors_return() -> None:
    for p in (anyfork.new(), anyfork.new_exec()):
        assert type(p) is anyfork.Process
        p.close()
        assert p.wait(5) == 0


def test_a_platform_without_descriptor_passing_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # What anyfork finds missing at import (no AF_UNIX/SCM_RIGHTS, no fork or
    # posix_spawn) turns every constructor into an UnsupportedError, raised
    # before anything is created.
    monkeypatch.setattr(_process, "_UNSUPPORTED", "this platform has no Unix sockets with descriptor passing")
    for make in (anyfork.new, anyfork.new_exec, anyfork.fork_template):
        with pytest.raises(anyfork.UnsupportedError, match="descriptor passing"):
            make()
    assert issubclass(anyfork.UnsupportedError, anyfork.Error)


# --- forking ahead from a template of the user's ------------------------------------------------


def _children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


STATE = ("def show(sock, *items):\n"
         "    kinds = tuple(i if isinstance(i, str) else type(i).__name__ for i in items)\n"
         "    sock.sendall(repr((x, kinds)).encode())\n")


def _reply(proc: anyfork.Process) -> bytes:
    with proc.run("show") as sock:
        sock.settimeout(5)
        return sock.recv(1000)


AHEAD = 2


def test_a_template_forks_ahead_only_when_told_to() -> None:
    tpl = anyfork.new_exec().eval("x = 1\n" + STATE)
    try:
        first = [tpl.fork() for _ in range(3)]  # forked from three times, unchanged
        for p in first:
            assert p.pid in _children_of(tpl.pid)
        # Once every fork is reported, nothing else is running under it; a
        # fork ahead, had there been one, would be by now (its SPAWN went
        # with the FORK before it).
        assert _children_of(tpl.pid) == {p.pid for p in first}
        tpl.fork_ahead(AHEAD)
        assert _until(lambda: len(_children_of(tpl.pid)) == len(first) + AHEAD)
        for p in first:
            p.close()
    finally:
        tpl.close()


def test_fork_ahead_checks_its_argument_and_its_process() -> None:
    tpl = anyfork.new_exec()
    try:
        with pytest.raises(TypeError):
            tpl.fork_ahead("2")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            tpl.fork_ahead(True)
        with pytest.raises(ValueError, match="0 to 64"):
            tpl.fork_ahead(-1)
        with pytest.raises(ValueError, match="0 to 64"):
            tpl.fork_ahead(65)
        assert tpl.fork_ahead(0) is tpl
    finally:
        tpl.close()
    with pytest.raises(anyfork.ProcessStateError):
        tpl.fork_ahead(1)


def test_fork_ahead_zero_lets_those_waiting_go() -> None:
    tpl = anyfork.new_exec().eval("x = 1\n" + STATE)
    try:
        tpl.fork_ahead(AHEAD)
        assert _until(lambda: len(_children_of(tpl.pid)) == AHEAD)
        ahead = _children_of(tpl.pid)
        tpl.fork_ahead(0)
        fresh = tpl.fork()
        assert fresh.pid not in ahead
        # (returncode reads the reports that carry those forked ahead.)
        assert _until(lambda: fresh.returncode is None and _children_of(tpl.pid) == {fresh.pid})
        fresh.close()
    finally:
        tpl.close()


def test_a_template_told_to_fork_ahead_hands_out_processes_of_the_same_state() -> None:
    tpl = anyfork.new_exec().eval("x = 1\n" + STATE)
    try:
        first = [tpl.fork_ahead(AHEAD).fork(), tpl.fork()]
        assert _until(lambda: len(_children_of(tpl.pid)) >= len(first) + AHEAD)
        ahead = _children_of(tpl.pid) - {p.pid for p in first}
        third = tpl.fork()
        assert third.pid in ahead  # handed out, not forked on request
        assert _reply(third) == repr((1, ())).encode()
        assert third.wait(5) == 0
        for p in first:
            p.close()
    finally:
        tpl.close()


@pytest.mark.parametrize("change", ["eval", "send_arg", "require", "send_fh"])
def test_changing_a_template_lets_its_processes_forked_ahead_go(change: str) -> None:
    tpl = anyfork.new_exec().eval("x = 1\n" + STATE)
    a, b = socket.socketpair()
    try:
        first = [tpl.fork_ahead(AHEAD).fork(), tpl.fork()]
        assert _until(lambda: len(_children_of(tpl.pid)) >= len(first) + AHEAD)
        ahead = _children_of(tpl.pid) - {p.pid for p in first}
        if change == "eval":
            tpl.eval("x = 2")
        elif change == "send_arg":
            tpl.send_arg("new")
        elif change == "require":
            tpl.require("json")
        else:
            tpl.send_fh(a)
        after = tpl.fork()
        assert after.pid not in ahead
        # Those forked ahead had the old state: they exit rather than be handed
        # out, and the template forks ahead again, from the new state.
        assert _until(lambda: not (ahead & _children_of(tpl.pid)))
        assert _until(lambda: len(_children_of(tpl.pid)) == len(first) + 1 + AHEAD)
        again = tpl.fork()
        assert again.pid in _children_of(tpl.pid) - ahead - {p.pid for p in first} - {after.pid}
        again.close()
        x, items = eval(_reply(after))
        assert x == (2 if change == "eval" else 1)
        assert items == {"send_arg": ("new",), "send_fh": ("socket",)}.get(change, ())
        assert after.wait(5) == 0
        for p in first:
            p.close()
    finally:
        a.close()
        b.close()
        tpl.close()


# --- issue 15: defects of the caller side, each pinned ------------------------------------------

MiB = 1 << 20


def test_run_from_two_threads_runs_once_and_the_other_gets_process_state_error() -> None:
    # Broke: both run() calls queued a RUN; the function read the second as data.
    for _ in range(40):
        p = anyfork.new().eval("def take(s):\n    s.sendall(repr(s.recv(100)).encode())\n")
        barrier = threading.Barrier(2)
        results: list[object] = []

        def go(proc: anyfork.Process = p, barrier: threading.Barrier = barrier,
               results: list[object] = results) -> None:
            barrier.wait(5)
            try:
                results.append(proc.run("take"))
            except anyfork.ProcessStateError as e:
                results.append(e)

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        socks = [r for r in results if isinstance(r, socket.socket)]
        assert len(results) == 2
        assert len(socks) == 1, f"run() succeeded {len(socks)} times"
        with socks[0] as s:
            s.shutdown(socket.SHUT_WR)
            assert read_all(s) == b"b''", "the function read a stray RUN frame"
        assert p.wait(5) == 0


def test_a_dead_process_forked_ahead_is_never_handed_out() -> None:
    # Broke: fork() took a spare before reading the EXIT reports already waiting.
    anyfork.new().close()
    tpl = _runtime.runtime.default
    assert tpl is not None
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    spares = [child.pid for child, _ in tpl._tpl.state.pool.values()]
    assert len(spares) == _process._POOL, "setup: the pool never filled"
    for pid in spares:
        os.kill(pid, signal.SIGKILL)
    for pid in spares:
        assert wait_exited(pid), "setup: a process forked ahead survived SIGKILL"
    assert select.select([tpl._tpl.reports.fileno()], [], [], 5)[0], "setup: no EXIT report waiting"
    for _ in range(_process._POOL + 1):
        p = anyfork.new()
        assert p.pid not in spares
        assert outcome(p, "helpers:pids")[0] == p.pid


@pytest.mark.parametrize("how", ["close", "run"])
def test_closing_or_running_a_template_closes_its_report_channel(how: str) -> None:
    # Broke: only __del__ closed it, so it lasted as long as any child's object.
    # A closed template stays alive for its children (issue 14): its channels
    # close once the last of them is reported gone, whoever asks.
    before = set(helpers.open_fds())
    tpl = anyfork.new_exec().eval("def hold(s):\n    s.recv(1)\n")
    child = tpl.fork()
    child.pid  # noqa: B018 - reported, so nothing is on its way
    sock = tpl.run("hold") if how == "run" else None
    if sock is None:
        tpl.close()
        child.close()
        assert child.wait(5) == 0  # its EXIT: the last child is gone
    # (The template's pidfd is open while it is alive: not a channel.)
    new = {fd for fd, what in helpers.open_fds().items() if fd not in before and "pidfd" not in what}
    mine = {child._cmd.sock.fileno()} if child._cmd.sock is not None else set()
    mine |= {sock.fileno()} if sock is not None else set()
    try:
        assert new == mine, f"still open besides the child's socket (and run's): {new - mine}"
    finally:
        if sock is not None:
            sock.close()
        child.close()
        assert tpl.wait(5) == 0


def test_wait_timeout_covers_a_template_busy_with_another_threads_write() -> None:
    # Broke: wait(timeout) took the template's lock, held by a writer, before timing.
    tpl = anyfork.new_exec().eval("def hold(s):\n    s.recv(1)\n")
    child = tpl.fork()
    sock = child.run("hold")
    tpl.eval("import time\ntime.sleep(4)").send_arg(b"x" * (32 * MiB))
    writer = threading.Thread(target=lambda: tpl.fork().close(), daemon=True)
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while not tpl._cmd.writing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tpl._cmd.writing, "setup: the other thread is not writing"
        with pytest.raises(anyfork.TimeoutExpired):
            child.wait(0.2)
        assert writer.is_alive(), "wait() returned only after the template took the write"
    finally:
        sock.close()
        writer.join(20)
    assert child.wait(5) == 0
    tpl.close()
    assert tpl.wait(5) == 0


@pytest.mark.parametrize("timeout", [float("inf"), 1e7, 3e6])
def test_a_huge_timeout_means_wait(timeout: float, forked: Make) -> None:
    # Broke: the millisecond conversion raised OverflowError.
    p = forked()
    p.run("helpers:wait_eof").close()
    assert p.wait(timeout) == 0


@pytest.mark.parametrize("entry", [pytest.param("path", id="Path"), pytest.param(b"/nowhere", id="bytes"),
                                   pytest.param(3, id="int")])
def test_sys_path_entries_that_are_not_str_do_not_break_new(entry: object,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    # Broke: new() and new_exec() raised TypeError (PosixPath has no len()).
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.path.append(tmp_path if entry == "path" else entry)  # type: ignore[arg-type]
    (tmp_path / "onpath.py").write_text("def f(s):\n    s.sendall(b'found')\n")
    for make in (anyfork.new, anyfork.new_exec):
        with make().run("onpath:f") as s:
            assert read_all(s) == b"found"


# --- regressions: what broke once, pinned (moved from test_regressions.py) -------------


def _blocking_facts(sock: socket.socket) -> tuple[object, bool]:
    return sock.gettimeout(), os.get_blocking(sock.fileno())


# Pins d16: returncode on a forked process never read the report channel.
@pytest.mark.parametrize("how", ["new", "fork"])
def test_polling_returncode_alone_sees_the_exit_status(how: str) -> None:
    tpl = anyfork.new_exec() if how == "fork" else None
    p = tpl.fork() if tpl is not None else anyfork.new()
    try:
        p.run("helpers:wait_eof").close()  # it exits now, with status 0
        deadline = time.monotonic() + 3
        while p.returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.returncode == 0, "returncode still None 3 s after the process exited"
    finally:
        p.wait(5)
        if tpl is not None:
            tpl.close()
            tpl.wait(5)


# Pins d01: wait(0) on a running process let an AssertionError escape.
def test_wait_zero_on_a_running_process_raises_timeout_expired(make: Make) -> None:
    p = make()
    sock = p.run("helpers:wait_eof")
    try:
        with pytest.raises(anyfork.TimeoutExpired):
            p.wait(0)
    finally:
        sock.close()
    assert p.wait(5) == 0


# Pins d14: kill(bad signal) gave a bare OSError (new_exec) or did nothing (forked).
@pytest.mark.parametrize("sig", [999, -1])
def test_kill_with_an_invalid_signal_raises_value_error(make: Make, sig: int) -> None:
    p = make()
    sock = p.run("helpers:wait_eof")
    try:
        with pytest.raises(ValueError):
            p.kill(sig)
    finally:
        sock.close()
    assert p.wait(5) == 0


# Pins d06: a default template's spares outlived it, and its descriptors piled up.





@pytest.mark.parametrize("code", [
    pytest.param("caller_pool_replaced.py", id="replaced"),
    pytest.param("caller_pool_closed.py", id="closed"),
    pytest.param("caller_pool_dropped.py", id="dropped"),
])
def test_default_template_spares_exit_with_it_and_leave_no_descriptors(code: str) -> None:
    facts = run_program(code, timeout=40).facts
    assert facts["spares"] >= _process._POOL, f"setup: the pool never filled: {facts}"
    assert facts["alive"] == [], f"forked-ahead processes outlived their template: {facts}"
    assert facts["leaked"] == {}, f"descriptors piled up across template restarts: {facts}"


# Pins d07: fork() failing with EMFILE leaked a detached descriptor and raised a bare OSError.


@pytest.mark.parametrize("free", [
    pytest.param(0, id="command-socketpair"),
    pytest.param(2, id="report-channel-socketpair"),
])
def test_fork_out_of_descriptors_raises_error_and_leaks_nothing(free: int) -> None:
    facts = run_program("caller_fork_emfile.py", str(free), timeout=20).facts
    assert facts["raised"] is not None, f"setup: fork() succeeded: {facts}"
    assert facts["is_error"], f"fork() raised {facts['raised']}, not anyfork.Error: {facts}"
    assert facts["leaked"] == {}, f"descriptors leaked: {facts}"


# Pins r2-pool-shrink: forked-ahead processes that died were never replaced; the pool stayed empty.


def test_pool_refills_after_its_processes_forked_ahead_were_killed() -> None:
    facts = run_program("caller_pool_after_spares_killed.py", timeout=40).facts
    assert facts["before"] == facts["killed"] == _process._POOL, f"setup: {facts}"
    assert facts["emptied"], f"setup: the killed processes stayed in the pool: {facts}"
    assert facts["after"] == _process._POOL, f"the pool never refilled: {facts}"
    assert facts["from_pool"], f"new() no longer hands out processes forked ahead: {facts}"


# Pins r2-emfile: out of descriptors, new_exec(), the first new() and fork_template() raised a bare OSError.


@pytest.mark.parametrize("name", ["new_exec", "new", "fork_template"])
def test_out_of_descriptors_raises_anyfork_error(name: str) -> None:
    facts = run_program("caller_emfile_call.py", name, timeout=30).facts
    assert facts["raised"] is not None, f"setup: {name}() succeeded: {facts}"
    assert facts["is_error"], f"{name}() raised {facts['raised']}, not anyfork.Error"


# Pins r3-caller-timeout: under socket.setdefaulttimeout() in the caller, the sockets it handed
# to processes were O_NONBLOCK, and a forked child died at its first read that had to wait.
def test_a_callers_default_timeout_does_not_reach_its_processes() -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.5)
    try:
        tpl = anyfork.new_exec().require("helpers")
        time.sleep(0.3)
        child = tpl.fork()
        time.sleep(0.8)  # longer than the timeout: the child waits for RUN all along
        with child.run("helpers:echo") as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert read_exactly(sock, 4) == b"ping"
        assert child.wait(5) == 0
        tpl.close()
        assert tpl.wait(5) == 0
    finally:
        socket.setdefaulttimeout(old)


# Pins r4-caller-timeout: under the caller's socket.setdefaulttimeout(), the sockets run() returned
# had the timeout (README: blocking), and anyfork's own writes of a big argument timed out.
def test_a_callers_default_timeout_leaves_its_sockets_blocking_and_its_writes_whole() -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.2)
    try:
        for make in (anyfork.new_exec, anyfork.new):
            p = make().eval("import time\ntime.sleep(0.6)\n").send_arg(b"x" * (8 << 20))
            with p.run("helpers:arg_length") as sock:
                assert _blocking_facts(sock) == (None, True)
                assert read_all(sock) == b"%d" % (8 << 20)
            assert p.wait(10) == 0
    finally:
        socket.setdefaulttimeout(old)


@pytest.mark.parametrize("how", ["run", "close"])
def test_running_or_closing_a_template_lets_every_process_forked_ahead_go_at_once(how: str) -> None:
    # Broke (issue 15 #4): one whose SPARE report was still unread stayed alive, idle, for as
    # long as the caller held the template object.
    tpl = anyfork.new_exec().eval("def hold(s):\n    s.recv(1)\n")
    child = tpl.fork_ahead(AHEAD).fork()
    assert _until(lambda: len(_children_of(tpl.pid) - {child.pid}) == AHEAD), "setup: none forked ahead"
    ahead = _children_of(tpl.pid) - {child.pid}
    sock = tpl.run("hold") if how == "run" else None
    if sock is None:
        tpl.close()
    try:
        for pid in ahead:
            assert wait_exited(pid), f"process {pid}, forked ahead, outlived its template's {how}()"
    finally:
        if sock is not None:
            sock.close()
        child.close()
    assert tpl.wait(5) == 0


# --- the bootstrapping guard (issue 14) ---------------------------------------------------------

_SELF_REQUIRING = """\
import json, os, sys
import anyfork

# No 'if __name__ == "__main__":' guard: each process that imports this file
# runs this again.  It used to fork without end (the machine ran out of memory).
p = anyfork.new().require("selfbomb")
p.run("builtins:id").close()
try:
    status = p.wait(20)
except anyfork.ProcessFailedError as e:
    status = [e.returncode, e.type_name]
print(json.dumps({"status": status, "pid": os.getpid()}))
"""


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                members.append(int(entry))
    return members


def test_a_script_that_requires_itself_without_a_guard_makes_one_process_not_a_bomb(tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "selfbomb.py"
    script.write_text(_SELF_REQUIRING)
    src = str(Path(anyfork.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, str(tmp_path)]))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    facts = json.loads(out.decode().strip().splitlines()[-1])
    assert facts["status"] == [1, "anyfork._errors.Error"]  # the child failed at its import, saying why
    assert "still being prepared by anyfork" in err.decode()
    assert 'if __name__ == "__main__":' in err.decode()
    deadline = time.monotonic() + 5
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session_members(proc.pid) == []  # nothing left: no runaway processes


def test_creating_processes_while_eval_runs_in_this_process_is_refused() -> None:
    p = anyfork.new_exec().eval(
        "import anyfork\n"
        "try:\n"
        "    anyfork.new()\n"
        "    OUTCOME = b'created'\n"
        "except anyfork.Error as e:\n"
        "    OUTCOME = b'refused' if 'still being prepared' in str(e) else str(e).encode()\n"
        "def say(sock):\n"
        "    sock.sendall(OUTCOME)\n")
    with p.run("say") as sock:
        assert read_all(sock) == b"refused"
    assert p.wait(10) == 0


def test_a_template_dropped_at_once_still_forks_its_child() -> None:
    # Pins a regression of the caller redesign, seen by test_pythons on 3.13: the
    # template's Process was collected (and closed) before it reported its child.
    child = anyfork.new_exec().fork()
    with child.eval("def ok(sock):\n    sock.sendall(b'ok')\n").run("ok") as sock:
        assert read_all(sock) == b"ok"
    assert child.wait(10) == 0


# --- issue 14: lifecycle and messages -----------------------------------------------------

HOLD = "def hold(s):\n    s.recv(1)\n"


def test_returncode_never_raises_when_the_status_cannot_be_known() -> None:
    """Issue 14: returncode raised TemplateDiedError; it is documented int | None."""
    tpl = anyfork.new_exec().eval(HOLD)
    child = tpl.fork()
    with child.run("hold"):
        os.kill(tpl.pid, signal.SIGKILL)
        assert tpl.wait(5) == -signal.SIGKILL
        assert child.returncode is None  # no status will come: None, and wait says why
        with pytest.raises(anyfork.TemplateDiedError):
            child.wait(5)
    assert wait_exited(child.pid)


def test_children_of_a_closed_template_can_still_be_killed_and_waited_for() -> None:
    """Issue 14: after template.close(), kill() said "can't signal process N
    safely: its template was closed" and wait() that the template "exited"."""
    tpl = anyfork.new_exec().eval(HOLD)
    kids = [tpl.fork() for _ in range(2)]
    socks = [k.run("hold") for k in kids]
    try:
        tpl.close()
        assert tpl.returncode is None  # alive for its children
        kids[0].kill(signal.SIGKILL)
        assert kids[0].wait(5) == -signal.SIGKILL
        assert kids[1].returncode is None
        socks[1].sendall(b"x")  # lets hold() return
        assert kids[1].wait(5) == 0
    finally:
        for s in socks:
            s.close()
    assert tpl.wait(5) == 0  # it exits once the last of them is gone
    with pytest.raises(anyfork.ProcessStateError, match="closed"):
        tpl.fork()


def test_wait_on_a_closed_template_waits_for_its_children_too() -> None:
    tpl = anyfork.new_exec().eval(HOLD)
    child = tpl.fork()
    with child.run("hold") as sock:
        tpl.close()
        with pytest.raises(anyfork.TimeoutExpired):
            tpl.wait(0.3)  # its child still runs, so it does too
        sock.sendall(b"x")
        assert tpl.wait(5) == 0
    assert child.returncode == 0


def test_repr_shows_pid_function_and_status() -> None:
    tpl = anyfork.new_exec().eval(HOLD)
    assert repr(tpl) == f"<anyfork.Process pid={tpl.pid} being prepared>"
    child = tpl.fork()
    assert repr(tpl) == f"<anyfork.Process pid={tpl.pid} a template>"
    with child.run("hold"):
        assert repr(child) == f"<anyfork.Process pid={child.pid} 'hold' running>"
        child.kill(signal.SIGKILL)
        child.wait(5)
    assert repr(child) == f"<anyfork.Process pid={child.pid} 'hold' killed by signal 9>"
    tpl.close()
    assert tpl.wait(5) == 0
    assert repr(tpl) == f"<anyfork.Process pid={tpl.pid} exited with status 0>"
    late = anyfork.new()
    late.close()
    # Closed: it exits at once, and its status may be in before repr asks.
    assert repr(late).endswith((" closed>", " exited with status 0>")), repr(late)


def test_messages_say_where_a_process_comes_from_not_an_internal_number() -> None:
    """Issue 14: "process #4 of process 27219" meant nothing to a user."""
    tpl = anyfork.new_exec().eval("import time\ntime.sleep(0.5)\n")  # holds the fork back
    child = tpl.fork()
    os.kill(tpl.pid, signal.SIGKILL)
    assert tpl.wait(5) == -signal.SIGKILL
    with pytest.raises(anyfork.TemplateDiedError) as died:
        child.pid  # noqa: B018
    child.close()
    with pytest.raises(anyfork.ProcessStateError) as closed:
        child.require("os")
    tpl.close()
    for e in (died.value, closed.value):
        assert "#" not in str(e), str(e)
    assert str(died.value) == (f"template process {tpl.pid} exited before it reported the pid "
                               "of a process it was asked to fork")
    assert str(closed.value) == f"a process forked from process {tpl.pid} was already closed"


OWNER = """
import json, os, sys, threading, time
import anyfork

CODE = "import time\\ndef serve(s):\\n    s.sendall(b'!')\\n    time.sleep(30)\\n"
tpl = anyfork.new_exec().eval(CODE)
procs = {
    "new": anyfork.new().eval(CODE).tie_to_owner(),
    "fork": tpl.fork().tie_to_owner(),
    "new_exec": anyfork.new_exec().eval(CODE).tie_to_owner(),
    "untied": anyfork.new().eval(CODE),
}
socks = {name: p.run("serve") for name, p in procs.items()}


def from_a_thread():  # spawned, tied and run by a thread that then exits
    p = procs["thread"] = anyfork.new_exec().eval(CODE).tie_to_owner()
    socks["thread"] = p.run("serve")
    assert socks["thread"].recv(1) == b"!"
    native.append(threading.get_native_id())


native = []
t = threading.Thread(target=from_a_thread)
t.start()
t.join()
deadline = time.monotonic() + 10
while os.path.exists(f"/proc/self/task/{native[0]}") and time.monotonic() < deadline:
    time.sleep(0.01)  # until the kernel is done with the thread
for name, sock in socks.items():
    if name != "thread":
        assert sock.recv(1) == b"!", name  # running: its tie is in place
try:
    procs["thread"].wait(0.5)
    sys.exit("the process died with the thread that spawned it")
except anyfork.TimeoutExpired:
    pass
print(json.dumps({name: p.pid for name, p in procs.items()}), flush=True)
time.sleep(30)
"""


def test_tie_to_owner_ends_the_process_when_its_owner_is_killed(tmp_path: Path) -> None:
    """Issue 14: after the owner was SIGKILLed, its workers kept serving.  Each
    way of making a process, tied, is gone within 2 s of its owner's SIGKILL;
    a new_exec process outlives the thread that spawned it; an untied one
    outlives its owner, as the seed's contract says."""
    import subprocess

    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    src = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))
    env = dict(os.environ, PYTHONPATH=src)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        line = owner.stdout.readline() if ready else b""
        assert line, f"the owner printed nothing (status {owner.poll()})"
        pids = json.loads(line)
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    untied = os.pidfd_open(pids.pop("untied"))
    try:
        for name, pid in pids.items():
            assert wait_exited(pid, 2), f"the tied process made by {name} outlived its owner"
        assert not select.select([untied], [], [], 0.2)[0], "the untied process died with its owner"
    finally:
        signal.pidfd_send_signal(untied, signal.SIGKILL)
        os.close(untied)


def test_tie_to_owner_refuses_what_is_not_a_signal() -> None:
    with anyfork.new() as p:
        for bad in (0, -1, 100000):
            with pytest.raises(ValueError, match="not a signal"):
                p.tie_to_owner(bad)

"""Regression tests for the defects two independent code reviews found.

Each test pins the behaviour a defect broke.  Scenarios that could hang the
test process, fork it, or leave it with a stuck thread run in a caller of
their own (``[sys.executable, "-c", code]``, killed at a deadline); the
caller prints one JSON line of facts and the test checks them.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import anyfork
from anyfork import _process
from anyfork import _protocol as wire
from anyfork._backend import deadline_after, run_blocking
from anyfork._caller import TemplateState
from anyfork._reports import ReportChannel
from helpers import read_all, wait_exited, zombie_children

if TYPE_CHECKING:
    from collections.abc import Callable

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20
_SRC = str(Path(anyfork.__file__).resolve().parent.parent)
_TESTS = str(Path(__file__).resolve().parent)


def run_caller(code: str, timeout: float = 30.0) -> dict[str, Any]:
    """Run ``code`` as a caller of its own; the JSON line of facts it printed.

    Output goes to files, not pipes: a process left behind must not keep the
    test waiting for EOF.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_SRC, _TESTS, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], stdout=out, stderr=err, env=env)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if rc is None:
        pytest.fail(f"the caller hung for {timeout} s\nstdout: {stdout}\nstderr: {stderr}")
    assert rc == 0, f"caller exited with {rc}\nstdout: {stdout}\nstderr: {stderr}"
    facts = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(facts) == 1, f"stdout: {stdout}\nstderr: {stderr}"
    result: dict[str, Any] = json.loads(facts[0])
    return result


# --- status -----------------------------------------------------------------------------


# Defect d16: returncode on a forked process never read the report channel.
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


# Defect d01: wait(0) on a running process let an AssertionError escape.
def test_wait_zero_on_a_running_process_raises_timeout_expired(make: Make) -> None:
    p = make()
    sock = p.run("helpers:wait_eof")
    try:
        with pytest.raises(anyfork.TimeoutExpired):
            p.wait(0)
    finally:
        sock.close()
    assert p.wait(5) == 0


# Defect d12: a corrupt report surfaced as TemplateDiedError, never ProtocolError.
_SEND_CORRUPT_REPORT = (
    "import sys\n"
    "f = sys._getframe()\n"
    "while f is not None and type(f.f_locals.get('self')).__name__ != 'Server':\n"
    "    f = f.f_back\n"
    "f.f_locals['self'].template.reports.sendall(b'\\xff' * 16)\n"
)


def test_corrupt_report_raises_protocol_error_from_wait() -> None:
    tpl = anyfork.new_exec()
    c = tpl.fork()
    sock = c.run("helpers:wait_eof")
    extra = None
    try:
        tpl.eval(_SEND_CORRUPT_REPORT)
        extra = tpl.fork()  # writes the eval; the template then sends garbage
        with pytest.raises(anyfork.ProtocolError):
            c.wait(3)
    finally:
        sock.close()
        if extra is not None:
            extra.close()
        tpl.close()
        assert tpl.wait(5) == 0


# --- kill -------------------------------------------------------------------------------


# Defect d14: kill(bad signal) gave a bare OSError (new_exec) or did nothing (forked).
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


# Defect d02: kill() blocked on the lock wait() held in a blocking waitid.
_KILL_FROM_THREAD = """
import anyfork, helpers, json, os, signal, sys, threading, time
p = anyfork.new_exec().eval("import time\\ndef f(s):\\n    time.sleep(60)\\n")
s = p.run("f")
statuses = []
waiter = threading.Thread(target=lambda: statuses.append(p.wait()), daemon=True)
waiter.start()
time.sleep(0.3)  # the waiter is in wait() now
killer = threading.Thread(target=p.kill, daemon=True)
killer.start()
killer.join(3)
facts = {"kill_returned": not killer.is_alive(), "exited": helpers.wait_exited(p.pid, 3)}
if not facts["exited"]:
    os.kill(p.pid, signal.SIGKILL)  # by hand, to let the waiter go
waiter.join(5)
facts["status"] = statuses[0] if statuses else None
print(json.dumps(facts))
sys.stdout.flush()
os._exit(0)
"""

_KILL_FROM_HANDLER = """
import anyfork, helpers, json, os, signal, sys, threading, time
q = anyfork.new_exec().eval("import time\\ndef f(s):\\n    time.sleep(60)\\n")
s = q.run("f")
rescued = []
def rescue():
    if not helpers.wait_exited(q.pid, 5):
        rescued.append(True)
        os.kill(q.pid, signal.SIGKILL)
threading.Thread(target=rescue, daemon=True).start()
signal.signal(signal.SIGALRM, lambda signum, frame: q.kill())
signal.setitimer(signal.ITIMER_REAL, 0.3)
t0 = time.monotonic()
try:
    status = q.wait(10)
except anyfork.TimeoutExpired:
    status = None
print(json.dumps({"status": status, "elapsed": time.monotonic() - t0, "rescued": bool(rescued)}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("where", ["other_thread", "signal_handler"])
def test_kill_while_waiting_signals_promptly(where: str) -> None:
    if where == "other_thread":
        facts = run_caller(_KILL_FROM_THREAD, timeout=20)
        assert facts["kill_returned"], f"kill() blocked while another thread waits: {facts}"
        assert facts["exited"], f"the process was not signalled: {facts}"
        assert facts["status"] == -signal.SIGTERM, facts
    else:
        facts = run_caller(_KILL_FROM_HANDLER, timeout=20)
        assert not facts["rescued"], f"kill() in the handler did not signal the process: {facts}"
        assert facts["status"] == -signal.SIGTERM, facts
        assert facts["elapsed"] < 3, facts


# Defect d17: fork_template kept the program's signal handlers and mask in its children.
_FORK_TEMPLATE_SIGNALS = """
import anyfork, helpers, json, signal, socket
def on_term(signum, frame):
    pass  # the program's own: ignore SIGTERM
signal.signal(signal.SIGTERM, on_term)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
tpl = anyfork.fork_template()
p = tpl.fork().eval(
    "import signal, socket\\n"
    "def probe(s):\\n"
    "    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\\n"
    "    mask = sorted(int(x) for x in signal.pthread_sigmask(signal.SIG_BLOCK, []))\\n"
    "    s.sendall(repr((default, mask)).encode())\\n"
    "    s.shutdown(socket.SHUT_WR)\\n"
    "    s.recv(1)\\n")
s = p.run("probe")
default, mask = helpers.result(s)
p.kill()
try:
    status = p.wait(3)
except anyfork.TimeoutExpired:
    status = None
    p.kill(signal.SIGKILL)
    p.wait(5)
s.close()
tpl.close()
tpl.wait(5)
print(json.dumps({"sigterm_default": default, "mask": mask, "status": status}))
"""


def test_function_forked_from_fork_template_has_fresh_signal_state() -> None:
    facts = run_caller(_FORK_TEMPLATE_SIGNALS, timeout=20)
    assert facts["sigterm_default"], f"the program's SIGTERM handler is still installed: {facts}"
    assert facts["mask"] == [], f"signals still blocked: {facts}"
    assert facts["status"] == -signal.SIGTERM, f"kill() (SIGTERM) did not terminate it: {facts}"


# --- after os.fork ----------------------------------------------------------------------


# Defect d04: in a child of os.fork, inherited Processes used closed descriptor numbers.
_INHERITED_AFTER_FORK = """
import anyfork, helpers, json, os, signal, subprocess, sys, threading
p = anyfork.new_exec().eval("import time\\ndef f(s):\\n    time.sleep(60)\\n")
s = p.run("f")
tpl = anyfork.new_exec()
c = tpl.fork()  # its pid not read yet
stale = p._child.pidfd.fd
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    facts = {}
    victim = subprocess.Popen(["sleep", "20"])
    held = []
    for _ in range(64):  # make p's old pidfd number name an unrelated process
        fd = os.pidfd_open(victim.pid)
        if fd == stale:
            break
        held.append(fd)
    facts["reused"] = fd == stale
    def attempt(name, call):
        box = []
        def go():
            try:
                call()
                box.append("returned")
            except BaseException as e:
                box.append(type(e).__name__)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(2)
        facts[name] = box[0] if box else "hung"
    for who, proc in (("p", p), ("c", c)):
        attempt(who + ".kill", lambda: proc.kill(signal.SIGKILL))
        attempt(who + ".wait", lambda: proc.wait(1))
        attempt(who + ".returncode", lambda: proc.returncode)
        attempt(who + ".pid", lambda: proc.pid)
    facts["victim_killed"] = helpers.wait_exited(victim.pid, 0.5)
    victim.kill()
    victim.wait()
    os.write(w, json.dumps(facts).encode())
    os._exit(0)
os.close(w)
chunks = []
while data := os.read(r, 65536):
    chunks.append(data)
os.close(r)
os.waitpid(pid, 0)
facts = json.loads(b"".join(chunks) or b"{}")
facts["p_alive_in_parent"] = p.returncode is None
p.kill()
facts["p_status"] = p.wait(5)
s.close()
c.close()
tpl.close()
tpl.wait(5)
print(json.dumps(facts))
"""


def test_inherited_process_in_a_forked_child_refuses_and_signals_nothing() -> None:
    facts = run_caller(_INHERITED_AFTER_FORK, timeout=45)
    assert not facts["victim_killed"], f"kill() in the child signalled an unrelated process: {facts}"
    calls = {k: v for k, v in facts.items() if k.startswith(("p.", "c."))}
    assert len(calls) == 8, f"{facts}"
    assert calls == dict.fromkeys(calls, "ProcessStateError"), f"in the child: {calls}"
    assert facts["p_alive_in_parent"], f"{facts}"
    assert facts["p_status"] == -signal.SIGTERM, f"{facts}"


# --- the default template's forked-ahead processes --------------------------------------


# Defect d06: a default template's spares outlived it, and its descriptors piled up.
_POOL_COMMON = """
import anyfork, gc, helpers, json, os, signal, time
from anyfork import _process, _runtime

def fill_pool(tpl):
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    return [child.pid for child, _ in tpl._tpl.state.pool.values()]

def template_fds(tpl):
    return tpl._descriptors()

def still_alive(pids):
    deadline = time.monotonic() + 3
    alive = [pid for pid in pids if not helpers.wait_exited(pid, max(0, deadline - time.monotonic()))]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # clean up what the test started
    return alive

before = helpers.open_fds()
anyfork.new().close()
"""

_POOL_REPLACED = _POOL_COMMON + """
spares = []
for _ in range(5):
    tpl = _runtime.runtime.default
    spares += fill_pool(tpl)
    os.kill(tpl.pid, signal.SIGKILL)
    helpers.wait_exited(tpl.pid, 5)
    del tpl
    anyfork.new().close()  # replaces the template
fill_pool(_runtime.runtime.default)
deadline = time.monotonic() + 3
while True:
    gc.collect()
    _runtime.runtime.reap_directs()
    allowed = template_fds(_runtime.runtime.default)
    leaked = {fd: t for fd, t in helpers.open_fds().items() if fd not in allowed and before.get(fd) != t}
    if not leaked or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": leaked}))
"""

_POOL_CLOSED = _POOL_COMMON + """
tpl = _runtime.runtime.default
spares = fill_pool(tpl)
tpl.close()
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": {}}))
"""

_POOL_DROPPED = _POOL_COMMON + """
spares = fill_pool(_runtime.runtime.default)
_runtime.runtime.default = None
gc.collect()
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": {}}))
"""


@pytest.mark.parametrize("code", [
    pytest.param(_POOL_REPLACED, id="replaced"),
    pytest.param(_POOL_CLOSED, id="closed"),
    pytest.param(_POOL_DROPPED, id="dropped"),
])
def test_default_template_spares_exit_with_it_and_leave_no_descriptors(code: str) -> None:
    facts = run_caller(code, timeout=40)
    assert facts["spares"] >= _process._POOL, f"setup: the pool never filled: {facts}"
    assert facts["alive"] == [], f"forked-ahead processes outlived their template: {facts}"
    assert facts["leaked"] == {}, f"descriptors piled up across template restarts: {facts}"


# --- a template blocked writing reports -------------------------------------------------

_BLOCKED_TEMPLATE = """
import anyfork, asyncio, helpers, json, os, signal, time
tpl = anyfork.new_exec().eval("def f(s):\\n    s.recv(1)\\ndef g(s, *a):\\n    pass\\n")
kids = [tpl.fork() for _ in range(400)]
socks = [k.run("f") for k in kids]
pids = [k.pid for k in kids]
for s in socks:
    s.send(b"x")
    s.close()
deadline = time.monotonic() + 10
for pid in pids:
    helpers.wait_exited(pid, max(0, deadline - time.monotonic()))
time.sleep(1)  # the template reaps them and blocks writing 400 unread exit reports
"""

_RUN_ASYNC_ON_BLOCKED = _BLOCKED_TEMPLATE + """
tpl.send_arg(b"x" * (8 << 20))
async def main():
    try:
        sock = await asyncio.wait_for(tpl.run_async("g"), 8)
    except asyncio.TimeoutError:
        return False
    sock.close()
    return True
completed = asyncio.run(main())
if not completed:
    os.kill(tpl.pid, signal.SIGKILL)
print(json.dumps({"completed": completed, "status": tpl.wait(5)}))
"""

_CLOSE_BLOCKED = _BLOCKED_TEMPLATE + """
pid = tpl.pid
tpl.close()
exited = helpers.wait_exited(pid, 3)
if not exited:
    os.kill(pid, signal.SIGKILL)
print(json.dumps({"exited": exited, "status": tpl.wait(5)}))
"""


# Defect d08: run_async on a template blocked writing reports never read them: a hang.
def test_run_async_on_a_template_with_many_unread_reports_completes() -> None:
    facts = run_caller(_RUN_ASYNC_ON_BLOCKED, timeout=50)
    assert facts["completed"], f"run_async hung on a template blocked writing reports: {facts}"
    assert facts["status"] == 0, facts


# Defect d15: close() left a template blocked writing reports running.
def test_close_makes_a_template_blocked_writing_reports_exit() -> None:
    facts = run_caller(_CLOSE_BLOCKED, timeout=50)
    assert facts["exited"], f"the template still runs 3 s after close(): {facts}"


# --- threads ----------------------------------------------------------------------------


# Defect d03: a waiter whose status another thread dispatched blocked as the next reader.
# The seam: ReportChannel.read_now is wrapped so that thread Y, past until_op's
# done() check, is held until another thread has dispatched its exit status.
_LOST_WAKEUP = """
import anyfork, json, os, sys, threading, time
from anyfork import _reports
tpl = anyfork.new_exec().eval("def slow(s):\\n    s.recv(1)\\ndef quick(s):\\n    pass\\n")
a = tpl.fork()
sa = a.run("slow")  # runs until it gets a byte
b = tpl.fork()
reports = tpl._tpl.reports
real_read = _reports.ReportChannel.read_now
hook = {"hit": False}
def read_now(self):
    if threading.current_thread().name == "Y" and not hook["hit"]:
        hook["hit"] = True
        deadline = time.monotonic() + 5
        while b._child.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_read(self)
_reports.ReportChannel.read_now = read_now
x = threading.Thread(target=a.wait, name="X", daemon=True)
x.start()
deadline = time.monotonic() + 5
while reports.shared._waiters == 0 and time.monotonic() < deadline:
    time.sleep(0.01)  # until X waits on the channel
y = threading.Thread(target=b.wait, name="Y", daemon=True)
y.start()
sb = b.run("quick")  # b exits at once: X (or this thread) dispatches its status
y.join(3)
facts = {"hook_hit": hook["hit"], "b_status": b._child.returncode, "y_blocked": y.is_alive()}
sa.send(b"x")  # a exits: one more report, to let the threads go
x.join(3)
y.join(3)
print(json.dumps(facts))
sys.stdout.flush()
os._exit(0)
"""


def test_waiter_whose_status_was_dispatched_by_another_thread_returns() -> None:
    facts = run_caller(_LOST_WAKEUP, timeout=30)
    assert facts["hook_hit"], f"setup: Y never read the channel, so the seam was not exercised: {facts}"
    assert facts["b_status"] == 0, facts
    assert not facts["y_blocked"], f"wait() missed a status another thread dispatched: {facts}"


# --- asyncio ----------------------------------------------------------------------------


# Defect d05: the report channel ended under an asyncio waiter left a stale reader.
def test_report_channel_ending_under_an_asyncio_waiter_leaves_no_stale_reader() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        # The sleep holds the fork back until fork() has returned, so run_async
        # is what reads its pid report.
        tpl = anyfork.new_exec().eval("import time\ntime.sleep(0.3)\ndef f(s):\n    pass\n")
        c = tpl.fork()
        rfd = tpl._tpl.reports.fileno()
        assert c._child.pid is None
        assert select.select([rfd], [], [], 5)[0], "setup: no pid report within 5 s"
        os.kill(tpl.pid, signal.SIGKILL)
        tpl.wait(5)
        (await asyncio.wait_for(c.run_async("f"), 5)).close()  # reads the pid, then EOF
        pairs: list[tuple[socket.socket, socket.socket]] = []
        try:
            for _ in range(256):  # until a new socket reuses the channel's number
                pairs.append(socket.socketpair())
                if rfd in (pairs[-1][0].fileno(), pairs[-1][1].fileno()):
                    break
            else:
                pytest.fail(f"setup: descriptor {rfd} was never reused")
            r, w = pairs[-1] if pairs[-1][0].fileno() == rfd else pairs[-1][::-1]
            r.setblocking(False)
            loop.call_later(0.2, w.send, b"hello")
            try:
                return await asyncio.wait_for(loop.sock_recv(r, 5), 3)
            except asyncio.TimeoutError:
                pytest.fail(f"sock_recv on reused descriptor {rfd} never completed: a stale reader")
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    assert asyncio.run(main()) == b"hello"


# Defect d13: run_async cancelled mid-write left RUN queued; a later run() sent a second one.
def test_cancelled_run_async_leaves_the_process_spent(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    p = anyfork.new_exec().eval(
        "def f(s, *a):\n"
        f"    open({str(seen)!r}, 'wb').write(s.recv(100))\n")
    p.send_arg(b"x" * (64 * MiB))

    async def main() -> None:
        task = asyncio.ensure_future(p.run_async("f"))
        await asyncio.sleep(0)  # the task writes what the socket takes, then waits
        assert not task.done(), "setup: the write was not in progress"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    try:
        sock = p.run("f")
    except anyfork.ProcessStateError:
        pass
    else:
        sock.sendall(b"hello")
        sock.close()
        p.wait(5)
        pytest.fail("run() after a cancelled run_async went ahead; the function first read "
                    f"{seen.read_bytes() if seen.exists() else None!r}")
    assert isinstance(p.wait(5), int), "the process did not exit"
    assert not seen.exists() or seen.read_bytes() == b"", "a RUN frame reached the function as data"


# --- descriptors and reaping ------------------------------------------------------------


# Defect d07: fork() failing with EMFILE leaked a detached descriptor and raised a bare OSError.
_FORK_EMFILE = """
import anyfork, gc, helpers, json, resource
tpl = anyfork.new_exec()
gc.collect()
before = helpers.open_fds()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
free = [n for n in range(max(before) + FREE + 2) if n not in before]
resource.setrlimit(resource.RLIMIT_NOFILE, (free[FREE], hard))  # FREE numbers left
try:
    tpl.fork()
    raised, is_error = None, False
except Exception as e:
    raised, is_error = type(e).__name__, isinstance(e, anyfork.Error)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
gc.collect()
leaked = {fd: t for fd, t in helpers.open_fds().items() if before.get(fd) != t}
tpl.close()
tpl.wait(5)
print(json.dumps({"raised": raised, "is_error": is_error, "leaked": leaked}))
"""


@pytest.mark.parametrize("free", [
    pytest.param(0, id="command-socketpair"),
    pytest.param(2, id="report-channel-socketpair"),
])
def test_fork_out_of_descriptors_raises_error_and_leaks_nothing(free: int) -> None:
    facts = run_caller(_FORK_EMFILE.replace("FREE", str(free)), timeout=20)
    assert facts["raised"] is not None, f"setup: fork() succeeded: {facts}"
    assert facts["is_error"], f"fork() raised {facts['raised']}, not anyfork.Error: {facts}"
    assert facts["leaked"] == {}, f"descriptors leaked: {facts}"


# Defect d11: an exited new_exec child stayed a zombie across most calls into anyfork.
_CALLS: dict[str, Callable[[anyfork.Process], object]] = {
    "send_arg": lambda q: q.send_arg("x"),
    "eval": lambda q: q.eval("pass"),
    "require": lambda q: q.require("os"),
    "fork": lambda q: q.fork(),
    "run": lambda q: q.run("helpers:wait_eof"),
    "close": lambda q: q.close(),
}


@pytest.mark.parametrize("call", list(_CALLS))
def test_exited_new_exec_child_is_reaped_by_the_next_call(call: str) -> None:
    q = anyfork.new_exec()  # made first: making a process reaps
    p = anyfork.new_exec()
    pid = p.pid
    p.send_arg("3").run("helpers:exit_with").close()
    assert wait_exited(pid), "setup: the process did not exit"
    assert pid in zombie_children(), "setup: something reaped it already"
    made = _CALLS[call](q)
    try:
        assert pid not in zombie_children(), f"still a zombie after another process's {call}()"
    finally:
        if isinstance(made, socket.socket) or (isinstance(made, anyfork.Process) and made is not q):
            made.close()
        q.close()
        q.wait(5)
    assert p.wait(5) == 3


# Defect d10: a malformed SPARE report leaked the descriptor it carried.
@pytest.mark.parametrize("report", [
    # a SPARE whose payload is the wrong size (first review)
    wire.HEADER.pack(wire.VERSION, wire.SPARE, 1, 8) + bytes(8),
    # a well-formed SPARE whose descriptor is a pipe, not a socket (second review)
    wire.spare_report(1, 12345),
], ids=["short-payload", "pipe-not-socket"])
def test_malformed_spare_report_is_corrupt_and_closes_the_descriptor_it_carried(report: bytes) -> None:
    mine, theirs = socket.socketpair()
    r, w = os.pipe()
    reports = None
    state = TemplateState()
    state.spawn(False)  # so that a SPARE for #1 is expected
    try:
        reports = ReportChannel(mine, state)
        theirs.sendmsg([report], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        os.close(w)
        w = -1
        run_blocking(reports.until_op(lambda: state.ended is not None, deadline_after(1)))
        assert state.ended is not None, "the malformed SPARE was accepted"
        assert state.corrupt, f"the channel ended, but not as corrupt: {state.ended}"
        os.set_blocking(r, False)
        try:
            data = os.read(r, 1)
        except BlockingIOError:
            pytest.fail("the pipe's write end, received with the report, is still open")
        assert data == b""
    finally:
        if reports is not None:
            reports.end("test over")
        mine.close()
        theirs.close()
        os.close(r)
        if w >= 0:
            os.close(w)


# --- second review ----------------------------------------------------------------------


# Defect r2-handlers: a fork_template template kept the program's SIGTERM handler: kill() did nothing.
_FORK_TEMPLATE_FLAG_HANDLER = """
import anyfork, json, signal
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # a shutdown flag
tpl = anyfork.fork_template()
child = tpl.fork()  # never run
def killed(p):
    p.kill()
    try:
        return p.wait(3)
    except anyfork.TimeoutExpired:
        p.kill(signal.SIGKILL)  # clean up what the test started
        p.wait(5)
        return None
facts = {"child": killed(child), "template": killed(tpl)}
print(json.dumps(facts))
"""


def test_fork_template_and_its_unrun_child_die_of_kill_despite_a_sigterm_handler() -> None:
    facts = run_caller(_FORK_TEMPLATE_FLAG_HANDLER, timeout=30)
    assert facts["child"] == -signal.SIGTERM, f"the unrun child survived kill(): {facts}"
    assert facts["template"] == -signal.SIGTERM, f"the template survived kill(): {facts}"


# Defect r2-ctrunc: out of descriptors as a SPARE arrived ended the default template's report channel.
_SPARE_WHILE_OUT_OF_FDS = """
import anyfork, helpers, json, os, resource, select, time
from anyfork import _process, _runtime
anyfork.new().close()
tpl = _runtime.runtime.default
deadline = time.monotonic() + 5
while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
    helpers.pump(tpl, 0.1)
p = anyfork.new()  # takes a process forked ahead; a SPAWN asks for its replacement
s = p.eval("def f(s):\\n    s.recv(1)\\n").run("f")
queued = bool(select.select([tpl._tpl.reports.fileno()], [], [], 5)[0])
time.sleep(0.2)  # the replacement's SPARE, with its descriptor, waits for us
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # restored below
hog = helpers.exhaust_descriptors(64)
try:
    p.wait(0.2)
    during = "returned"
except Exception as e:
    during = type(e).__name__
for fd in hog:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
ended = tpl._tpl.state.ended
s.close()
try:
    after = p.wait(5)
except Exception as e:
    after = type(e).__name__
print(json.dumps({"queued": queued, "during": during, "ended": ended, "after": after}))
"""


def test_report_channel_survives_running_out_of_descriptors_as_a_spare_arrives() -> None:
    facts = run_caller(_SPARE_WHILE_OUT_OF_FDS, timeout=30)
    assert facts["queued"], f"setup: no SPARE report was waiting: {facts}"
    assert facts["ended"] is None, f"the report channel ended: {facts}"
    assert facts["after"] == 0, f"wait() once descriptors were freed: {facts}"


# Defect r2-inflight: closing a template left its forked-ahead processes still on their way alive.
_CLOSE_WITH_SPAWNS_IN_FLIGHT = """
import anyfork.early  # first, on purpose
import anyfork, ctypes, json, os, signal, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans become ours

def live_children():
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.append(int(d))
    return sorted(out)

tpl = anyfork.early.process
p = anyfork.new()  # the early process becomes the default template: SPAWNs in flight
p.close()
tpl.close()
status = tpl.wait(5)
deadline = time.monotonic() + 2
while (left := live_children()) and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in left:
    os.kill(pid, signal.SIGKILL)  # clean up what the test started
print(json.dumps({"status": status, "left": left}))
"""


def test_closing_the_early_template_lets_go_of_processes_forked_ahead_on_their_way() -> None:
    facts = run_caller(_CLOSE_WITH_SPAWNS_IN_FLIGHT, timeout=30)
    assert facts["status"] == 0, facts
    assert facts["left"] == [], f"processes forked ahead outlived their closed template: {facts}"


# Defect r2-pool-shrink: forked-ahead processes that died were never replaced; the pool stayed empty.
_POOL_AFTER_SPARES_KILLED = """
import anyfork, helpers, json, os, signal, time
from anyfork import _process, _runtime
anyfork.new().close()
tpl = _runtime.runtime.default

def fill_pool():
    deadline = time.monotonic() + 5
    while len(tpl._tpl.state.pool) < _process._POOL and time.monotonic() < deadline:
        helpers.pump(tpl, 0.1)
    return len(tpl._tpl.state.pool)

before = fill_pool()
killed = [child.pid for child, _ in tpl._tpl.state.pool.values()]
for pid in killed:
    os.kill(pid, signal.SIGKILL)
for pid in killed:
    helpers.wait_exited(pid, 5)
deadline = time.monotonic() + 5
while tpl._tpl.state.pool and time.monotonic() < deadline:
    helpers.pump(tpl, 0.1)  # their exit reports take them out of the pool
emptied = not tpl._tpl.state.pool
for _ in range(5):
    p = anyfork.new()
    p.run("builtins:id").close()
    p.wait(5)
after = fill_pool()
p = anyfork.new()
from_pool = p._child.pid is not None  # a process forked ahead comes with its pid
p.close()
p.wait(5)
print(json.dumps({"before": before, "killed": len(killed), "emptied": emptied, "after": after,
                  "from_pool": from_pool}))
"""


def test_pool_refills_after_its_processes_forked_ahead_were_killed() -> None:
    facts = run_caller(_POOL_AFTER_SPARES_KILLED, timeout=40)
    assert facts["before"] == facts["killed"] == _process._POOL, f"setup: {facts}"
    assert facts["emptied"], f"setup: the killed processes stayed in the pool: {facts}"
    assert facts["after"] == _process._POOL, f"the pool never refilled: {facts}"
    assert facts["from_pool"], f"new() no longer hands out processes forked ahead: {facts}"


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


# Defect r2-emfile: out of descriptors, new_exec(), the first new() and fork_template() raised a bare OSError.
_EMFILE_CALL = """
import anyfork, helpers, json, os, resource
call = getattr(anyfork, NAME)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # restored below
hog = helpers.exhaust_descriptors(64)
os.close(hog.pop())  # one free descriptor: not enough for a socketpair
made = None
try:
    made = call()
    raised, is_error = None, False
except Exception as e:
    raised, is_error = type(e).__name__, isinstance(e, anyfork.Error)
for fd in hog:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if made is not None:
    made.close()
    made.wait(5)
print(json.dumps({"raised": raised, "is_error": is_error}))
"""


@pytest.mark.parametrize("name", ["new_exec", "new", "fork_template"])
def test_out_of_descriptors_raises_anyfork_error(name: str) -> None:
    facts = run_caller(_EMFILE_CALL.replace("NAME", repr(name)), timeout=30)
    assert facts["raised"] is not None, f"setup: {name}() succeeded: {facts}"
    assert facts["is_error"], f"{name}() raised {facts['raised']}, not anyfork.Error"


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


# Defect r2-pth-early: under anyfork.early, new_exec() ran a hook again the early process had run.
_EARLY_SITE_TWICE = """
import anyfork.early  # first, on purpose
import anyfork, helpers, json, site
site.addsitedir(DIR)  # runs count.pth here: the hook counts 1
import anyfork_pth_count
code = "import anyfork_pth_count\\ndef f(s):\\n    s.sendall(str(anyfork_pth_count.count).encode())\\n"
counts = {"caller": anyfork_pth_count.count}
for name, make in (("new", anyfork.new), ("new_exec", anyfork.new_exec)):
    p = make().eval(code)
    s = p.run("f")
    counts[name] = int(helpers.read_all(s))
    s.close()
    p.wait(5)
print(json.dumps(counts))
"""


def test_hook_is_not_run_twice_in_processes_of_the_early_process(tmp_path: Path) -> None:
    (tmp_path / "anyfork_pth_count.py").write_text(
        "count = 0\n\ndef bump():\n    global count\n    count += 1\n")
    (tmp_path / "count.pth").write_text("import anyfork_pth_count; anyfork_pth_count.bump()\n")
    facts = run_caller(_EARLY_SITE_TWICE.replace("DIR", repr(str(tmp_path))), timeout=30)
    assert facts == {"caller": 1, "new": 1, "new_exec": 1}, f"times the hook ran: {facts}"


# Defect r2-early-lock: in a process of the early process, another thread importing anyfork.early hung.
_EARLY_IMPORT_IN_THREAD = """
import anyfork.early  # first, on purpose
import anyfork, helpers, json
p = anyfork.new_exec().eval(
    "import threading\\n"
    "def job(sock):\\n"
    "    def imp():\\n"
    "        import anyfork.early\\n"
    "    t = threading.Thread(target=imp, daemon=True)\\n"
    "    t.start()\\n"
    "    t.join(3)\\n"
    "    sock.sendall(b'hung' if t.is_alive() else b'imported')\\n")
s = p.run("job")
said = helpers.read_all(s, 8).decode()
s.close()
try:
    status = p.wait(3)
except anyfork.TimeoutExpired:
    p.kill(9)
    status = p.wait(5)
print(json.dumps({"said": said, "status": status}))
"""


def test_thread_importing_anyfork_early_in_a_process_of_the_early_process_completes() -> None:
    facts = run_caller(_EARLY_IMPORT_IN_THREAD, timeout=30)
    assert facts["said"] == "imported", f"the thread's import did not complete: {facts}"


# Defect r2-pidfd: a run_async process reaped once its loop was closed leaked its pidfd.
_PIDFD_AFTER_LOOP_CLOSED = """
import anyfork, asyncio, gc, json, os

def pidfds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "pidfd" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(int(fd))
        except OSError:
            pass
    return sorted(out)

loop = asyncio.new_event_loop()
before = pidfds()
for _ in range(3):
    p = anyfork.new_exec().eval("def f(s):\\n    s.recv(1)\\n")
    s = loop.run_until_complete(p.run_async("f"))
    s.close()
    p.wait(5)  # reaped here, outside the loop
loop.close()
del p
gc.collect()
print(json.dumps({"before": before, "after": pidfds()}))
"""


def test_run_async_process_reaped_after_its_loop_closed_leaves_no_pidfd() -> None:
    facts = run_caller(_PIDFD_AFTER_LOOP_CLOSED, timeout=30)
    assert facts["after"] == facts["before"], f"pidfds left open: {facts}"


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


def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < n and (more := sock.recv(n - len(data))):
        data += more
    return data


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


# Defect r3-caller-timeout: under socket.setdefaulttimeout() in the caller, the sockets it handed
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
    tpl = anyfork.new_exec().eval("import socket\nsocket.setdefaulttimeout(5)\n")
    for _ in range(4):  # forked from twice without a change: it forks ahead from then on
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


# Defect r4-caller-timeout: under the caller's socket.setdefaulttimeout(), the sockets run() returned
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

"""Security (issue 5, items 11 and 12): kill() never reaches a recycled pid,
and no socket anyone else could connect to is ever created."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

import pytest

import anyfork

BLOCK = "def block(s, *a):\n    s.recv(1)\n"
QUIT = "def quit(s, *a):\n    pass\n"
ECHO = "def echo(s, *a):\n    s.sendall(b'ok')\n"

# --- 11. kill() and pid reuse ------------------------------------------------------------------


class _SignalSpy:
    """Record how the caller sends signals; os.kill is forbidden outright."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        real = signal.pidfd_send_signal

        def pidfd_send_signal(fd: int, sig: int, *args: object) -> None:
            self.calls.append(("pidfd", sig))
            real(fd, sig, *args)

        def kill(pid: int, sig: int) -> None:
            self.calls.append(("kill", sig))
            raise AssertionError(f"the caller used os.kill({pid}, {sig})")

        monkeypatch.setattr(signal, "pidfd_send_signal", pidfd_send_signal)
        monkeypatch.setattr(os, "kill", kill)


@pytest.mark.skipif(not hasattr(signal, "pidfd_send_signal"), reason="no pidfd on this platform")
def test_kill_direct_child_goes_through_its_pidfd(monkeypatch):
    spy = _SignalSpy(monkeypatch)
    p = anyfork.new_exec().eval(BLOCK)
    with p.run("block"):
        p.kill(signal.SIGKILL)
        assert p.wait(5) == -9
    assert spy.calls == [("pidfd", signal.SIGKILL)]
    p.kill(signal.SIGKILL)  # exited and reaped: nothing is sent
    p.kill()
    assert spy.calls == [("pidfd", signal.SIGKILL)]


@pytest.mark.parametrize("kind", ["new", "fork"])
def test_kill_forked_child_goes_through_its_template(monkeypatch, make_proc, kind):
    p = make_proc(kind).eval(BLOCK)
    with p.run("block"):
        spy = _SignalSpy(monkeypatch)
        p.kill(signal.SIGKILL)
        assert p.wait(5) == -9
        p.kill(signal.SIGKILL)  # known to have exited: nothing is sent
    assert spy.calls == [], "the caller signalled a forked child itself"


def _ns_last_pid_writable() -> bool:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "r+") as f:
            f.write(f.read())
    except OSError:
        return False
    return True


def _victim_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """Start a process that gets exactly ``pid`` (forced pid reuse)."""
    for _ in range(20):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        victim = subprocess.Popen(["sleep", "30"])
        if victim.pid == pid:
            return victim
        victim.kill()
        victim.wait(5)
    return None


needs_pid_reuse = pytest.mark.skipif(
    not _ns_last_pid_writable(), reason="can't force pid reuse (needs write access to ns_last_pid)")


def _exited_direct_child(h, reaped_by: str) -> tuple[anyfork.Process, int]:
    """A new_exec'd process that exited and was reaped, by anyfork or by the
    host program behind anyfork's back (as a SIGCHLD handler reaping with
    waitpid(-1) does)."""
    p = anyfork.new_exec().eval(QUIT)
    pid = p.pid
    p.run("quit").close()
    if reaped_by == "anyfork":
        assert p.wait(5) == 0
    else:
        h.until(lambda: h.proc_state(pid) == "Z", 5, "the child exits")
        os.waitpid(pid, 0)
    return p, pid


@needs_pid_reuse
@pytest.mark.parametrize("reaped_by", ["anyfork", "host"])
def test_kill_after_exit_never_hits_a_recycled_pid_direct(h, reaped_by):
    p, pid = _exited_direct_child(h, reaped_by)
    victim = _victim_with_pid(pid)
    if victim is None:
        pytest.skip(f"could not get pid {pid} reused")
    try:
        try:
            p.kill(signal.SIGKILL)
        except (anyfork.Error, OSError):
            pass  # whether it may raise is the next test's business
        with pytest.raises(subprocess.TimeoutExpired):
            victim.wait(0.3)
    finally:
        victim.kill()
        victim.wait(5)


@needs_pid_reuse
def test_kill_after_host_reaped_raises_no_bare_oserror(h):
    """kill() on a process that is gone is quiet (like Popen.send_signal), or
    at most an anyfork error; never a bare ProcessLookupError, even when its
    pid now belongs to another child of the program."""
    p, pid = _exited_direct_child(h, "host")
    victim = _victim_with_pid(pid)
    if victim is None:
        pytest.skip(f"could not get pid {pid} reused")
    try:
        try:
            p.kill(signal.SIGTERM)
        except anyfork.Error:
            pass
    finally:
        victim.kill()
        victim.wait(5)


@needs_pid_reuse
def test_wait_never_reaps_a_recycled_pid(h):
    """Once the host reaped anyfork's child and the pid went to another child
    of the program, wait() must not collect that one's exit status."""
    p, pid = _exited_direct_child(h, "host")
    for _ in range(20):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        victim = subprocess.Popen(["sh", "-c", "exit 7"])
        if victim.pid == pid:
            break
        victim.wait(5)
    else:
        pytest.skip(f"could not get pid {pid} reused")
    h.until(lambda: h.proc_state(pid) == "Z", 5, "the other child exits")
    try:
        status = p.wait(2)
    except anyfork.ExitStatusLostError:
        status = None
    assert victim.wait(5) == 7, "anyfork reaped another child's exit status"
    assert status is None, f"wait() reported {status}, the status of an unrelated process"


@needs_pid_reuse
@pytest.mark.parametrize("kind", ["new", "fork"])
def test_kill_after_exit_never_hits_a_recycled_pid_forked(h, make_proc, kind):
    p = make_proc(kind).eval(QUIT)
    with p.run("quit"):
        pid = p.pid
    h.until(lambda: h.proc_state(pid) is None, 5, "its template reaps it")
    victim = _victim_with_pid(pid)
    if victim is None:
        pytest.skip(f"could not get pid {pid} reused")
    try:
        p.kill(signal.SIGKILL)
        with pytest.raises(subprocess.TimeoutExpired):
            victim.wait(0.3)
        assert p.wait(5) == 0
    finally:
        victim.kill()
        victim.wait(5)


# --- 12. no socket anyone else could reach ----------------------------------------------------

_SO_ACCEPTCON = 0x10000


def _unix_table() -> dict[int, tuple[int, str]]:
    """inode -> (flags, path) for every AF_UNIX socket in this network namespace."""
    table = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            path = parts[7] if len(parts) > 7 else ""
            table[int(parts[6])] = (int(parts[3], 16), path)
    return table


def _socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


USE_ALL = """
import os
def serve(s, *items):
    s.recv(1)
"""


@pytest.mark.skipif(not os.path.exists("/proc/net/unix"), reason="needs /proc/net/unix")
def test_no_named_abstract_or_listening_socket_is_ever_created(h, monkeypatch, tmp_path):
    named_before = {i for i, (_, path) in _unix_table().items() if path}
    # In the caller, not even a transient one: bind/listen/connect are never called.
    calls: list[str] = []
    for name in ("bind", "listen", "connect", "connect_ex"):
        real = getattr(socket.socket, name)

        def spy(self, *args, _name=name, _real=real):
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(socket.socket, name, spy)

    # Every feature, with every process left waiting so its sockets still exist.
    a, b = socket.socketpair()
    r, w = os.pipe()
    f = open(tmp_path / "f", "wb")
    socks, procs, templates = [], [], []
    try:
        def prepare(p: anyfork.Process) -> anyfork.Process:
            return p.require("json").eval(USE_ALL).send_fh(a, r, f).send_arg(b"x", "y")

        procs.append(prepare(anyfork.new()))
        procs.append(prepare(anyfork.new_exec()))
        tpl = anyfork.new_exec().require("os")
        templates.append(tpl)
        procs.append(prepare(tpl.fork()))
        tpl2 = anyfork.new().require("os")
        templates.append(tpl2)
        procs.append(prepare(tpl2.fork()))
        socks += [p.run("serve") for p in procs]

        async def run_async() -> list[socket.socket]:
            return [await prepare(anyfork.new()).run_async("serve"),
                    await prepare(anyfork.new_exec()).run_async("serve")]

        socks += asyncio.run(run_async())
        killed = prepare(tpl.fork())
        socks.append(killed.run("serve"))
        killed.kill()
        assert killed.wait(5) == -signal.SIGTERM
        unrun = prepare(anyfork.new())
        assert unrun.pid > 0  # forked, never run

        family = [os.getpid(), *h.descendants(os.getpid())]
        ours = _socket_inodes(family)
        table = _unix_table()
        assert ours, "found none of our sockets"
        named = {i: table[i][1] for i in ours if i in table and table[i][1]}
        listening = [i for i in ours if i in table and table[i][0] & _SO_ACCEPTCON]
        assert not named, f"named or abstract sockets: {named}"
        assert not listening, f"listening sockets: {listening}"
        new_named = {i for i, (_, path) in table.items() if path} - named_before
        assert not (new_named & ours)
        assert not calls, f"the caller called {calls}"
        unrun.close()
    finally:
        for s in socks:
            s.close()
        for p in procs:
            p.wait(5)
        for t in templates:
            t.close()
        a.close()
        b.close()
        os.close(r)
        os.close(w)
        f.close()

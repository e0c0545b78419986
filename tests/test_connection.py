"""A remote connection through a real OpenSSH server on loopback (_connection)."""

from __future__ import annotations

import ast
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import sshd
from anyfork import Error, ProtocolError
from anyfork import _connection as C
from anyfork import _protocol as P
from helpers import wait_exited

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.usefixtures("check_leaks")
TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def hosts() -> Iterator[sshd.Hosts]:
    h = sshd.hosts_or_skip("host1")
    yield h
    h.close()


@pytest.fixture
def conn(hosts: sshd.Hosts) -> Iterator[C.Connection]:
    c = C.Connection(hosts.ssh("host1", sys.executable))
    yield c
    c.close()


def send(sock: socket.socket, parts: list[P.Buffer]) -> None:
    sock.sendall(b"".join(bytes(p) for p in parts))


def test_the_hub_answers_over_ssh(conn: C.Connection) -> None:
    assert conn.hello is not None
    pid, python = conn.hello
    assert python == ".".join(map(str, sys.version_info[:3]))
    assert pid > 0
    assert conn.host == socket.gethostname()  # named in messages by what it says it is


def test_a_remote_process_runs_a_function_and_reports_pid_and_status(conn: C.Connection) -> None:
    remote, sock = conn.serve()
    with sock:
        send(sock, P.items_frame(P.PATH, [TESTS, *sys.path]))
        send(sock, P.run_frame("helpers:pids"))
        sock.settimeout(20)
        reply = b""
        while data := sock.recv(100):
            reply += data
        pid, ppid = ast.literal_eval(reply.decode())
    conn.wait(remote, 20, "exit")
    assert remote.pid == pid
    assert conn.hello is not None
    assert ppid == conn.hello[0]
    assert remote.returncode == 0


def test_kill_through_the_hub(conn: C.Connection) -> None:
    remote, sock = conn.serve()
    with sock:
        conn.wait(remote, 20, "pid")
        conn.kill(remote, signal.SIGKILL)
        conn.wait(remote, 20, "exit")
    assert remote.returncode == -signal.SIGKILL


def test_a_wrong_host_key_fails_with_sshs_words(hosts: sshd.Hosts) -> None:
    (server,) = hosts.servers
    wrong = hosts.dir / "wrong_known_hosts"
    other_key = hosts.dir / "other_key"
    sshd._keygen(other_key)
    wrong.write_text(f"[127.0.0.1]:{server.port} {Path(str(other_key) + '.pub').read_text()}")
    config = hosts.dir / "wrong_config"
    config.write_text(hosts.config.read_text().replace(str(hosts.known_hosts), str(wrong)))
    with pytest.raises(Error, match=r"(?i)host key"):
        C.Connection([sshd.SSH or "ssh", "-F", str(config), "host1", sys.executable])


def test_a_far_side_that_is_not_a_python_fails_clearly(hosts: sshd.Hosts) -> None:
    with pytest.raises(Error, match="failed"):
        C.Connection(hosts.ssh("host1", "/bin/false"), timeout=20)


def test_a_hub_of_another_version_is_refused(conn: C.Connection, monkeypatch: pytest.MonkeyPatch,
                                             hosts: sshd.Hosts) -> None:
    monkeypatch.setattr(C, "VERSION", 99)
    with pytest.raises(ProtocolError, match="protocol 1"):
        C.Connection(hosts.ssh("host1", sys.executable))


def test_killing_ssh_ends_the_remote_processes(conn: C.Connection) -> None:
    remote, sock = conn.serve()
    with sock:
        send(sock, P.items_frame(P.EVAL, ["import time\nwhile True: time.sleep(1)"]))
        conn.wait(remote, 20, "pid")
        assert conn.hello is not None
        hub = conn.hello[0]
        os.kill(conn.pid, signal.SIGKILL)  # the connection drops
        sock.settimeout(10)
        assert sock.recv(10) == b""  # the caller's end sees it at once
        assert remote.pid is not None
        for pid in (hub, remote.pid):
            assert wait_exited(pid, 5), f"remote process {pid} outlived the connection"
    conn.wait(remote, 5, "exit")
    assert remote.failed is not None


def _run_remote(conn: C.Connection, frames: list[list[P.Buffer]]) -> tuple[C.Remote, bytes]:
    remote, sock = conn.serve()
    with sock:
        for parts in frames:
            send(sock, parts)
        sock.settimeout(20)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    conn.wait(remote, 20, "exit")
    return remote, reply


def test_a_module_only_the_caller_has_is_sent_on_demand(conn: C.Connection, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "callers_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("GREETING = 'from the caller'\n")
    (pkg / "tool.py").write_text(
        "import socket\nfrom callers_pkg import GREETING\n\n"
        "def answer(sock: socket.socket) -> None:\n"
        "    sock.sendall((GREETING + ' ' + __file__).encode())\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the caller's side only: no PATH is sent
    remote, reply = _run_remote(conn, [P.items_frame(P.REQUIRE, ["callers_pkg.tool"]),
                                       P.run_frame("callers_pkg.tool:answer")])
    assert remote.returncode == 0, conn.stderr()
    assert reply == f"from the caller {pkg / 'tool.py'}".encode()


def test_a_module_nobody_has_fails_with_the_ordinary_error(conn: C.Connection) -> None:
    remote, _ = _run_remote(conn, [P.items_frame(P.REQUIRE, ["no_such_module_anywhere_x"])])
    assert remote.returncode == 1
    # ssh passes the remote stderr on through a pipe of its own, beside the
    # channel the exit came on: it may arrive a moment after the exit.
    deadline = time.monotonic() + 10
    while "No module named" not in conn.stderr() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "No module named 'no_such_module_anywhere_x'" in conn.stderr()


def test_the_answer_for_a_c_extension_says_it_cannot_be_sent() -> None:
    from anyfork import _importer

    assert _importer.answer("_json").startswith(b"NO module '_json' is a C extension")
    assert _importer.answer("no_such_module_anywhere_x").startswith(b"NO missing")
    ok = _importer.answer("json")
    assert ok.startswith(b"OK pkg ")
    assert b"def dumps" in ok.partition(b"\0")[2]


def test_a_failure_record_the_hub_does_not_hold_is_asked_for_once(conn: C.Connection) -> None:
    # The caller asks the hub to forward what it holds (SYNC) only while
    # the hub has not answered for that process: then it is a plain status 1.
    assert conn.hello is not None
    hub = conn.hello[0]
    key = (999_999, None, 0)
    os.kill(hub, signal.SIGSTOP)  # it is there, and says nothing
    try:
        n = conn.sync_for(key)
        assert n is not None
        assert not conn.settled(key, n), "settled without the hub's answer"
    finally:
        os.kill(hub, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while not conn.settled(key, n):
        assert time.monotonic() < deadline, "no SYNCED from the hub"
        time.sleep(0.01)
    assert conn.failure(*key) is None
    assert conn.sync_for(key) is None, "asked the hub again"


def test_asking_for_a_failure_record_after_the_connection_ended_returns_at_once(
        conn: C.Connection) -> None:
    assert conn.hello is not None
    os.kill(conn.hello[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while conn.ended is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.ended is not None
    assert conn.sync_for((999_999, None, 0)) is None  # nothing to wait for
    assert conn.failure(999_999, None, 0) is None


def test_a_connection_closes_when_its_descriptors_are_numbered_past_1024(hosts: sshd.Hosts) -> None:
    # Broke: waiting for ssh's exit used select() on a pidfd, which raises
    # ValueError for a descriptor of 1024 or more: close() failed half-way,
    # leaving ssh a zombie and the connection's descriptors open.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on descriptors is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler: list[int] = []
    try:
        while (fd := os.dup(0)) < 1030:
            filler.append(fd)
        os.close(fd)
        c = C.Connection(hosts.ssh("host1", sys.executable))
        assert c.hello is not None
        c.close()  # its pidfd is numbered past 1024
        with pytest.raises(ChildProcessError):
            os.waitpid(c.pid, os.WNOHANG)  # reaped
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connection_that_fails_while_ssh_connects_leaves_nothing_behind(
        hosts: sshd.Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    # The preamble is made after ssh is spawned (so that compiling it
    # overlaps the connect): a failure there (Ctrl-C, a file that can't be
    # read) must end ssh and close everything (check_leaks checks).
    from anyfork import _exec

    def interrupted(*args: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(_exec, "preamble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.Connection(hosts.ssh("host1", sys.executable))

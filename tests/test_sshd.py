"""The throwaway sshd the remote tests use (tests/sshd.py): it must work in CI, never skip there."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest

import sshd

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def hosts() -> Iterator[sshd.Hosts]:
    h = sshd.hosts_or_skip("host1", "host2")
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("alias", ["host1", "host2"])
def test_each_server_runs_a_remote_python(hosts: sshd.Hosts, alias: str) -> None:
    argv = hosts.ssh(alias, sshd.remote_python(), "-S", "-c", "'import os; print(os.getpid())'")
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


def test_the_servers_are_two_hosts(hosts: sshd.Hosts) -> None:
    ports = {s.port for s in hosts.servers}
    assert len(ports) == 2


def test_a_wrong_host_key_is_refused(hosts: sshd.Hosts) -> None:
    # host1's address with host2's key: what a man in the middle would show.
    host1, host2 = hosts.servers
    wrong = hosts.dir / "wrong_known_hosts"
    key2 = (host2.host_key.parent / "host_ed25519.pub").read_text()
    wrong.write_text(f"[127.0.0.1]:{host1.port} {key2}")
    other = hosts.dir / "wrong_config"
    other.write_text(hosts.config.read_text().replace(str(hosts.known_hosts), str(wrong)))
    out = subprocess.run([sshd.SSH or "ssh", "-F", str(other), "host1", "true"], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=30, check=False)
    assert out.returncode == 255
    assert b"host key" in out.stderr.lower()


def test_no_password_authentication(hosts: sshd.Hosts) -> None:
    # Without the user key, BatchMode and public keys only: refused, never a prompt.
    config = hosts.config.read_text().replace(f"IdentityFile {hosts.user_key}", "IdentityFile /dev/null")
    other = hosts.dir / "nokey_config"
    other.write_text(config)
    out = subprocess.run([sshd.SSH or "ssh", "-F", str(other), "host1", "true"], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=30, check=False)
    assert out.returncode == 255
    assert b"permission denied" in out.stderr.lower()

"""A throwaway OpenSSH server on 127.0.0.1, for the tests of remote processes and the bench.

Each ``Sshd`` runs its own ``sshd -D -e`` on a free loopback port, with host
and user keys made for it in a temporary directory, its own sshd_config
(public keys only: no password, no keyboard-interactive, no PAM), and an
ssh_config that names it as a host alias with ``BatchMode=yes``,
``StrictHostKeyChecking=yes`` and a known_hosts file holding exactly its
host key.  Nothing of the system's configuration is read or changed:
``ssh -F CONFIG ALIAS`` reaches it and nothing else.

Several ``Sshd`` share one ssh_config when made from one ``Hosts``, so
that two servers stand in for two hosts.

Not part of anyfork's API, and never imported by it: tests/sshd.py (the
tests' fixture) and ``_bench_remote`` use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = shutil.which("sshd") or next(
    (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
SSH = shutil.which("ssh")
KEYGEN = shutil.which("ssh-keygen")


def available() -> str | None:
    """Why no sshd can run here, or None when one can."""
    missing = [name for name, path in (("sshd", SSHD), ("ssh", SSH), ("ssh-keygen", KEYGEN)) if not path]
    if missing:
        return (f"OpenSSH not installed ({', '.join(missing)}): "
                "apt-get install openssh-server openssh-client")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    assert KEYGEN is not None
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "anyfork-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, timeout=30)


class Hosts:
    """A directory of throwaway keys and one ssh_config for every server made from it."""

    def __init__(self) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.dir = Path(tempfile.mkdtemp(prefix="anyfork-sshd-"))
        self.dir.chmod(0o700)
        self.user_key = self.dir / "id_user"
        _keygen(self.user_key)
        self.config = self.dir / "ssh_config"
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("")
        self.config.write_text("")
        self.servers: list[Sshd] = []

    def start(self, alias: str) -> Sshd:
        server = Sshd(self, alias)
        self.servers.append(server)
        return server

    def ssh(self, alias: str, *remote: str) -> list[str]:
        """The argv that runs ``remote`` on ``alias`` (ssh joins the words with spaces: quote them)."""
        assert SSH is not None
        return [SSH, "-F", str(self.config), alias, *remote]

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sshd:
    """One sshd on 127.0.0.1, reachable as ``alias`` through ``hosts.config``."""

    def __init__(self, hosts: Hosts, alias: str) -> None:
        assert SSHD is not None
        self.hosts = hosts
        self.alias = alias
        here = hosts.dir / alias
        here.mkdir(mode=0o700)
        self.host_key = here / "host_ed25519"
        _keygen(self.host_key)
        authorized = here / "authorized_keys"
        authorized.write_text(Path(str(hosts.user_key) + ".pub").read_text())
        authorized.chmod(0o600)
        self.port = _free_port()
        self.log = here / "sshd.log"
        cfg = here / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {here / 'sshd.pid'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",  # the key files live in a temporary directory
            "PrintMotd no",
            "AcceptEnv LANG LC_*",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LogLevel VERBOSE",
            "",
        ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation needs it
        with hosts.known_hosts.open("a") as f:
            f.write(f"[127.0.0.1]:{self.port} {Path(str(self.host_key) + '.pub').read_text()}")
        with hosts.config.open("a") as f:
            f.write("\n".join([
                f"Host {alias}",
                "  HostName 127.0.0.1",
                f"  Port {self.port}",
                f"  User {_user()}",
                f"  IdentityFile {hosts.user_key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {hosts.known_hosts}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                "  PasswordAuthentication no",
                "  ConnectTimeout 10",
                "  ServerAliveInterval 5",
                "  LogLevel ERROR",
                "",
            ]))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        self._await_listening()

    def _await_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"sshd did not listen on port {self.port} within {timeout} s: {self.log.read_text()}")

    def ssh(self, *remote: str) -> list[str]:
        return self.hosts.ssh(self.alias, *remote)

    def stop(self) -> None:
        """Stop the server and every session it still runs (they share its session id)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name

"""The examples in examples/ run, show what they claim, and leave nothing behind.

Each example runs as its own program, in a session of its own, so that any
process it leaves running (a template, a spare, a worker) can be found by
its session id afterwards.  It runs in development mode with warnings as
errors, so an unclosed descriptor shows up on its stderr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parens.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def run_example(name: str, tmp_path: Path, *args: str, script: Path | None = None,
                cwd: Path = ROOT) -> str:
    """Run examples/<name>.py (or ``script``) with ``args``, from the
    repository root (or ``cwd``); its stdout.

    Output goes to files, not pipes: a process left behind would hold a pipe
    open, and reading it to EOF would wait for that process instead of
    catching it.
    """
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-X", "dev", "-W", "error", str(script or EXAMPLES / f"{name}.py"), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out_f,
            stderr=err_f,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=30)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Whatever the example started must go away on its own, and soon.
        deadline = time.monotonic() + 5
        while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert err == "", err
    assert not left, f"{name} left processes running: {left}"
    return out


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _check_one_file(out: str) -> None:
    assert out.splitlines() == ["worker said: HELLO", "worker said: WORLD", "worker exited with status 0"]


def test_one_file(tmp_path: Path) -> None:
    _check_one_file(run_example("one_file", tmp_path))


def test_the_readmes_first_example_works_copied_anywhere(tmp_path: Path) -> None:
    """What a new user does: copy the README's first program into a file of
    their own, in a directory of their own, and run it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^```python\n(.*?)^```", readme, re.M | re.S)
    assert first is not None
    code = first.group(1)
    assert "def " in code
    assert "anyfork.new()" in code
    workdir = tmp_path / "mine"
    workdir.mkdir()
    script = workdir / "my_program.py"
    script.write_text(code, encoding="utf-8")
    _check_one_file(run_example("my_program", tmp_path, script=script, cwd=workdir))


def test_single_worker(tmp_path: Path) -> None:
    out = run_example("single_worker", tmp_path)
    replies = re.findall(r"^worker said: (\w+) \(from pid (\d+)\)$", out, re.M)
    assert [word for word, _ in replies] == ["HELLO", "WORLD"]
    worker_pid, caller_pid = map(int, re.search(r"^worker pid (\d+), caller pid (\d+)$", out, re.M).groups())
    # The answers came from the process run() started, not from the caller.
    assert {int(pid) for _, pid in replies} == {worker_pid}
    assert worker_pid != caller_pid
    assert "worker exited with status 0" in out


def test_server_pool(tmp_path: Path) -> None:
    out = run_example("server_pool", tmp_path)
    pids = [int(p) for p in re.search(r"^workers: ([\d ]+)$", out, re.M).group(1).split()]
    assert len(pids) == 4
    assert len(set(pids)) == 4
    answers = re.findall(r"^client got: hello from worker (\d+) \(pid (\d+)\)$", out, re.M)
    # Four clients held open at once: four different workers accepted them,
    # each known by the id it was sent and the pid anyfork reported for it.
    assert sorted(int(worker_id) for worker_id, _ in answers) == [1, 2, 3, 4]
    for worker_id, pid in answers:
        assert pids[int(worker_id) - 1] == int(pid)
    # kill() sent SIGTERM, and wait() reported it in subprocess's convention.
    assert f"exit statuses: {[-signal.SIGTERM] * 4}" in out


def test_fork_exec(tmp_path: Path) -> None:
    out = run_example("fork_exec", tmp_path)
    assert "echo exited with status 0" in out
    assert "stderr: (empty)" in out
    match = re.search(r"^(/\S+) contains: 'hi\\n'$", out, re.M)
    assert match, out
    # The output file lived in a temporary directory, removed on the way out.
    assert not Path(match.group(1)).parent.exists()


def test_rpc(tmp_path: Path) -> None:
    out = run_example("rpc", tmp_path)
    # Events came before the result of the call that sent them, in order.
    lines = out.splitlines()
    assert lines[:5] == [
        "event: counted 1 'the'", "event: counted 2 'quick'", "event: counted 3 'brown'",
        "event: counted 4 'fox'", "result: 4",
    ]
    # The handler's ValueError came back as a ValueError, and the worker went on.
    assert "error: no words in an empty text" in lines
    worker_pid, caller_pid = map(int, re.search(r"^worker pid (\d+) caller pid (\d+)$", out, re.M).groups())
    assert worker_pid != caller_pid
    assert "worker exited with status 0" in lines
    assert "async results: [2, 3]" in lines
    assert "async events: 5" in lines
    assert "async worker exited with status 0" in lines


def test_pool(tmp_path: Path) -> None:
    out = run_example("pool", tmp_path)
    assert "results: ['word1', 'word10', 'word100', 'word999']" in out  # the template's data
    assert "events: 4" in out  # one from each call, sent by the worker itself


def test_executor(tmp_path: Path) -> None:
    out = run_example("executor", tmp_path)
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49]" in out
    assert "a worker died: 1" in out
    assert "and the executor goes on: 144" in out


def test_remote_runs_on_a_host_over_ssh(tmp_path: Path) -> None:
    import shlex

    import sshd

    hosts = sshd.hosts_or_skip("example")
    try:
        out = run_example("remote", tmp_path, "example", "--python", sys.executable,
                          "--ssh", shlex.join([sshd.SSH or "ssh", "-F", str(hosts.config)]))
    finally:
        hosts.close()
    assert "a forked worker: its parent is the remote template | same host as here" in out  # loopback
    assert "send_fh: send_fh() can't pass descriptors to a process on" in out
    assert "word counts: [4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3]" in out
    assert out.rstrip().endswith("done")

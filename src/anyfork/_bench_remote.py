"""The "Remote" section of ``python -m anyfork bench``: anyfork.remote against its peers.

The bench starts its own sshd on loopback (``_sshd``, as the tests do) and
one job, in a fresh interpreter, measures every row over it:

- connection plus first result: ``remote.new_exec`` then one rpc call;
  execnet: ``makegateway`` then one channel round trip;
- ``fork().run()`` from a remote template, each child exiting at once;
- rpc round trip (one call in flight) and pipelined (submit N, then collect)
  over ssh; execnet's channel the same way;
- an ssh session per process, AnyEvent::Fork::Remote's way: a fresh ssh
  connection running ``python -S -c pass``, and a new session over an
  OpenSSH ControlMaster connection.

Without OpenSSH (or without execnet, part of the ``bench`` extra) the rows
that need it are skipped, with a note.  Loopback measures the protocol and
the processes, not a network.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ._bench_calls import _time_per

if TYPE_CHECKING:
    from collections.abc import Callable

_MARK = "ANYFORK-BENCH-REMOTE "
WIDE = 1024  # max_in_flight of the "pipelined, a wider window" row
ALIAS = "bench"

LABELS = {
    "connect": "connection + first result",
    "fork": "remote template fork().run()",
    "rt": "round trip",
    "pipe": "pipelined",
}


def _warm_up(call: Callable[[], object]) -> None:
    """A few calls before a timed row: the first ones start the far side's
    worker (anyfork's fetches its modules from the caller, execnet compiles
    its code), which "connection + first result" measures, not a round trip.
    Without this, a --quick run's 100 round trips were mostly that start."""
    for _ in range(20):
        call()


# --- anyfork ---------------------------------------------------------------------------


def _anyfork_rows(command: list[str], p: dict[str, Any], rows: dict[str, list[float]]) -> None:
    from anyfork import remote, rpc

    def connect() -> None:
        with rpc.run(remote.new_exec(command), "operator:pos") as client:
            client(0)

    rows.setdefault("connect:anyfork", []).append(_time_per(connect, 0, p["connects"]) * 1e3)

    tpl = remote.template(command).eval("def noop(sock):\n    pass\n")
    try:
        def fork_run() -> None:
            child = tpl.fork()
            with child.run("noop") as sock:
                sock.settimeout(30)
                sock.recv(1)  # EOF: it ran and exited
            child.wait(30)

        fork_run()  # the first fork makes it a template
        rows.setdefault("fork:anyfork", []).append(1 / _time_per(fork_run, p["seconds"], 20))
    finally:
        tpl.close()
        tpl.wait(30)

    with rpc.run(remote.new_exec(command), "operator:pos") as client:
        _warm_up(lambda: client(0))
        rows.setdefault("rt:anyfork", []).append(
            _time_per(lambda: client(0), p["seconds"], 100) * 1e6)
        n = p["pipelined"]
        t = time.perf_counter()
        for f in [client.submit(0) for _ in range(n)]:
            f.result(60)
        rows.setdefault("pipe:anyfork", []).append(n / (time.perf_counter() - t))

    # The same with a window for ssh's latency: at the default 64 calls in
    # flight, the link's round trip bounds the rate (64 per round trip under
    # load), and execnet's channel has no window at all.
    with rpc.run(remote.new_exec(command), "operator:pos", max_in_flight=WIDE) as client:
        _warm_up(lambda: client(0))
        t = time.perf_counter()
        for f in [client.submit(0) for _ in range(n)]:
            f.result(60)
        rows.setdefault("pipe_wide:anyfork", []).append(n / (time.perf_counter() - t))


# --- execnet ----------------------------------------------------------------------------

_ECHO = """
while True:
    x = channel.receive()
    if x is None:
        break
    channel.send(x)
"""


def _execnet_rows(config: str, python: str, p: dict[str, Any], rows: dict[str, list[float]]) -> None:
    import execnet  # type: ignore[import-not-found,unused-ignore]

    spec = f"ssh={ALIAS}//ssh_config={config}//python={python}"

    def connect() -> None:
        gw = execnet.makegateway(spec)
        try:
            ch = gw.remote_exec(_ECHO)
            ch.send(0)
            ch.receive(30)
            ch.send(None)
            ch.waitclose(30)
        finally:
            gw.exit()

    rows.setdefault("connect:execnet", []).append(_time_per(connect, 0, p["connects"]) * 1e3)
    gw = execnet.makegateway(spec)
    try:
        ch = gw.remote_exec(_ECHO)

        def call() -> None:
            ch.send(0)
            ch.receive(30)

        _warm_up(call)
        rows.setdefault("rt:execnet", []).append(_time_per(call, p["seconds"], 100) * 1e6)
        n = p["pipelined"]
        t = time.perf_counter()
        for _ in range(n):
            ch.send(0)
        for _ in range(n):
            ch.receive(60)
        rows.setdefault("pipe:execnet", []).append(n / (time.perf_counter() - t))
        ch.send(None)
        ch.waitclose(30)
    finally:
        gw.exit()


# --- an ssh session per process ----------------------------------------------------------


def _ssh_rows(ssh: list[str], python: str, p: dict[str, Any], rows: dict[str, list[float]]) -> None:
    import subprocess
    import tempfile

    def session(extra: list[str]) -> Callable[[], None]:
        def run() -> None:
            # (Not our stdout: a ControlMaster left running would hold it open.)
            subprocess.run([*ssh[:1], *extra, *ssh[1:], python, "-S", "-c", "pass"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=60)
        return run

    rows.setdefault("fork:ssh", []).append(1 / _time_per(session([]), p["seconds"], p["connects"]))
    with tempfile.TemporaryDirectory(prefix="anyfork-bench-cm-") as d:
        control = ["-o", f"ControlPath={d}/cm", "-o", "ControlMaster=auto", "-o", "ControlPersist=60"]
        session(control)()  # the master
        try:
            rows.setdefault("fork:ssh_cm", []).append(
                1 / _time_per(session(control), p["seconds"], p["connects"]))
        finally:
            subprocess.run([*ssh[:1], *control, "-O", "exit", *ssh[1:]], stdin=subprocess.DEVNULL,
                           capture_output=True, check=False, timeout=30)


def child() -> None:
    """One job: every row, rounds alternating; the sshd is the caller's."""
    import json

    p = json.loads(sys.argv[1])
    ssh = [p["ssh"], "-F", p["config"], ALIAS]
    command = [*ssh, p["python"]]
    rows: dict[str, list[float]] = {}
    notes: list[str] = []
    try:
        import execnet  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        notes.append("execnet rows skipped: execnet is not installed (pip install 'anyfork[bench]')")
        have_execnet = False
    else:
        have_execnet = True
    for _ in range(p["rounds"]):
        _anyfork_rows(command, p, rows)
        if have_execnet:
            _execnet_rows(p["config"], p["python"], p, rows)
        _ssh_rows(ssh, p["python"], p, rows)
    sys.stdout.write(_MARK + json.dumps({"rows": rows, "notes": notes}) + "\n")
    sys.stdout.flush()


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    """Start a loopback sshd, run the job over it; medians per row."""
    import json
    import subprocess

    import anyfork

    from . import _sshd

    result: dict[str, Any] = {"rows": {}, "failed": [], "notes": [], "params": {}}
    reason = _sshd.available()
    if reason:
        result["notes"].append(f"Remote section skipped: {reason}")
        return result
    hosts = _sshd.Hosts()
    try:
        hosts.start(ALIAS)
        params = {"rounds": 1 if quick else rounds, "seconds": 0.05 if quick else 1.0,
                  "connects": 1 if quick else 5, "pipelined": 500 if quick else 20000,
                  "ssh": _sshd.SSH, "config": str(hosts.config), "python": sys.executable}
        result["params"] = {k: params[k] for k in ("rounds", "seconds", "connects", "pipelined")}
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", "from anyfork._bench_remote import child; child()",
                 json.dumps(params)],
                stdout=subprocess.PIPE, env=env, timeout=120 if quick else 1800, check=False)
        except subprocess.TimeoutExpired:
            result["failed"].append("remote: timed out")
            return result
    finally:
        hosts.close()
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith(_MARK) and proc.returncode == 0:
            got = json.loads(line[len(_MARK):])
            result["samples"] = got["rows"]
            result["rows"] = {k: sorted(v)[len(v) // 2] for k, v in got["rows"].items()}
            result["notes"].extend(got["notes"])
            result["targets"] = targets(result["rows"])
            return result
    result["failed"].append(f"remote: the job exited with status {proc.returncode}")
    return result


def targets(rows: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios in this run (None where a row is missing)."""
    def ratio(a: str, b: str) -> float | None:
        return rows[a] / rows[b] if a in rows and b in rows and rows[b] else None

    peer = "fork:ssh_cm" if "fork:ssh_cm" in rows else "fork:ssh"
    wants = [
        ("remote template fork().run() >= 30x an ssh session per process (over a ControlMaster)",
         ratio("fork:anyfork", peer), 30.0),
        ("connection + first result no slower than execnet's",
         ratio("connect:execnet", "connect:anyfork"), 1.0),
        ("rpc round trip no slower than execnet's channel", ratio("rt:execnet", "rt:anyfork"), 1.0),
        ("pipelined at least execnet's", ratio("pipe:anyfork", "pipe:execnet"), 1.0),
        (f"pipelined with max_in_flight={WIDE} at least execnet's (whose channel has no window)",
         ratio("pipe_wide:anyfork", "pipe:execnet"), 1.0),
    ]
    return [{"target": t, "value": v, "met": None if v is None else v >= want} for t, v, want in wants]


def report(remote: dict[str, Any]) -> list[str]:
    """The section's lines."""
    rows = remote["rows"]
    out = ["", "Remote: over ssh to a loopback sshd (connection: lower is better; rates: higher is better)"]
    for n in remote["notes"]:
        out.append(f"  note: {n}")
    if not rows:
        out.extend(f"  FAILED: {f}" for f in remote["failed"])
        return out

    def num(key: str, unit: str) -> str:
        v = rows.get(key)
        if v is None:
            return "-"
        return f"{v:,.1f} {unit}" if v < 100 else f"{v:,.0f} {unit}"

    lines = [["what", "anyfork", "execnet", "ssh session"]]
    lines.append([LABELS["connect"], num("connect:anyfork", "ms"), num("connect:execnet", "ms"), "-"])
    lines.append(["a new remote process that runs and exits", num("fork:anyfork", "/s"), "-",
                  num("fork:ssh", "/s") + " (" + num("fork:ssh_cm", "/s") + " over a ControlMaster)"])
    lines.append([LABELS["rt"], num("rt:anyfork", "µs"), num("rt:execnet", "µs"), "-"])
    lines.append([f"{LABELS['pipe']} ({remote['params']['pipelined']:,} calls)", num("pipe:anyfork", "/s"),
                  num("pipe:execnet", "/s"), "-"])
    lines.append([f"  the same, max_in_flight={WIDE}", num("pipe_wide:anyfork", "/s"), "-", "-"])
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    for i, r in enumerate(lines):
        out.append("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                    enumerate(zip(r, widths, strict=True))))
        if i == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    # The ratios the targets are about; whether they are met is for
    # docs/benchmarks.md to say, as for every other section (the --json
    # output has "met" too).
    for t in remote.get("targets", []):
        value = "    - " if t["value"] is None else f"{t['value']:5.2f}x"
        out.append(f"  {value}  {t['target']}")
    return out

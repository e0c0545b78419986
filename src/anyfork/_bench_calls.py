"""The "Calls" section of ``python -m anyfork bench``: anyfork.rpc against its peers.

One job, in a fresh interpreter, measures every row so that they share the
machine's state; rows alternate round by round.  Each peer serves an
identity function in a second process:

- the limit row: 4-byte length + pickle over a socketpair, thirty lines, no library;
- ``multiprocessing.Pipe`` between two processes;
- ``concurrent.futures.ProcessPoolExecutor(max_workers=1)``;
- ``anyfork.rpc`` with the pickle and the bytes serializer.

A round trip is one call in flight; pipelined is "submit N tiny calls, then
collect the results" (the limit row and Pipe send batches of 256, since they
have no flow control of their own).

Round trips are timed with the job and the peer's processes on one CPU
(Linux; elsewhere where the scheduler puts them).  On a virtual machine, a
wake-up on the other CPU costs some 20 µs more than one on the same CPU, and
where the scheduler happens to put two processes decided most of a tiny
round trip: the limit row alone measured 12 to 45 µs from run to run, and
two rpc clients in one job 23 and 57 µs.  On one CPU a round trip is what
the two sides compute, plus two switches, for every row alike.

Each row's figure is its best sample (see ``best``): round trips are many
short samples, interleaved peer by peer, and pipelined rows repeat within a
time box, so every row gets the same chances at a quiet moment.  The
medians are reported beside them.  Its top-level imports are small: workers
import this module for ``echo``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

_MARK = "ANYFORK-BENCH-CALLS "
_MIB = 1 << 20
_LEN = struct.Struct("<I")


def echo(x: Any) -> Any:
    """The function every peer serves."""
    return x


# --- the limit row: thirty lines, no library -----------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _limit_serve(sock: socket.socket) -> None:
    import pickle

    f = sock.makefile("rb")
    while True:
        head = f.read(4)
        if len(head) < 4 or head == b"\0\0\0\0":
            return  # EOF, or the caller's "stop" (other forks may hold its socket: no EOF)
        obj = pickle.loads(f.read(_LEN.unpack(head)[0]))
        data = pickle.dumps(echo(obj), pickle.HIGHEST_PROTOCOL)
        sock.sendall(_LEN.pack(len(data)) + data)


class _Limit:
    def __init__(self) -> None:
        import pickle

        self.pickle = pickle
        self.sock, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self.sock.close()
            try:
                _limit_serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.f = self.sock.makefile("rb")

    def pids(self) -> list[int]:
        return [self.pid]

    def _read(self) -> Any:
        head = self.f.read(4)
        return self.pickle.loads(self.f.read(_LEN.unpack(head)[0]))

    def call(self, x: Any) -> Any:
        data = self.pickle.dumps(x, self.pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_LEN.pack(len(data)) + data)
        return self._read()

    def pipelined(self, n: int) -> None:
        dumps, hp = self.pickle.dumps, self.pickle.HIGHEST_PROTOCOL
        for start in range(0, n, 256):
            count = min(256, n - start)
            out = []
            for i in range(count):
                data = dumps(i, hp)
                out.append(_LEN.pack(len(data)) + data)
            self.sock.sendall(b"".join(out))
            for _ in range(count):
                self._read()

    def close(self) -> None:
        self.sock.sendall(_LEN.pack(0))
        self.f.close()
        self.sock.close()
        os.waitpid(self.pid, 0)


# --- the peers -----------------------------------------------------------------------------


_STOP = "stop"


def _pipe_serve(conn: Any) -> None:
    # A forked child also holds the caller's end, so EOF never comes: a
    # sentinel ends it.
    while (obj := conn.recv()) != _STOP:
        conn.send(echo(obj))


class _Pipe:
    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_pipe_serve, args=(theirs,))
        self.proc.start()
        theirs.close()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.pid is not None else []

    def call(self, x: Any) -> Any:
        self.conn.send(x)
        return self.conn.recv()

    def pipelined(self, n: int) -> None:
        for start in range(0, n, 256):
            count = min(256, n - start)
            for i in range(count):
                self.conn.send(i)
            for _ in range(count):
                self.conn.recv()

    def close(self) -> None:
        self.conn.send(_STOP)
        self.conn.close()
        self.proc.join()


class _Pool:
    def __init__(self) -> None:
        import concurrent.futures
        import multiprocessing

        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                         mp_context=multiprocessing.get_context("fork"))
        self.ex.submit(echo, 0).result()

    def pids(self) -> list[int]:
        return list(getattr(self.ex, "_processes", None) or ())  # its one worker

    def call(self, x: Any) -> Any:
        return self.ex.submit(echo, x).result()

    def pipelined(self, n: int) -> None:
        futures = [self.ex.submit(echo, i) for i in range(n)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self.ex.shutdown()


class _Rpc:
    def __init__(self, serializer: str) -> None:
        import anyfork
        from anyfork import rpc

        self.client = rpc.run(anyfork.new(), echo, serializer=serializer)
        self.tiny: object = b"x" if serializer == "bytes" else 0
        self.client(self.tiny)

    def pids(self) -> list[int]:
        return [self.client.process.pid]

    def call(self, x: Any) -> Any:
        return self.client.call(x)

    def pipelined(self, n: int) -> None:
        submit, tiny = self.client.submit, self.tiny
        futures = [submit(tiny) for _ in range(n)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self.client.close()
        self.client.wait(30)


PEERS: dict[str, Callable[[], Any]] = {
    "limit": _Limit,
    "pipe": _Pipe,
    "ppe": _Pool,
    "rpc": lambda: _Rpc("pickle"),
    "rpc_bytes": lambda: _Rpc("bytes"),
}
LABELS = {
    "limit": "limit: length + pickle over a socketpair (30 lines)",
    "pipe": "multiprocessing.Pipe",
    "ppe": "ProcessPoolExecutor(max_workers=1)",
    "rpc": "anyfork.rpc, pickle",
    "rpc_bytes": "anyfork.rpc, bytes",
}


def _tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


class _OneCpu:
    """Every thread of ``pids`` on one CPU for the ``with`` block, then back
    where each was (see the module's doc).  Nothing where the platform has
    no ``sched_setaffinity``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.saved: list[tuple[int, set[int]]] = []

    def __enter__(self) -> None:
        if not hasattr(os, "sched_setaffinity"):
            return
        cpu = {min(os.sched_getaffinity(0))}
        for pid in self.pids:
            for tid in _tids(pid):
                try:
                    self.saved.append((tid, os.sched_getaffinity(tid)))
                    os.sched_setaffinity(tid, cpu)
                except OSError:
                    pass  # a thread that ended meanwhile

    def __exit__(self, *exc: object) -> None:
        for tid, cpus in self.saved:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass
        self.saved.clear()


def _time_per(fn: Callable[[], Any], seconds: float, min_count: int) -> float:
    """Seconds per call of ``fn``, over at least ``seconds`` and ``min_count`` calls."""
    count = 0
    start = time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if count >= min_count and elapsed >= seconds:
            return elapsed / count


# Each round takes SPLITS short round-trip samples per peer, interleaved
# peer by peer, and pipelined samples per peer until PIPE_SECONDS have passed.
SPLITS = 10
PIPE_SECONDS = 0.5


def child() -> None:
    """One job: every peer, every row, samples interleaved peer by peer."""
    import functools
    import json

    params = json.loads(sys.argv[1])
    rounds, seconds, n = params["rounds"], params["seconds"], params["pipelined"]
    splits = params.get("splits", SPLITS)
    peers = {name: PEERS[name]() for name in PEERS}
    rows: dict[str, list[float]] = {}
    big = b"x" * _MIB
    try:
        for _ in range(rounds):
            for _ in range(splits):
                for name, peer in peers.items():
                    tiny: object = b"x" if name == "rpc_bytes" else 0
                    with _OneCpu([os.getpid(), *peer.pids()]):
                        rows.setdefault(f"rt:{name}", []).append(_time_per(
                            functools.partial(peer.call, tiny), seconds / splits, 20) * 1e6)
            for name, peer in peers.items():
                start = time.perf_counter()
                while True:
                    t = time.perf_counter()
                    peer.pipelined(n)
                    done = time.perf_counter()
                    rows.setdefault(f"pipe:{name}", []).append(n / (done - t))
                    if done - start >= params.get("pipe_seconds", PIPE_SECONDS):
                        break
                rows.setdefault(f"mib:{name}", []).append(
                    _time_per(functools.partial(peer.call, big), seconds, 5) * 1e6)
    finally:
        for peer in peers.values():
            peer.close()
    sys.stdout.write(_MARK + json.dumps(rows) + "\n")
    sys.stdout.flush()


def best(row: str, samples: list[float]) -> float:
    """A row's figure: its best sample, the least time or the most calls per second.

    On a shared machine, what other processes do only ever adds to a sample:
    a round trip that waited for a neighbour's time slice is not the row's
    cost.  The best of many short samples, taken the same way for every row
    in the same job, is what each row costs on its own (``timeit`` reports
    the minimum for the same reason).  The medians are kept beside it."""
    return max(samples) if row.startswith("pipe:") else min(samples)


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    """Run the job; the best sample and the median per row, and the ratios the issue names."""
    import json
    import subprocess

    import anyfork

    params = {"rounds": 1 if quick else rounds, "seconds": 0.05 if quick else 0.5,
              "pipelined": 1000 if quick else 20000, "splits": 2 if quick else SPLITS,
              "pipe_seconds": 0.0 if quick else PIPE_SECONDS}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    result: dict[str, Any] = {"params": params, "rows": {}, "medians": {}, "failed": []}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "from anyfork._bench_calls import child; child()", json.dumps(params)],
            stdout=subprocess.PIPE, env=env, timeout=60 if quick else 900, check=False)
    except subprocess.TimeoutExpired:
        result["failed"].append("calls: timed out")
        return result
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith(_MARK) and proc.returncode == 0:
            samples = json.loads(line[len(_MARK):])
            result["rows"] = {k: best(k, v) for k, v in samples.items()}
            result["medians"] = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
            result["samples"] = samples
            return result
    result["failed"].append(f"calls: the job exited with status {proc.returncode}")
    return result


def report(calls: dict[str, Any]) -> list[str]:
    """The section's lines."""
    rows = calls["rows"]
    n = calls["params"]["pipelined"]
    out = ["", f"Calls: an identity function in a second process (round trips, both processes on one "
           f"CPU: lower is better; pipelined: {n:,} tiny calls submitted, then collected, higher is better; "
           f"each row's best sample)"]
    if not rows:
        out.extend(f"FAILED: {f}" for f in calls["failed"])
        return out
    lines = [["what", "round trip", "pipelined", "1 MiB round trip"]]
    for name, label in LABELS.items():
        lines.append([label, f"{rows[f'rt:{name}']:.1f} µs", f"{rows[f'pipe:{name}']:,.0f}/s",
                      f"{rows[f'mib:{name}']:,.0f} µs"])
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    for i, r in enumerate(lines):
        out.append("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                                    enumerate(zip(r, widths, strict=True))))
        if i == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    out.append("  rpc " + _ratios(rows))
    if calls.get("medians"):
        out.append("  the same from each row's median sample: " + _ratios(calls["medians"]))
    return out


def _ratios(rows: dict[str, float]) -> str:
    rt, pipe = rows["rt:rpc"], rows["pipe:rpc"]
    return (f"round trip: {rt / rows['rt:limit']:.2f}x the limit row's time, "
            f"{rows['rt:ppe'] / rt:.1f}x faster than ProcessPoolExecutor; "
            f"pipelined: {pipe / rows['pipe:limit']:.0%} of the limit row, "
            f"{pipe / rows['pipe:ppe']:.1f}x ProcessPoolExecutor; "
            f"bytes vs pickle: {rows['rt:rpc'] / rows['rt:rpc_bytes']:.2f}x round trip, "
            f"{rows['pipe:rpc_bytes'] / pipe:.2f}x pipelined")

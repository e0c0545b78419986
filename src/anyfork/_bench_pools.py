"""The "Pools" section of ``python -m anyfork bench``: anyfork.Executor against its peers.

Every peer is a pool of 2 workers (the memory row: 8) serving a tiny
task (an identity function of this module):

- ``anyfork.Executor``;
- ``concurrent.futures.ProcessPoolExecutor`` with the fork, forkserver and
  spawn start methods;
- loky, pebble and mpire, when installed (``pip install 'anyfork[bench]'``);
  a peer that is missing is skipped with a note.

One job per peer per round, each in a fresh interpreter (the job is the
"fresh caller" of the first row), peers alternating round by round.  A job
measures, in order: time to first result from a fresh caller and from a
warm one (a second pool in the same caller), the round trip of one tiny
task, throughput (submit N then collect; ``map`` over N), recycling
(a new worker per task, over ``recycle`` tasks), memory of idle workers
with :data:`anyfork._bench.MODULES` loaded, and last crash recovery (a task
segfaults: the time until the next task's result, or "broken").  A row a
peer does not offer (recycling in loky, or with the fork start method) is
left out with a note.  Crash recovery runs under a deadline: a peer that
hangs there is reported as such and the job ends without its shutdown.
``--quick`` measures the first five rows only, on fewer tasks.

Its top-level imports are small: workers import this module for ``echo``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ._bench_calls import _time_per

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

_MARK = "ANYFORK-BENCH-POOLS "
WORKERS = 2

#: Peer id -> (label, the module it needs, or None).
PEERS: dict[str, tuple[str, str | None]] = {
    "anyfork": ("anyfork.Executor", None),
    "ppe_fork": ("ProcessPoolExecutor, fork", None),
    "ppe_forkserver": ("ProcessPoolExecutor, forkserver", None),
    "ppe_spawn": ("ProcessPoolExecutor, spawn", None),
    "loky": ("loky", "loky"),
    "pebble": ("pebble", "pebble"),
    "mpire": ("mpire", "mpire"),
}
#: Row id -> (heading, unit, higher is better).
ROWS: dict[str, tuple[str, str, bool]] = {
    "ttfr_fresh": ("first result, fresh", "ms", False),
    "ttfr_warm": ("first result, warm", "ms", False),
    "rt": ("round trip", "µs", False),
    "submit": ("submit N", "/s", True),
    "map": ("map N", "/s", True),
    "recycle": ("recycle", "/s", True),
    "crash": ("after a crash", "ms", False),
    "uss": ("idle USS", "MiB", False),
    "pss": ("idle PSS", "MiB", False),
}


def echo(x: Any) -> Any:
    """The tiny task."""
    return x


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def settle(seconds: float) -> int:
    """A memory row's task: collect, stay busy a moment (so that the tasks
    spread over every worker), then the worker is idle; its pid."""
    import gc

    gc.collect()
    time.sleep(seconds)
    return os.getpid()


def preload() -> None:
    """The initializer of the memory row's workers (where the peer has no template)."""
    from ._bench import MODULES

    for name in MODULES:
        __import__(name)


# --- the peers, behind one small interface ----------------------------------------------------


class _Peer:
    """A pool: ``submit(fn, *args)`` returns something with ``result()``."""

    def __init__(self, pid: str, workers: int, max_tasks: int | None = None, memory: bool = False) -> None:
        self.kind = pid
        self.ex: Any = None
        self.lifespan: int | None = None
        self.make(workers, max_tasks, memory)

    def make(self, workers: int, max_tasks: int | None, memory: bool) -> None:
        import importlib

        kind = self.kind
        if kind == "anyfork":
            import anyfork

            # Both sides preload the task module (this one), as a user would:
            # here the template requires it, forkserver's server imports it.
            modules = [__name__]
            if memory:
                from ._bench import MODULES

                modules = [*MODULES, __name__]
            template = anyfork.new().require(*modules)
            self.ex = anyfork.Executor(workers, max_tasks_per_child=max_tasks, template=template)
        elif kind.startswith("ppe_"):
            import concurrent.futures
            import multiprocessing

            ctx: Any = multiprocessing.get_context(kind[4:])
            if kind == "ppe_forkserver":
                from ._bench import MODULES

                ctx.set_forkserver_preload([*MODULES, __name__] if memory else [__name__])
            kw: dict[str, Any] = {"initializer": preload} if memory else {}
            if max_tasks is not None:
                kw["max_tasks_per_child"] = max_tasks
            self.ex = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, **kw)
        elif kind == "loky":
            loky: Any = importlib.import_module("loky")  # typed or not, installed or not

            self.ex = loky.ProcessPoolExecutor(workers, initializer=preload if memory else None)
        elif kind == "pebble":
            pebble: Any = importlib.import_module("pebble")  # typed or not, installed or not

            self.ex = pebble.ProcessPool(workers, max_tasks=max_tasks or 0,
                                         initializer=preload if memory else None)
        elif kind == "mpire":
            mpire: Any = importlib.import_module("mpire")  # typed or not, installed or not

            # (Its worker_lifespan is an argument of map, not of the pool: see map.)
            self.ex = mpire.WorkerPool(n_jobs=workers, start_method="fork", keep_alive=True)
            self.lifespan = max_tasks
            if memory:
                preload()  # fork: the workers inherit what the caller loaded

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.kind == "pebble":
            return self.ex.schedule(fn, args=args)
        if self.kind == "mpire":
            return _MpireResult(self.ex.apply_async(fn, args=args))
        return self.ex.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> list[Any]:
        if self.kind == "pebble":
            return list(self.ex.map(fn, items).result())
        if self.kind == "mpire":
            kw = {"worker_lifespan": self.lifespan, "chunk_size": 1} if self.lifespan else {}
            return list(self.ex.map(fn, items, **kw))
        return list(self.ex.map(fn, items))

    def close(self) -> None:
        if self.kind == "pebble":
            self.ex.close()
            self.ex.join()
        elif self.kind == "mpire":
            self.ex.terminate()
        else:
            self.ex.shutdown()


class _MpireResult:
    def __init__(self, res: Any) -> None:
        self.res = res

    def result(self, timeout: float | None = None) -> Any:
        return self.res.get(timeout)


def offers_recycling(kind: str) -> str | None:
    """Why the peer has no recycling row, or None when it has one."""
    if kind == "loky":
        return "loky has no max_tasks_per_child"
    if kind == "ppe_fork":
        return "ProcessPoolExecutor refuses max_tasks_per_child with the fork start method"
    return None


def missing(kind: str) -> str | None:
    """Why the peer can't run here, or None."""
    import importlib.util

    module = PEERS[kind][1]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'anyfork[bench]')"
    return None


# --- one job ------------------------------------------------------------------------------------


def _first_result(kind: str) -> float:
    """Seconds from making a pool to its first result (the pool is shut down after)."""
    start = time.perf_counter()
    peer = _Peer(kind, WORKERS)
    peer.submit(echo, 0).result()
    elapsed = time.perf_counter() - start
    peer.close()
    return elapsed


def _memory(kind: str, workers: int) -> tuple[float, float]:
    """Median (USS, PSS) of ``workers`` idle workers, in MiB."""
    from ._bench import _median, _smaps

    peer = _Peer(kind, workers, memory=True)
    try:
        pids: set[int] = set()
        for _ in range(5):  # until every worker ran one (they start as tasks wait)
            pids |= {f.result() for f in [peer.submit(settle, 0.1) for _ in range(2 * workers)]}
            if len(pids) >= workers:
                break
        time.sleep(0.1)  # the last tasks' replies are out: every worker is idle
        sizes = [_smaps(pid) for pid in pids]
    finally:
        peer.close()
    return _median([u for u, _ in sizes]), _median([p for _, p in sizes])


def _crash(kind: str, timeout: float) -> float | str:
    """Seconds from a task that segfaults to the next task's result, or
    "broken" (the pool fails the next task), or "hung"."""
    import threading

    peer = _Peer(kind, WORKERS)
    peer.submit(echo, 0).result()
    box: list[float | str] = []

    def go() -> None:
        start = time.perf_counter()
        try:
            peer.submit(segfault).result(timeout)
        except BaseException:
            pass  # what it raises is the peer's own; the next task is what counts
        try:
            peer.submit(echo, 1).result(timeout)
        except BaseException:
            box.append("broken")
            return
        box.append(time.perf_counter() - start)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(2 * timeout)
    if not box:
        return "hung"
    try:
        peer.close()
    except BaseException:
        pass
    return box[0]


def _recycle_floor(count: int) -> float:
    """Recycling's floor: what the same template does with no pool, no rpc
    and no task, ``fork().run()`` of the task and the caller reading its
    EOF and exit status, ``WORKERS`` at a time; processes per second.  A
    recycled worker is that plus a pool's and rpc's start-up and one call."""
    import threading

    import anyfork

    template = anyfork.new().require(__name__)
    each = max(1, count // WORKERS)

    def go() -> None:
        for _ in range(each):
            proc = template.fork()
            proc.run(f"{__name__}:echo").close()
            proc.wait()

    try:
        go()  # warm: the template has forked ahead
        start = time.perf_counter()
        threads = [threading.Thread(target=go) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return each * WORKERS / (time.perf_counter() - start)
    finally:
        template.close()


def child() -> None:
    """One job: one peer, every row."""
    import json

    params = json.loads(sys.argv[1])
    kind, n = params["peer"], params["n"]
    rows: dict[str, Any] = {}
    rows["ttfr_fresh"] = _first_result(kind) * 1e3
    rows["ttfr_warm"] = _first_result(kind) * 1e3
    peer = _Peer(kind, WORKERS)
    try:
        peer.submit(echo, 0).result()
        rows["rt"] = _time_per(lambda: peer.submit(echo, 0).result(), params["seconds"], 100) * 1e6
        start = time.perf_counter()
        futures = [peer.submit(echo, i) for i in range(n)]
        for f in futures:
            f.result()
        rows["submit"] = n / (time.perf_counter() - start)
    finally:
        peer.close()
    # map on a pool of its own, warmed by a map (mpire's map misreads its
    # arguments on a pool that served apply_async).
    peer = _Peer(kind, WORKERS)
    try:
        peer.map(echo, range(2 * WORKERS))
        start = time.perf_counter()
        if peer.map(echo, range(n)) != list(range(n)):
            raise RuntimeError(f"{kind}: map returned the wrong results")
        rows["map"] = n / (time.perf_counter() - start)
    finally:
        peer.close()
    if not params["all_rows"]:
        _emit(rows)
        return
    if offers_recycling(kind) is None:
        peer = _Peer(kind, WORKERS, max_tasks=1)
        try:
            count = params["recycle"]
            start = time.perf_counter()
            if kind == "mpire":  # it recycles in map only
                peer.map(echo, range(count))
            else:
                futures = [peer.submit(echo, i) for i in range(count)]
                for f in futures:
                    f.result()
            rows["recycle"] = count / (time.perf_counter() - start)
            if kind == "anyfork":
                rows["recycle_floor"] = _recycle_floor(count)
        except Exception as e:  # mpire's worker_lifespan=1 can fail with "Worker-0 died unexpectedly"
            rows["recycle_state"] = f"failed: {type(e).__name__}: {e}"
        finally:
            try:
                peer.close()
            except Exception:
                pass
    rows["uss"], rows["pss"] = _memory(kind, params["mem_workers"])
    try:
        crash = _crash(kind, params["crash_timeout"])
    except Exception:  # mpire raises "Worker-0 died unexpectedly" from its own calls
        crash = "broken"
    if isinstance(crash, float):
        rows["crash"] = crash * 1e3
    else:
        rows["crash_state"] = crash
    _emit(rows)
    if crash == "hung":
        os._exit(0)  # its pool can't be shut down


def _emit(rows: dict[str, Any]) -> None:
    import json

    sys.stdout.write(_MARK + json.dumps(rows) + "\n")
    sys.stdout.flush()


# --- the parent ---------------------------------------------------------------------------------


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    """Run the jobs; medians per peer and row, and notes for what was skipped."""
    import json
    import subprocess

    import anyfork

    # --quick: the first five rows, on fewer tasks (recycling with spawn,
    # memory and crashes take seconds each per peer).
    params: dict[str, Any] = {"rounds": 1 if quick else min(rounds, 3), "seconds": 0.05 if quick else 0.5,
                              "n": 500 if quick else 10000, "recycle": 200, "mem_workers": 8,
                              "crash_timeout": 20.0, "all_rows": not quick}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    result: dict[str, Any] = {"params": params, "peers": {}, "notes": [], "failed": []}
    peers = []
    for kind in PEERS:
        why = missing(kind)
        if why is None:
            peers.append(kind)
        else:
            result["notes"].append(f"{PEERS[kind][0]}: skipped, {why}")
    samples: dict[str, dict[str, list[Any]]] = {kind: {} for kind in peers}
    for r in range(params["rounds"]):
        for kind in peers:
            sys.stderr.write(f"bench: pools [{r + 1}/{params['rounds']}] {PEERS[kind][0]}\n")
            sys.stderr.flush()
            job = {**params, "peer": kind}
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", "from anyfork._bench_pools import child; child()",
                     json.dumps(job)], capture_output=True, env=env,
                    timeout=60 if quick else 600, check=False)
            except subprocess.TimeoutExpired:
                result["failed"].append(f"pools: {kind}: timed out")
                continue
            for line in proc.stdout.decode(errors="replace").splitlines():
                if line.startswith(_MARK):
                    for row, value in json.loads(line[len(_MARK):]).items():
                        samples[kind].setdefault(row, []).append(value)
                    break
            else:
                last = (proc.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
                result["failed"].append(
                    f"pools: {kind}: the job exited with status {proc.returncode}: {last}")
    for kind in peers:
        figures: dict[str, Any] = {}
        for row, values in samples[kind].items():
            if row.endswith("_state"):
                figures[row] = values[0]
            else:
                figures[row] = sorted(values)[len(values) // 2]
        result["peers"][kind] = figures
    if quick:
        result["notes"].append("pools: --quick measures the first five rows only, on fewer tasks")
    for kind, figures in result["peers"].items():
        if ":" in figures.get("recycle_state", ""):
            result["notes"].append(f"{PEERS[kind][0]}: recycling {figures['recycle_state']}")
    for kind in peers if not quick else ():
        why = offers_recycling(kind)
        if why is not None:
            result["notes"].append(f"{PEERS[kind][0]}: no recycling row, {why}")
    return result


# --- the report ---------------------------------------------------------------------------------


def _cell(figures: dict[str, Any], row: str) -> str:
    state = figures.get(f"{row}_state")
    if state is not None:
        return str(state).split(":", 1)[0]
    value = figures.get(row)
    if value is None:
        return "-"
    unit = ROWS[row][1]
    if unit == "/s" or value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def report(pools: dict[str, Any]) -> list[str]:
    """The section's lines."""
    params, peers = pools["params"], pools["peers"]
    n = params["n"]
    more = (f"; recycle: max_tasks_per_child=1 over {params['recycle']} tasks; after a crash: a task "
            f"segfaults, then the next task's result; memory: {params['mem_workers']} idle workers"
            if params["all_rows"] else "")
    out = ["", f"Pools: {WORKERS} workers serving a tiny task (N = {n:,}{more}; times and memory: lower is "
           "better, rates: higher)"]
    if not peers:
        out.extend(f"FAILED: {f}" for f in pools["failed"])
        return out
    shown = [r for r in ROWS if any(r in f or f"{r}_state" in f for f in peers.values())]
    headers = ["what", *(f"{ROWS[r][0]} ({ROWS[r][1]})" for r in shown)]
    lines = [[PEERS[kind][0], *(_cell(figures, r) for r in shown)] for kind, figures in peers.items()]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    for i, cells in enumerate([headers, *lines]):
        out.append("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                    for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip())
        if i == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    out.extend(f"note: {note}" for note in pools["notes"])
    return out


def summary(pools: dict[str, Any], calls: dict[str, Any] | None) -> list[str]:
    """What the rows say, for a user: who wins each, by how much, and how
    far anyfork is from the limit rows of the Calls section."""
    peers = pools["peers"]
    ours = peers.get("anyfork")
    if not ours:
        return []
    out = []
    for row, (heading, unit, higher) in ROWS.items():
        if row not in ours:
            continue
        others = {k: f[row] for k, f in peers.items() if k != "anyfork" and f.get(row)}
        if not others:
            continue
        best = max(others, key=others.__getitem__) if higher else min(others, key=others.__getitem__)

        def times(k: str, row: str = row, higher: bool = higher) -> float:
            a, b = ours[row], peers[k][row]
            return float(a / b if higher else b / a)

        ratio = times(best)
        line = (f"  {heading}: anyfork {_cell(ours, row)} {unit}, {ratio:.2f}x the best peer "
                f"({PEERS[best][0]}, {_cell(peers[best], row)} {unit})")
        if "ppe_forkserver" in others and best != "ppe_forkserver":
            line += f"; {times('ppe_forkserver'):.2f}x ProcessPoolExecutor (forkserver)"
        if row == "recycle" and ours.get("recycle_floor"):
            line += (f"; {ours['recycle'] / ours['recycle_floor']:.0%} of its floor, the same template's "
                     f"fork().run() and wait, {WORKERS} at a time ({ours['recycle_floor']:,.0f}/s)")
        out.append(line)
    broken = [PEERS[k][0] for k, f in peers.items() if f.get("crash_state")]
    if broken:
        out.append(f"  after a crash, the next task fails or hangs with: {', '.join(broken)}")
    rows = (calls or {}).get("rows") or {}
    if rows.get("pipe:limit") and ours.get("submit"):
        out.append(f"  limit rows (Calls section, one worker, no pool): anyfork's throughput is "
                   f"{ours['submit'] / rows['pipe:limit']:.0%} of the pipelined limit, its round trip "
                   f"{ours['rt'] / rows['rt:limit']:.1f}x the limit's")
    return out

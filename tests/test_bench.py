"""``python -m anyfork bench``: the report's shape and completeness, never its figures.

One ``--quick --rounds 1`` run (in a subprocess, as a user would start it)
is shared by the tests that read its output; the figures themselves are
machine-dependent and checked only for being there and positive.  (One
round: the shape is the same with three, and the suite runs on three
Pythons in CI.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

import anyfork
from anyfork import _bench
from anyfork.__main__ import build_parser, main

if TYPE_CHECKING:
    from pathlib import Path

SRC = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))

# One --quick run is every section's jobs (about 20 s on a quiet machine of 2
# cores with one round, twice that on a loaded one): its bound is wider than the suite's.
pytestmark = pytest.mark.timeout(150)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    return env


class QuickRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(  # (a long timeout: the Remote section starts an sshd)
        [sys.executable, "-m", "anyfork", "bench", "--quick", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=_env(), check=False,
    )
    result = json.loads(out.read_text()) if out.exists() else {}
    return QuickRun(proc.returncode, proc.stdout, proc.stderr, result)


# The rows a --quick run must produce (its sizes are 0 and 200 MB).
QUICK_ROWS = {
    "fork@0", "new@0", "new_dotted", "floor", "fork_bare", "fork@200", "new@200",
    "tplfork", "new_exec", "mp_fork", "mp_forkserver", "mp_spawn",
    "ttfr_pool_cold", "ttfr_anyfork_cold", "ttfr_pool_warm", "ttfr_anyfork_warm",
    "conc_anyfork", "conc_mp_forkserver",
    *(f"mem_{kind}_{how}" for kind in ("uss", "pss")
      for how in ("anyfork", "mp_fork", "mp_forkserver", "mp_spawn")),
}


def test_quick_run_succeeds_and_reports_every_section(quick: QuickRun) -> None:
    assert quick.returncode == 0, quick.stdout + quick.stderr
    for heading in ("Process creation", "Time to first result", "Many at once", "Memory per idle worker",
                    "Calls", "Pools", "Summary"):
        assert heading in quick.stdout
    # Targets are the project's (docs/benchmarks.md): the report says what was measured.
    assert "Targets" not in quick.stdout
    assert "MISSED" not in quick.stdout
    # The machine, the spread, and the plain warning about noise.
    machine = quick.stdout.splitlines()[1]
    assert machine.startswith("machine:")
    assert "cores" in machine
    assert quick.result["machine"]["python"] in machine
    assert "median of" in quick.stdout
    assert "min..max" in quick.stdout
    assert "NOISY" in quick.stdout
    # A progress line per job, on stderr.
    assert "bench: [1/" in quick.stderr


def test_every_row_has_a_positive_figure(quick: QuickRun) -> None:
    rows = {row["id"]: row for row in quick.result["rows"]}
    assert quick.result["failed"] == []
    assert set(rows) == QUICK_ROWS
    for rid, row in rows.items():
        assert row["samples"], rid
        assert all(x > 0 for x in row["samples"]), rid
        assert 0 < row["min"] <= row["median"] <= row["max"], rid


def test_json_has_every_figure_the_report_shows(quick: QuickRun) -> None:
    result = quick.result
    assert {"command", "machine", "config", "rows", "targets", "notes", "failed"} <= set(result)
    assert result["machine"]["cores"] >= 1
    assert result["config"]["quick"] is True
    for row in result["rows"]:
        assert row["label"] in quick.stdout
        assert {"median", "min", "max", "samples", "unit", "vs_fork", "vs_mp", "caller_mb"} <= set(row)
        assert row["vs_mp"] > 0, row["id"]
    assert len(result["targets"]) == 5
    for target in result["targets"]:
        # --quick has no 2000 MB caller: that one target is "n/a", the rest have a figure.
        if "2000 MB" in target["target"]:
            assert target["met"] is None
            assert _bench._summary_phrase(target["target"]) not in quick.stdout
        else:
            assert target["value"] > 0
            assert isinstance(target["met"], bool)
            assert f"{_bench._summary_phrase(target['target'])}: {target['value']:.2f}x" in quick.stdout
    # The 2x target is shown beside what the floor row (a minimal template) reaches.
    first = result["targets"][0]
    assert first["floor"] > 0
    assert f"(the floor row: {first['floor']:.2f}x)" in quick.stdout


def test_the_bare_fork_row_runs_in_an_interpreter_without_anyfork_or_threading() -> None:
    cfg = _bench.make_config(quick=True)._replace(rounds=1, seconds=0.05, min_count=5)
    result = _bench._run_job(cfg, "bare", {"job": "bare"}, timeout=30)
    assert result["loaded"] == []
    assert result["rows"]["fork_bare"][0] > 0


def test_importing_the_command_line_does_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import anyfork.__main__, anyfork._bench"],
        capture_output=True, text=True, timeout=30, env=_env(), check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("argv", [
    ["bench", "--sizes", "x"],
    ["bench", "--sizes", "-20"],
    ["bench", "--rounds", "0"],
    [],
])
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_options_override_the_defaults() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--rounds", "2", "--sizes", "200,0,20"])
    cfg = _bench.make_config(args.quick, rounds=args.rounds, sizes=args.sizes)
    assert cfg.quick
    assert cfg.rounds == 2
    assert cfg.sizes == (0, 20, 200)
    assert _bench.make_config(False).sizes == (0, 20, 200, 2000)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Fails before measuring anything.
    assert main(["bench", "--quick", "--plot", str(tmp_path / "b.png")]) == 2
    assert "pip install 'anyfork[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_the_calls_section_has_every_peer_and_row(quick: QuickRun) -> None:
    from anyfork import _bench_calls

    assert "Calls: an identity function in a second process" in quick.stdout
    calls = quick.result["calls"]
    assert calls["failed"] == []
    want = {f"{row}:{peer}" for row in ("rt", "pipe", "mib") for peer in _bench_calls.PEERS}
    assert set(calls["rows"]) == want
    assert all(v > 0 for v in calls["rows"].values())
    for label in _bench_calls.LABELS.values():
        assert label in quick.stdout
    assert "rpc round trip:" in quick.stdout


def test_the_calls_rows_are_each_rows_best_sample_with_the_medians_beside(quick: QuickRun) -> None:
    calls = quick.result["calls"]
    samples = calls["samples"]
    assert all(len(samples[f"rt:{peer}"]) >= 2 for peer in ("limit", "rpc"))  # short samples, interleaved
    for key, values in samples.items():
        want = max(values) if key.startswith("pipe:") else min(values)
        assert calls["rows"][key] == want, key
        assert calls["medians"][key] == sorted(values)[len(values) // 2], key
    assert "the same from each row's median sample:" in quick.stdout


def test_the_pools_section_has_a_row_per_peer_and_says_who_wins(quick: QuickRun) -> None:
    from anyfork import _bench_pools

    pools = quick.result["pools"]
    here = {kind for kind in _bench_pools.PEERS if _bench_pools.missing(kind) is None}
    assert set(pools["peers"]) == here
    for kind in set(_bench_pools.PEERS) - here:  # the bench extra's peers, when it isn't installed
        assert f"{_bench_pools.PEERS[kind][0]}: skipped" in quick.stdout
    for kind, figures in pools["peers"].items():
        assert _bench_pools.PEERS[kind][0] in quick.stdout
        for row in ("ttfr_fresh", "ttfr_warm", "rt", "submit", "map"):
            assert figures[row] > 0, (kind, row)
    summary = quick.stdout.split("Summary", 1)[1]
    assert "submit N: anyfork" in summary
    assert "the best peer" in summary
    assert "of the pipelined limit" in summary


def test_a_pools_job_measures_every_row() -> None:
    # --quick leaves recycling, crash recovery and memory out: one full job, small.
    params = {"peer": "anyfork", "n": 200, "recycle": 6, "mem_workers": 2, "crash_timeout": 10.0,
              "seconds": 0.02, "all_rows": True}
    proc = subprocess.run(
        [sys.executable, "-c", "from anyfork._bench_pools import child; child()", json.dumps(params)],
        capture_output=True, text=True, timeout=50, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ANYFORK-BENCH-POOLS "))
    rows = json.loads(line.split(" ", 1)[1])
    from anyfork import _bench_pools

    # The crash row is a time: the next task ran.  Recycling has its floor beside it.
    assert set(rows) == {*_bench_pools.ROWS, "recycle_floor"}, rows
    assert all(v > 0 for v in rows.values()), rows


def test_the_pools_summary_puts_recycling_beside_its_floor() -> None:
    from anyfork import _bench_pools

    pools = {"peers": {"anyfork": {"recycle": 300.0, "recycle_floor": 600.0},
                       "ppe_forkserver": {"recycle": 150.0}}}
    line = next(x for x in _bench_pools.summary(pools, None) if "recycle:" in x)
    assert "2.00x the best peer" in line
    assert "50% of its floor" in line and "(600/s)" in line


def test_the_remote_section_has_every_row_or_says_why_not(quick: QuickRun) -> None:
    from anyfork import _bench_remote, _sshd

    assert "Remote: over ssh to a loopback sshd" in quick.stdout
    remote = quick.result["remote"]
    assert remote["failed"] == []
    if _sshd.available():
        assert any("Remote section skipped" in n for n in remote["notes"])
        return
    want = {"connect:anyfork", "fork:anyfork", "rt:anyfork", "pipe:anyfork", "pipe_wide:anyfork",
            "fork:ssh", "fork:ssh_cm"}
    if importlib.util.find_spec("execnet") is not None:
        want |= {"connect:execnet", "rt:execnet", "pipe:execnet"}
    else:
        assert any("execnet rows skipped" in n for n in remote["notes"])
    assert set(remote["rows"]) == want
    assert all(v > 0 for v in remote["rows"].values())
    assert len(remote["targets"]) == 5
    for label in _bench_remote.LABELS.values():
        assert label in quick.stdout
    assert f"the same, max_in_flight={_bench_remote.WIDE}" in quick.stdout

"""``python -m anyfork``: the command line.

``python -m anyfork bench`` measures process creation and worker memory on
this machine, anyfork side by side with what users would pick instead (see
docs/benchmarks.md).  Importing this module does nothing but define
:func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of MB: {text!r}") from None
    if not sizes or any(s < 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are MB >= 0 (0: as started), got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m anyfork`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m anyfork",
        description="anyfork: worker processes from a small template, without forking the caller.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="measure process creation and worker memory on this machine",
        description="Measure process creation rates (the seed's PERFORMANCE loop), time to first "
        "result, many-at-once creation and idle worker memory: anyfork against manual fork and "
        "multiprocessing. Each measurement runs in a fresh interpreter; a full run takes a few minutes.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="a reduced set in well under 30 s (for CI smoke runs)")
    bench.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="draw rates against caller size (needs matplotlib: pip install 'anyfork[plot]')")
    bench.add_argument("--rounds", type=_positive, metavar="N",
                       help="samples per row, of which the median is shown (default 5, --quick 3)")
    bench.add_argument("--sizes", type=_sizes, metavar="MB,MB,...",
                       help="caller sizes for the manual fork / anyfork.new() rows, in MB of RSS, 0 meaning "
                       "'as started' (default 0,20,200,2000; --quick 0,200); sizes that don't fit in "
                       "MemAvailable are skipped with a note")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from . import _bench

    if args.plot and not _bench.have_matplotlib():
        print("python -m anyfork bench: --plot needs matplotlib, which is not installed; "
              "install it with: pip install 'anyfork[plot]'", file=sys.stderr)
        return 2
    cfg = _bench.make_config(args.quick, rounds=args.rounds, sizes=args.sizes)
    command = "python -m anyfork " + " ".join(sys.argv[1:] if argv is None else argv)
    return _bench.run(cfg, args.json, args.plot, command)


if __name__ == "__main__":
    sys.exit(main())

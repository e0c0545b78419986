"""A pool of workers forked from one template that loaded shared data.

Run it from the repository root:

    .venv/bin/python examples/pool.py
"""

import os
import sys

import anyfork
from anyfork import pool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    # The template loads the data once; each worker is a fork of it.
    template = anyfork.new().require("_pool_handlers")
    template.eval("import _pool_handlers\n_pool_handlers.load_words(1000)\n")
    events = []
    with pool.run(template, "_pool_handlers:lookup", max=2, on_event=lambda *e: events.append(e)) as p:
        results = [f.result() for f in [p.submit(i) for i in (1, 10, 100, 999)]]
    print("results:", [word for word, _ in results])
    print("from", len({pid for _, pid in results}), "worker(s); events:", len(events))


if __name__ == "__main__":
    main()

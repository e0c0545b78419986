"""anyfork.Executor in place of ProcessPoolExecutor: the one-line change.

Run it from the repository root:

    .venv/bin/python examples/executor.py
"""

import os

import anyfork


def crash():
    os._exit(1)  # a worker dies: only this task fails, the executor goes on


def square(x):
    return x * x  # defined in the main script: workers find it


if __name__ == "__main__":
    # was: concurrent.futures.ProcessPoolExecutor(max_workers=2)
    with anyfork.Executor(max_workers=2) as executor:
        print("squares:", list(executor.map(square, range(8))))
        try:
            executor.submit(crash).result()
        except anyfork.WorkerDiedError as e:
            print("a worker died:", e.returncode)
        print("and the executor goes on:", executor.submit(square, 12).result())

"""Functions of the caller's main script in processes that don't share its
``__main__`` (_mainmod), and functions no process could find, refused at the call."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import anyfork
from helpers import TIMEOUT, result, run_program

pytestmark = pytest.mark.usefixtures("check_leaks")


def test_a_function_of_the_main_script_runs_in_every_kind_of_process() -> None:
    facts = run_program("caller_main_function.py", quiet=True).facts
    for kind in ("new", "new_exec", "fork"):
        # Its module was imported there under another name: the guarded
        # block did not run (it would have tried to create processes).
        assert facts[kind] == [49, "__anyfork_main__", False, 0], kind
    # A template forked from the program has the program's own __main__.
    assert facts["fork_template"] == [49, "__main__", True, 0]


def _closure() -> Any:
    x = 1

    def inner(sock: Any) -> None:
        sock.sendall(str(x).encode())

    return inner


def _exec_made(namespace: dict[str, Any]) -> Any:
    exec("def f(sock):\n    pass\n", namespace)
    return namespace["f"]


@pytest.mark.parametrize(("func", "words"), [
    (lambda sock: None, "lambda, closure or local function"),
    (_closure(), "lambda, closure or local function"),
    (_exec_made({}), "exec()"),
    (_exec_made({"__name__": "af_made_up_module"}), "'af_made_up_module'"),
    (functools.partial(print), "no importable name"),
], ids=["lambda", "closure", "exec", "exec-made-up-name", "partial"])
def test_a_function_no_process_can_find_is_refused_at_the_call(func: Any, words: str) -> None:
    proc = anyfork.new()
    with pytest.raises(TypeError) as info:
        proc.run(func)
    assert words in str(info.value)
    assert "eval()" in str(info.value) or "module-level" in str(info.value)  # says what to do
    # Nothing was queued: the process is still there to be run.
    with proc.run("helpers:pids") as sock:
        assert result(sock)[0] == proc.pid  # type: ignore[index]
    assert proc.wait(TIMEOUT) == 0

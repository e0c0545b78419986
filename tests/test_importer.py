"""_importer: modules from the caller, on demand (the caller's answer and the far side's loader)."""

from __future__ import annotations

import sys
import types
from importlib.util import MAGIC_NUMBER
from pathlib import Path

import pytest

from anyfork import _exec, _importer


def _load(code: bytes) -> types.ModuleType:
    """Module ``m`` as the far side's Finder builds it from an answer whose
    source says "source" and whose code is ``code``."""
    finder = _importer.Finder(None, "host")  # type: ignore[arg-type]  # (it asks nobody here)
    finder.sources["m"] = (False, "<caller m>", "said = 'source'\n", code)
    module = types.ModuleType("m")
    finder.exec_module(module)
    return module


def test_the_answer_carries_the_source_and_this_pythons_compiled_code() -> None:
    reply = _importer.answer("json.decoder")
    head, _, rest = reply.partition(b"\0")
    source, _, code = rest.partition(b"\0")
    assert head.startswith(b"OK mod ")
    assert source.decode() == Path(head[7:].decode()).read_text(encoding="utf-8")
    assert code[: len(MAGIC_NUMBER)] == MAGIC_NUMBER
    assert _importer.answer("no_such_module_here").startswith(b"NO missing")


def test_the_far_side_runs_the_code_of_its_own_python_version_else_the_source() -> None:
    # Broke (speed): every module a remote process fetched was compiled
    # there, 7 ms of an rpc worker's start.
    code = _exec.compiled(b"said = 'code'\n", "<caller m>")
    assert _load(code).said == "code"
    assert _load(b"\0\0\0\0" + code[4:]).said == "source"
    assert _load(b"").said == "source"  # an answer of the old form


def test_a_module_that_does_not_compile_is_sent_as_source_for_the_far_side_to_refuse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_mod.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reply = _importer.answer("broken_mod")
    assert reply.startswith(b"OK mod ")
    assert reply.endswith(b"def (:\n\0")  # no code: compiling it there raises the SyntaxError
    sys.modules.pop("broken_mod", None)

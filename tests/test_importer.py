"""_importer: modules from the caller, on demand (the caller's answer and the far side's loader)."""

from __future__ import annotations

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


def _parts(reply: bytes) -> tuple[bytes, bytes, bytes]:
    head, _, rest = reply.partition(b"\0")
    source, _, code = rest.partition(b"\0")
    return head, source, code


def test_the_answer_carries_the_source_and_for_anyforks_own_modules_the_compiled_code() -> None:
    for name, compiled in (("anyfork._rpc_wire", True), ("json.decoder", False)):
        head, source, code = _parts(_importer.answer(name))
        assert head.startswith(b"OK mod ")
        assert source.decode() == Path(head[7:].decode()).read_text(encoding="utf-8")
        # The user's modules go as source: compiling them would hold up the relay.
        assert (code[: len(MAGIC_NUMBER)] == MAGIC_NUMBER) is compiled, name
    assert _importer.answer("no_such_module_here").startswith(b"NO missing")


def test_an_answer_too_large_with_its_code_goes_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broke: the size check counted the source only; the code made the
    # message too large for the mux, whose peer then dropped the connection.
    head, source, _ = _parts(_importer.answer("anyfork._rpc_io"))
    monkeypatch.setattr(_importer, "_MAX", len(head) + len(source) + 100)
    assert _parts(_importer.answer("anyfork._rpc_io")) == (head, source, b"")
    monkeypatch.setattr(_importer, "_MAX", len(source))
    assert _importer.answer("anyfork._rpc_io").startswith(b"NO its source is too large")


def test_a_source_with_a_nul_byte_is_refused_not_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Broke: the far side split the answer at the NUL and imported what came before it.
    (tmp_path / "padded_mod.py").write_bytes(b"x = 1\n\0\0")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _importer.answer("padded_mod").startswith(b"NO its source contains a NUL")


def test_the_far_side_runs_the_code_of_its_own_python_version_else_the_source() -> None:
    # Broke (speed): every module a remote process fetched was compiled
    # there, 7 ms of an rpc worker's start.
    code = _exec.compiled(b"said = 'code'\n", "<caller m>")
    assert _load(code).said == "code"
    assert _load(b"\0\0\0\0" + code[4:]).said == "source"
    assert _load(b"").said == "source"  # an answer of the old form


def test_an_own_module_that_does_not_compile_here_is_sent_as_source_for_the_far_side_to_refuse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Broke: only SyntaxError was caught, and compile() runs in the relay
    # thread: a RecursionError killed it, and the remote import hung.
    from anyfork import _exec

    def fails(source: bytes, filename: str) -> bytes:
        raise RecursionError("maximum recursion depth exceeded during compilation")

    monkeypatch.setattr(_exec, "compiled", fails)
    head, source, code = _parts(_importer.answer("anyfork._rpc_io"))
    assert head.startswith(b"OK mod ")
    assert source
    assert code == b""  # the far side compiles it, and says why it can't

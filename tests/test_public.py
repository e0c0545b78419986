"""The public surface: exactly what ``anyfork.__all__`` names, and nothing
users can build that only the library should."""

from __future__ import annotations
import __future__

import inspect
import os
import socket
import sys
import types

import pytest

import anyfork

# Submodules meant to be imported by users (they appear on the package once
# imported, and are not re-exported names).
PUBLIC_SUBMODULES = {"early", "rpc"}


def public_names() -> set[str]:
    return {
        name for name, obj in vars(anyfork).items()
        if not name.startswith("_")
        and not isinstance(obj, types.ModuleType)
        and not isinstance(obj, __future__._Feature)  # "from __future__ import annotations"
    }


def test_all_is_a_tuple_without_duplicates() -> None:
    assert isinstance(anyfork.__all__, tuple)
    assert len(set(anyfork.__all__)) == len(anyfork.__all__)


def test_all_is_exactly_the_public_names() -> None:
    # Names made on first use (anyfork._LAZY) are in __all__ before they are
    # in the module's namespace.
    assert set(anyfork.__all__) == public_names() | set(anyfork._LAZY)


def test_every_name_in_all_exists() -> None:
    for name in anyfork.__all__:
        assert hasattr(anyfork, name), name


def test_the_issues_api_is_there() -> None:
    assert {"new", "new_exec", "Process", "Error", "PYTHON", "freeze_support"} <= set(anyfork.__all__)
    for method in ("fork", "require", "eval", "send_fh", "send_arg", "run", "run_async",
                   "kill", "wait", "close", "__enter__", "__exit__"):
        assert callable(getattr(anyfork.Process, method)), method
    for prop in ("pid", "returncode"):
        assert isinstance(inspect.getattr_static(anyfork.Process, prop), property), prop
    assert inspect.iscoroutinefunction(anyfork.Process.run_async)


def test_implementation_modules_are_private() -> None:
    modules = {name for name, obj in vars(anyfork).items() if isinstance(obj, types.ModuleType)}
    assert {name for name in modules if not name.startswith("_")} <= PUBLIC_SUBMODULES


def test_exceptions_form_one_tree_rooted_at_error() -> None:
    exceptions = [getattr(anyfork, n) for n in anyfork.__all__
                  if isinstance(getattr(anyfork, n), type) and issubclass(getattr(anyfork, n), BaseException)
                  and not issubclass(getattr(anyfork, n), Warning)]
    assert anyfork.Error in exceptions
    assert len(exceptions) > 1
    for exc in exceptions:
        assert issubclass(exc, anyfork.Error), exc
    assert issubclass(anyfork.TimeoutExpired, TimeoutError)


def test_the_one_warning_is_a_user_warning_importable_before_early() -> None:
    # Filterable without importing anyfork.early, which forks on import.
    assert issubclass(anyfork.LateImportWarning, UserWarning)
    assert "anyfork.early" not in sys.modules or anyfork.early.LateImportWarning is anyfork.LateImportWarning


def test_public_callables_are_documented() -> None:
    for name in anyfork.__all__:
        obj = getattr(anyfork, name)
        if callable(obj):
            assert inspect.getdoc(obj), name
    for name, member in vars(anyfork.Process).items():
        if not name.startswith("_") and (callable(member) or isinstance(member, property)):
            assert inspect.getdoc(member), f"Process.{name}"


def test_package_is_typed() -> None:
    assert os.path.exists(os.path.join(os.path.dirname(anyfork.__file__), "py.typed"))


def test_process_has_no_public_constructor() -> None:
    with pytest.raises(TypeError):
        anyfork.Process()  # type: ignore[call-arg]
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TypeError):
            anyfork.Process(object(), a)  # type: ignore[arg-type]
        assert a.fileno() >= 0  # a refused construction took nothing from the caller

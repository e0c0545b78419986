"""The public surface: exactly what ``anyfork.__all__`` names, and nothing
users can build that only the library should."""

from __future__ import annotations
import __future__

import ast
import inspect
import os
import socket
import sys
import types

import pytest

import anyfork

# Submodules meant to be imported by users (they appear on the package once
# imported, and are not re-exported names).
PUBLIC_SUBMODULES = {"early", "pool", "remote", "rpc"}


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
    assert {"new", "new_async", "new_exec", "Process", "Error", "PYTHON",
            "freeze_support"} <= set(anyfork.__all__)
    for method in ("fork", "fork_ahead", "require", "eval", "send_fh", "send_arg", "run", "run_async",
                   "kill", "wait", "wait_async", "close", "__enter__", "__exit__"):
        assert callable(getattr(anyfork.Process, method)), method
    for prop in ("pid", "returncode"):
        assert isinstance(inspect.getattr_static(anyfork.Process, prop), property), prop
    assert inspect.iscoroutinefunction(anyfork.Process.run_async)
    assert inspect.iscoroutinefunction(anyfork.new_async)
    assert inspect.iscoroutinefunction(anyfork.Process.wait_async)


def _imports(path: str) -> set[str]:
    """The anyfork modules ``path`` imports at run time: at load or inside a
    function (a lazy import is an edge too), not under ``if TYPE_CHECKING``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "anyfork":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "anyfork":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_package_import_graph_has_no_cycle() -> None:
    src = os.path.dirname(anyfork.__file__)
    modules = {name[:-3] for name in os.listdir(src) if name.endswith(".py")}
    graph = {m: _imports(os.path.join(src, m + ".py")) & modules for m in modules}
    assert graph["__init__"] >= {"_process", "_errors"}, "setup: the parser found nothing"
    # The package imports its modules; no module needs the package back for
    # its own load, except the command line and the bench (users of the API).
    for users in ("__main__", "_bench"):
        graph.pop(users, None)
    for edges in graph.values():
        edges.discard("__init__")
    done: set[str] = set()

    def walk(m: str, path: list[str]) -> None:
        if m in path:
            cycle = [*path[path.index(m):], m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            walk(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        walk(m, [])


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


def test_process_has_no_public_constructor() -> None:
    with pytest.raises(TypeError):
        anyfork.Process()  # type: ignore[call-arg]
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TypeError):
            anyfork.Process(object(), a)  # type: ignore[arg-type]
        assert a.fileno() >= 0  # a refused construction took nothing from the caller


def test_the_pool_module_exports_exactly_its_api() -> None:
    from anyfork import pool

    assert pool.__all__ == ("BrokenPoolError", "Pool", "TaskTimeoutError", "retire", "run")
    for name in pool.__all__:
        assert getattr(pool, name).__module__ == "anyfork.pool"
    assert issubclass(pool.BrokenPoolError, anyfork.Error)
    assert issubclass(pool.TaskTimeoutError, anyfork.Error)
    assert issubclass(pool.TaskTimeoutError, TimeoutError)
    import concurrent.futures

    assert issubclass(anyfork.Executor, concurrent.futures.Executor)

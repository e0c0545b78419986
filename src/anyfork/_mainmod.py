"""Functions from the caller's main script, in processes that don't share its ``__main__``.

A function defined in the script the user ran is pickled (and named) as
``__main__.f``.  A process forked from the program itself (``fork_template``,
``anyfork.early``) has that ``__main__``; any other (``new``, ``new_exec``, a
remote host) has the serve loop's, which does not define ``f``.  So, as
multiprocessing's spawn does, such a process imports the caller's main module
under another name, ``__anyfork_main__``, so that its
``if __name__ == "__main__":`` block does not run, and names the process's
``__main__`` lacks are found there (names already there, such as those
``eval`` defined, win).

``describe()`` runs in the caller; ``install()`` in the process.  Standard
library only: the process imports this without the rest of anyfork.
"""

from __future__ import annotations

import sys

NAME = "__anyfork_main__"


def describe() -> tuple[str, str] | None:
    """How a process finds the caller's main module: ("module", name) for
    ``python -m``, ("path", file) for a script; None when there is none to
    import (the REPL, ``python -c``, a notebook)."""
    main = sys.modules.get("__main__")
    if main is None:
        return None
    # What a process makes from the main module's classes and functions
    # pickles as ``__anyfork_main__.X`` there (a task's result, say): here,
    # that name is the caller's own ``__main__``.
    sys.modules.setdefault(NAME, main)
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name != "__main__":
        return "module", name.removesuffix(".__main__") if name.endswith(".__main__") else name
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path.endswith(".py"):
        import os

        return "path", os.path.abspath(path)
    return None


def install(kind: str, value: str) -> None:
    """In a process: names missing from ``__main__`` are looked for in the
    caller's main module, imported (once) on the first such miss.

    Lazily, through a module ``__getattr__`` (PEP 562), which is what
    ``pickle`` and ``getattr`` meet when a name is not there: a process that
    never needs a function of the main script never runs the script's top
    level.  While the script runs, the process counts as being prepared (see
    ``_serve.preparing``): a script that creates processes at its top level,
    outside its ``__main__`` guard, gets an error instead of forking without end.
    """
    main = sys.modules["__main__"]
    if kind == "path" and getattr(main, "__file__", None) == value:
        return  # forked from the program itself: its __main__ is the caller's
    ns = main.__dict__
    if "__getattr__" in ns:
        return

    def missing(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        module = _load(kind, value)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module '__main__' has no attribute {name!r}, and neither has the "
                                 f"caller's main module ({value})") from None

    ns["__getattr__"] = missing


def _load(kind: str, value: str) -> object:
    module = sys.modules.get(NAME)
    if module is not None:
        return module
    import runpy
    import types

    module = types.ModuleType(NAME)
    sys.modules[NAME] = module
    serve = sys.modules.get("anyfork._serve")
    before = getattr(serve, "preparing", None)
    if serve is not None:
        serve.preparing = f"importing the caller's main module {value!r} as {NAME}"  # type: ignore[attr-defined]
    try:
        if kind == "module":
            names = runpy.run_module(value, run_name=NAME, alter_sys=False)
        else:
            names = runpy.run_path(value, run_name=NAME)
    except BaseException:
        del sys.modules[NAME]
        raise
    finally:
        if serve is not None:
            serve.preparing = before  # type: ignore[attr-defined]
    module.__dict__.update(names)
    return module

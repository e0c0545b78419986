"""Functions from the caller's main script, in processes that don't share its ``__main__``.

A function defined in the script the user ran is pickled (and named) as
``__main__.f``.  A process forked from the program itself (``fork_template``,
``anyfork.early``) has that ``__main__``; any other (``new``, ``new_exec``, a
remote host) has the serve loop's, which does not define ``f``.  So, as
multiprocessing's spawn does, such a process imports the caller's main module
under another name, ``__anyfork_main__``, so that its
``if __name__ == "__main__":`` block does not run, and what it defines is
added to the process's ``__main__`` (names already there, such as those
``eval`` defined, are kept).

``describe()`` runs in the caller; ``load()`` in the process.  Standard
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
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name != "__main__":
        return "module", name.removesuffix(".__main__") if name.endswith(".__main__") else name
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path.endswith(".py"):
        import os

        return "path", os.path.abspath(path)
    return None


def load(kind: str, value: str) -> None:
    """In a process: make the caller's main module's names resolvable as ``__main__``'s."""
    main = sys.modules["__main__"]
    if kind == "path" and getattr(main, "__file__", None) == value:
        return  # forked from the program itself: its __main__ is the caller's
    if NAME in sys.modules:
        return
    import runpy
    import types

    module = types.ModuleType(NAME)
    sys.modules[NAME] = module
    try:
        if kind == "module":
            names = runpy.run_module(value, run_name=NAME, alter_sys=False)
        else:
            names = runpy.run_path(value, run_name=NAME)
    except BaseException:
        del sys.modules[NAME]
        raise
    module.__dict__.update(names)
    ns = main.__dict__
    for key, obj in names.items():
        if not key.startswith("__"):
            ns.setdefault(key, obj)

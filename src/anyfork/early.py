"""Fork the program while it is still small: ``import anyfork.early`` first.

The seed's AnyEvent::Fork::Early.  Importing this module forks the program
right then and keeps the child, the *early process*, as a template.  From
then on :func:`anyfork.new_exec` forks its processes from the early process
instead of exec'ing an interpreter (fork speed, and it works where no
interpreter can be exec'ed: frozen or embedded programs), and
:func:`anyfork.new` uses it as the default template.

Make it the first import of the main program, before anything else is
loaded, opened or started::

    import anyfork.early  # noqa: F401 - first, on purpose
    import everything_else

The early process is the program as it was at that line: its ``__main__``
holds only what came before the import, so functions for ``run`` come from
modules (``require``) or ``eval``, as with an exec'ed process.

Imported later (other modules already loaded, threads already running) it
still works, but warns once with :class:`LateImportWarning`, saying why:
whatever was loaded is in every process forked from it, and a lock another
thread held at the fork stays locked there.

If the early process dies (or is closed), ``new_exec`` and ``new`` go back
to exec'ing interpreters.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import TYPE_CHECKING

from . import _exec
from ._runtime import runtime
from ._template import LateImportWarning, fork_template

if TYPE_CHECKING:
    from ._process import Process

__all__ = ("LateImportWarning", "process")

# Modules a program's start-up may load on its own, besides the standard
# library: site's helpers and what .pth files and customize hooks import.
_STARTUP_PREFIXES = ("_distutils_hack", "sitecustomize", "usercustomize", "__editable__", "_virtualenv")


def _initializing(module: object) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _loaded_before() -> list[str]:
    """Modules the program loaded before this one, other than anyfork's own.

    ``sys.modules`` is in import order: a module's key goes in when its
    import starts and moves to the end once the import has finished.  When
    this module runs, the ``anyfork`` package has just finished, so the keys
    are: the interpreter's start-up (up to the last of ``__main__``,
    ``site`` and ``runpy``), what the program loaded first, then anyfork's
    own imports, which begin with ``__future__`` and its first submodule
    (``_errors``, which imports nothing else), then ``anyfork``, then
    whatever the program loaded between ``import anyfork`` and this import,
    then ``anyfork.early``.  Modules still being imported (the one whose
    first line this is, the packages of ``python -m pkg.mod``) don't count.
    """
    names = list(sys.modules)
    here = names.index(__name__)
    pkg = names.index("anyfork")
    first_sub = next((i for i, n in enumerate(names) if n.startswith("anyfork.")), pkg)
    start = 0
    for marker in ("__main__", "site", "runpy"):
        if marker in names[:first_sub]:
            start = max(start, names.index(marker) + 1)
    skip = {"__future__"}
    for name, module in list(sys.modules.items()):
        if _initializing(module) or name == "__main__":
            spec_name = getattr(getattr(module, "__spec__", None), "name", None) or name
            parts = spec_name.split(".")
            skip.update(".".join(parts[:i]) for i in range(1, len(parts)))
    loaded = []
    for name in names[start:first_sub] + names[pkg + 1 : here]:
        if name in skip or name.startswith(("anyfork.", *_STARTUP_PREFIXES)):
            continue
        if _initializing(sys.modules.get(name)):
            continue
        loaded.append(name)
    return loaded


def _why_late() -> str | None:
    reasons = []
    others = threading.active_count() - 1
    if others > 0:
        reasons.append(f"{others} other thread(s) already running (a lock one of them holds "
                       "stays locked in every process forked from the early process)")
    loaded = _loaded_before()
    if loaded:
        # Most recent first: a module finishes loading after what it imports,
        # so the program's own imports lead, their dependencies trail.
        names = list(dict.fromkeys(n.partition(".")[0] for n in reversed(loaded)))
        public = [n for n in names if not n.startswith("_")] or names
        shown = ", ".join(public[:5]) + (" and more" if len(public) > 5 else "")
        reasons.append(f"modules already loaded ({shown}) are carried into every process "
                       "forked from the early process")
    return "; ".join(reasons) or None


def _start() -> Process:
    why = _why_late()
    if why is not None:
        # Warn before forking: a warning turned into an error leaves no process behind.
        warnings.warn(f"anyfork.early was not the first import: {why}", LateImportWarning, stacklevel=3)
    proc = fork_template(allow_threads=True)
    # What it has processed already; closed at exit with the rest of anyfork's sockets.
    runtime.set_early(proc, _exec.site_plan(sys.path)[1])
    return proc


#: The early process.  ``new_exec`` and ``new`` fork from it; don't ``run``,
#: ``eval`` or ``require`` on it yourself, or every later process inherits that.
process: Process = _start()

"""Starting a fresh interpreter that runs the serve loop (``new_exec``).

The caller never forks: it spawns with ``os.posix_spawn`` (glibc implements
it with ``clone(CLONE_VM|CLONE_VFORK)``, so the cost does not grow with the
caller's size).  Two descriptors cross: the child's end of the
command socket, dup2'ed to fd 3, and the sending end of the caller's failure
sink on fd 4; the serve loop closes anything else that an inheritable flag
let through before it runs any code of the user's.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import sysconfig

from ._errors import Error

FROZEN_MARKER = "--anyfork-serve"
_BIND_MARK = "ANYFORK_UNSET_BIND_NOW"  # read and removed by _boot.main
# The bootstrap travels in the environment, so that the command line ps
# shows is short: "python3 -S -c <one short line> anyfork process of PID".
# The short line takes it out again before anything else runs.
BOOT_VAR = "ANYFORK_BOOT"
_SHORT_C = f"exec(__import__('os').environ.pop({BOOT_VAR!r}),{{}})"
CHILD_FD = 3
FAILURE_FD = 4  # the sending end of the caller's failure sink (see _failures)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

_PYTHON_NAME = re.compile(r"python[0-9.]*[dmut]*(\.exe)?", re.IGNORECASE)


def find_python() -> str:
    """The interpreter to exec, found the way the seed finds perl.

    ``anyfork.PYTHON``, then ``$ANYFORK_PYTHON``, then ``sys.executable`` if it
    is an absolute path whose name looks like a python, then the base
    executable of a venv, then the one sysconfig names.
    """
    import anyfork

    override = getattr(anyfork, "PYTHON", None) or os.environ.get("ANYFORK_PYTHON")
    if override:
        return str(override)
    candidates = [sys.executable, getattr(sys, "_base_executable", ""),
                  os.path.join(sysconfig.get_config_var("BINDIR") or "",
                               "python" + (sysconfig.get_config_var("VERSION") or "3"))]
    for path in candidates:
        if (path and os.path.isabs(path) and _PYTHON_NAME.fullmatch(os.path.basename(path))
                and os.access(path, os.X_OK)):
            return path
    raise Error(
        "anyfork can't find a Python interpreter to exec (sys.executable is "
        f"{sys.executable!r}); set anyfork.PYTHON or ANYFORK_PYTHON"
    )


# -- site or no site -------------------------------------------------------------

_site_cache: tuple[tuple[str, ...], tuple[bool, list[str]]] | None = None


def site_plan(path: list[str]) -> tuple[bool, list[str]]:
    """How a child gets the import hooks the caller's site processing set up.

    ``-S`` starts several times faster, and with the caller's sys.path handed
    over, plain path-based imports work without site.  What would be lost is
    what site *runs*: import lines in .pth files (editable-install finders,
    other import hooks) and sitecustomize/usercustomize.  So:

    - the child runs site if the caller did and any of those is present in
      the site directories site itself processes;
    - directories the caller added with ``site.addsitedir`` that hold such
      .pth files are returned, for the child to process the same way (the
      SITE command), since the child's own site would not know them.

    The distutils-precedence.pth that setuptools installs everywhere only
    shims ``import distutils``; it does not count.

    Returns:
        (whether to run site, extra directories to ``site.addsitedir``)
    """
    global _site_cache
    key = tuple(path)
    if _site_cache is not None and _site_cache[0] == key:
        return _site_cache[1]
    result = _site_plan(path)
    _site_cache = (key, result)
    return result


def needs_site(path: list[str]) -> bool:
    """Whether a child must start with site processing (see ``site_plan``)."""
    return site_plan(path)[0]


def _ran_import_pth(entry: str) -> bool:
    """Whether ``entry`` holds a .pth file with import lines that ran here.

    A directory on sys.path may hold .pth files nobody processed (it was put
    there by PYTHONPATH or is a script's own directory, not a site
    directory).  Their code must not run in a child when it never ran in the
    caller, so an import line counts only if the modules it imports are
    loaded here: the trace processing it would have left.
    """
    try:
        names = os.listdir(entry or ".")
    except OSError:
        return False
    for name in names:
        if not name.endswith(".pth") or name == "distutils-precedence.pth":
            continue
        try:
            with open(os.path.join(entry or ".", name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("import ", "import\t")) and _imports_loaded(line):
                        return True
        except OSError:
            continue
    return False


def _imports_loaded(line: str) -> bool:
    """Whether an ``import a, b.c; ...`` line left its trace here.

    Every module it names must be loaded, and one of them must be outside
    the standard library: ``import os`` or ``import sys`` is loaded in every
    interpreter, so it proves nothing.  A hook that imports only standard
    modules is therefore never repeated in a child (the safe side: never run
    code the caller may not have run).
    """
    names = line[len("import") :].split(";", 1)[0].split(",")
    modules = [n.split(" as ")[0].strip() for n in names]
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    return (bool(modules) and all(m and m in sys.modules for m in modules)
            and any(m.partition(".")[0] not in stdlib for m in modules))


def _site_plan(path: list[str]) -> tuple[bool, list[str]]:
    hooked = [entry for entry in path if _ran_import_pth(entry)]
    if sys.flags.no_site or "site" not in sys.modules:
        # The caller ran without site: its hooks, if any, came from
        # addsitedir calls, which the child repeats.
        return False, hooked
    import site

    own: set[str] = set()
    try:
        own.update(os.path.abspath(d) for d in site.getsitepackages())
    except AttributeError:  # pragma: no cover - some virtualenv versions
        pass
    if site.ENABLE_USER_SITE:
        own.add(os.path.abspath(site.getusersitepackages()))
    customized = "sitecustomize" in sys.modules or "usercustomize" in sys.modules
    use_site = customized or any(os.path.abspath(e) in own for e in hooked)
    extra = [e for e in hooked if not (use_site and os.path.abspath(e) in own)]
    return use_site, extra


# -- spawning ------------------------------------------------------------------------


def _flag_args() -> list[str]:
    """Interpreter options the child should share with the caller."""
    args = []
    if sys.flags.isolated:
        args.append("-I")
    else:
        if sys.flags.ignore_environment:
            args.append("-E")
        if sys.flags.no_user_site:
            args.append("-s")
    if sys.flags.optimize:
        args.append("-" + "O" * sys.flags.optimize)
    if sys.flags.dont_write_bytecode:
        args.append("-B")
    for opt in sys.warnoptions:
        args.append("-W" + opt)
    for key, value in getattr(sys, "_xoptions", {}).items():
        args.append("-X" + (key if value is True else f"{key}={value}"))
    return args


def command(path: list[str], failure: bool = False) -> list[str]:
    """The argv that starts a serve loop on fd 3 (``failure``: with the
    failure sink on fd 4)."""
    if getattr(sys, "frozen", False):
        # A frozen program can't run -c; it runs itself, and freeze_support()
        # at the top of its main() diverts into the serve loop.
        return [sys.executable, FROZEN_MARKER, str(CHILD_FD), *([str(FAILURE_FD)] if failure else [])]
    python = find_python()
    args = [python, *_flag_args()]
    if not needs_site(path):
        args.append("-S")
    # exec in a dict of its own, so the bootstrap binds no name in __main__,
    # the namespace eval() and run() work in.  What follows is sys.argv[1],
    # for ps to show (_boot.main removes it from sys.argv).
    args += ["-c", _SHORT_C, f"anyfork process of {os.getpid()}"]
    return args


def boot_code(failure: bool = False) -> str:
    """The bootstrap an exec'd interpreter runs (through ``BOOT_VAR``): a
    stand-in ``anyfork`` package, so that importing ``_boot`` runs neither
    the package's ``__init__`` nor anything of the caller's side
    (``failure``: with the failure sink on fd 4)."""
    failure_arg = f", {FAILURE_FD}" if failure else ""
    return (
        "import sys\n"
        f"m = type(sys)('anyfork'); m.__path__ = [{_PKG_DIR!r}]; m.__anyfork_stub__ = True\n"
        "sys.modules['anyfork'] = m\n"
        "from anyfork._boot import main\n"
        f"main({CHILD_FD}{failure_arg})\n"
    )


def spawn(child_fd: int, path: list[str], failure_fd: int = -1) -> int:
    """Start a serve loop with ``child_fd`` as its command socket (and
    ``failure_fd`` as its failure sink, if not -1); its pid."""
    argv = command(path, failure_fd >= 0)
    actions = []
    dups = []
    # dup2(n, n) would keep close-on-exec set, and one target must not be
    # overwritten before it is read: go through numbers of our own.
    fd = child_fd
    if fd in (CHILD_FD, FAILURE_FD):
        fd = os.dup(child_fd)  # close-on-exec by default
        dups.append(fd)
    sink = failure_fd
    if sink in (CHILD_FD, FAILURE_FD):
        sink = os.dup(failure_fd)
        dups.append(sink)
    actions.append((os.POSIX_SPAWN_DUP2, fd, CHILD_FD))
    if sink >= 0:
        actions.append((os.POSIX_SPAWN_DUP2, sink, FAILURE_FD))
    # Bind every dynamic symbol at start-up: lazy binding would have each
    # forked child write the GOT pages again (a copy-on-write fault apiece)
    # the first time it calls a function its template never called.  The
    # serve loop removes the variable again, so nothing it runs inherits it.
    env = dict(os.environ)
    env["LD_BIND_NOW"] = "1"
    env[_BIND_MARK] = "1" if "LD_BIND_NOW" not in os.environ else "0"
    if not getattr(sys, "frozen", False):
        env[BOOT_VAR] = boot_code(failure_fd >= 0)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsigmask=(),
            setsigdef=_catchable_signals(),
        )
    except OSError as e:
        raise Error(f"anyfork could not start {argv[0]!r}: {e}") from e
    finally:
        for d in dups:
            os.close(d)


# -- a serve loop from source -------------------------------------------------------

#: The modules of the serve loop, in the order they must be built.
SERVE_MODULES = ("_protocol", "_serve")


_COMPILED: dict[tuple[str, bytes], bytes] = {}


def compiled(source: bytes, filename: str) -> bytes:
    """``source`` compiled by this Python, as the far side may take it in
    place of the source: this interpreter's magic number, then the marshalled
    code.  Made once per process: a caller that connects to many hosts
    compiles anyfork's far-side modules once, and the far side compiles
    nothing when it runs the caller's Python version (``_stage1``,
    ``_importer``); another version takes the source."""
    key = (filename, source)
    code = _COMPILED.get(key)
    if code is None:
        import importlib.util
        import marshal

        code = _COMPILED[key] = importlib.util.MAGIC_NUMBER + marshal.dumps(
            compile(source, filename, "exec", dont_inherit=True, optimize=0))
    return code


def pipe_bootstrap(modules: tuple[str, ...] = SERVE_MODULES,
                   entry: str = "_serve:serve_pipes") -> tuple[str, bytes]:
    """What starts a serve loop where anyfork isn't installed, over a pipe pair.

    Returns ``(program, preamble)``: run ``[python, "-S", "-c", program]``
    (on a remote host: through ssh), write ``preamble`` on its stdin, then
    the commands, encoded with ``_protocol``.  The program is ``_stage1``: it
    reads the serve loop's modules from the preamble (each as source and as
    this Python's code: see ``compiled``), builds them in memory
    and serves stdin and stdout (see ``_serve.serve_pipes``).  ``modules``
    and ``entry`` ("module:function") send other modules and start another
    loop instead (a remote host's hub).  Commands that
    carry descriptors (``send_fh``, ``fork``) are refused there.  After RUN
    the function talks to the caller over the same two pipes.
    """
    return stage1(), preamble(modules, entry)


def stage1() -> str:
    """The program of ``pipe_bootstrap``."""
    with open(os.path.join(_PKG_DIR, "_stage1.py"), encoding="utf-8") as f:
        return f.read()


def preamble(modules: tuple[str, ...] = SERVE_MODULES, entry: str = "_serve:serve_pipes") -> bytes:
    """The preamble of ``pipe_bootstrap`` (the first one in a process compiles ``modules``)."""
    parts = [len(modules).to_bytes(4, "little")]
    for name in modules:
        with open(os.path.join(_PKG_DIR, name + ".py"), "rb") as f:
            source = f.read()
        encoded = name.encode()
        code = compiled(source, f"<anyfork {name}>")
        parts += [len(encoded).to_bytes(4, "little"), encoded, len(source).to_bytes(8, "little"), source,
                  len(code).to_bytes(8, "little"), code]
    parts += [len(entry).to_bytes(4, "little"), entry.encode()]
    return b"".join(parts)


_SIGNALS: tuple[int, ...] | None = None


def _catchable_signals() -> tuple[int, ...]:
    """Every signal whose disposition the child should find at its default.

    A caller that ignores SIGCHLD or SIGINT must not pass that on: exec keeps
    ignored signals ignored.
    """
    global _SIGNALS
    if _SIGNALS is None:
        _SIGNALS = tuple(s for s in signal.valid_signals()
                         if s not in (signal.SIGKILL, signal.SIGSTOP))
    return _SIGNALS


def freeze_support() -> None:
    """Let a frozen program (PyInstaller and the like) start anyfork processes.

    Call it first thing in the program's main.  In a process that anyfork
    started by re-running the frozen executable, it runs the serve loop and
    never returns; everywhere else it does nothing.
    """
    if getattr(sys, "frozen", False) and len(sys.argv) >= 3 and sys.argv[1] == FROZEN_MARKER:
        from ._boot import main

        main(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else -1)

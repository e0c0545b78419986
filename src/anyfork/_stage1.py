"""The first stage of a serve loop that anyfork sends where it isn't installed.

Never imported: ``_exec.pipe_bootstrap`` sends this file's text as the
program of ``python -S -c``, and writes on that interpreter's stdin, ahead
of the commands, the sources of the modules of the serve loop (``_protocol``
and ``_serve``; for a remote hub, ``_mux``, ``_relay`` and ``_hub`` too)::

    <count u32> then, count times:
        <name length u32> <name> <source length u64> <source> <code length u64> <code>
    then the entry point: <length u32> "module:function"

(integers little endian).  ``code`` is the caller's Python's magic number
and the module's marshalled code: taken when this Python's magic number is
the same and it runs without -O (no compiling here), else the source is
compiled.  It builds them as modules of an in-memory
package, ``_anyfork_remote``, reading exactly their bytes from stdin and no
more, then calls the entry point: the loop on stdin and stdout
(``_serve.serve_pipes``), or a remote host's hub (``_hub.main``).
Nothing touches the disk, and no anyfork needs to be on the path.  Only the
standard library's builtins are used, so any Python 3 that runs the serve
loop runs this.
"""

import os
import sys

PACKAGE = "_anyfork_remote"


def _read(n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = os.read(0, n - len(data))
        if not more:
            raise SystemExit("anyfork: the bootstrap ended before its modules did")
        data += more
    return data


def _number(size: int) -> int:
    return int.from_bytes(_read(size), "little")


def main() -> None:
    # (The frozen importlib is loaded in every Python 3, even under -S.)
    magic = getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", None)
    package = type(sys)(PACKAGE)
    package.__path__ = []
    sys.modules[PACKAGE] = package
    for _ in range(_number(4)):
        name = _read(_number(4)).decode()
        source = _read(_number(8))
        code = _read(_number(8))
        module = type(sys)(f"{PACKAGE}.{name}")
        module.__package__ = PACKAGE  # for its "from . import _protocol"
        sys.modules[module.__name__] = module
        setattr(package, name, module)
        if magic and code[: len(magic)] == magic and not sys.flags.optimize:  # (compiled at level 0)
            import marshal

            exec(marshal.loads(code[len(magic):]), module.__dict__)
        else:
            exec(compile(source.decode(), f"<anyfork {name}>", "exec"), module.__dict__)
    module_name, _, function = _read(_number(4)).decode().partition(":")
    getattr(sys.modules[f"{PACKAGE}.{module_name}"], function)()


main()

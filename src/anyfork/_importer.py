"""Modules from the caller, on demand: the one importer a remote host's processes use.

Theory of operation
-------------------
A process on a remote host may need a module that exists only on the
caller's machine: a ``require`` of the user's own package, a function sent
by reference.  The hub (``_hub``) gives every process it starts one end of a
datagram socketpair to itself, and this module's :class:`Finder`, last on
``sys.meta_path``, asks over it for what the host's own finders did not
find:

- the process makes a socketpair of its own for the answer and sends the
  request ``<name>`` with one end of it (SCM_RIGHTS: the hub is on the same
  host), so that requests of many processes (forks of one template share
  the socket) never mix up their answers;
- the hub answers from its cache, or asks the caller (a CONTROL message on
  the connection) and caches what comes: each module crosses once per
  connection;
- the answer is ``OK <flags> <origin>\\0<source>\\0<code>`` or ``NO <why>``;
  flags say whether the module is a package (then its submodules are asked
  for the same way); code, for anyfork's own modules, is the caller's
  compiled code (``_exec.compiled``), taken in place of the source by a
  Python of the caller's version (empty for the user's modules).

Only Python crosses (source, and for anyfork's own modules code compiled
from it): a C extension, or a module the caller can't find either, fails
with an ImportError that names the module and the host.

The caller's side (what to answer for a name) is :func:`answer`.  This
module imports the standard library only: it is sent as source.
"""

from __future__ import annotations

import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

#: What a forwarded package's ``__path__`` holds: no directory on this host.
MARK = "<anyfork: from the caller>"
_TIMEOUT = 60.0
_MAX = 1 << 24


class Finder:
    """Finds modules on the caller's side, through the hub (see the module doc)."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self.sources: dict[str, tuple[bool, str, str, bytes]] = {}
        self.magic = getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", None)

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        import importlib.util

        if path is not None and MARK not in list(path):
            return None  # a submodule of this host's own package: not ours to find
        answer = self.ask(name)
        if answer is None:
            return None
        is_pkg, origin, _, _ = answer
        self.sources[name] = answer
        # A loader by its two methods (exec_module, create_module), as the
        # import system uses it; typeshed asks for the old load_module too.
        spec = importlib.util.spec_from_loader(name, self, origin=origin, is_package=is_pkg)  # type: ignore[arg-type]
        if spec is not None and is_pkg:
            spec.submodule_search_locations = [MARK]
        return spec

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        _, origin, source, code = self.sources[module.__name__]
        module.__file__ = origin
        magic = self.magic
        if magic and code[: len(magic)] == magic and not sys.flags.optimize:  # (compiled at level 0)
            import marshal

            exec(marshal.loads(code[len(magic):]), module.__dict__)
        else:
            exec(compile(source, origin, "exec"), module.__dict__)

    def ask(self, name: str) -> tuple[bool, str, str, bytes] | None:
        """The caller's source for ``name``; None if the caller has none to send."""
        mine, theirs = socket.socketpair()
        try:
            fd = theirs.fileno().to_bytes(4, sys.byteorder)
            request = name.encode("utf-8", "surrogatepass")
            self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd)])
            theirs.close()
            mine.settimeout(_TIMEOUT)
            chunks = []
            while data := mine.recv(1 << 20):
                chunks.append(data)
        except OSError as e:
            raise ImportError(f"no module named {name!r} on {self.host}, and the caller could not be "
                              f"asked for it ({e})", name=name) from e
        finally:
            theirs.close()
            mine.close()
        reply = b"".join(chunks)
        if reply.startswith(b"OK "):
            head, _, rest = reply[3:].partition(b"\0")
            source, _, code = rest.partition(b"\0")  # (answer sends no source with a NUL)
            flags, _, origin = head.partition(b" ")
            text = source.decode("utf-8", "surrogateescape")
            return flags == b"pkg", origin.decode("utf-8", "replace"), text, code
        why = reply[3:].decode("utf-8", "replace") if reply.startswith(b"NO ") else "no answer"
        if why.startswith("missing"):
            return None  # the caller has none either: the ordinary ModuleNotFoundError
        raise ImportError(f"module {name!r} can't be imported on {self.host}: {why}", name=name)


def install(sock: socket.socket, host: str) -> Finder:
    finder = Finder(sock, host)
    sys.meta_path.append(finder)
    return finder


def answer(name: str) -> bytes:
    """The caller's answer for ``name`` (runs on the caller's side)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        return f"NO missing: {e}".encode()
    if spec is None:
        return b"NO missing: the caller has no such module either"
    origin = spec.origin or ""
    get_source = getattr(spec.loader, "get_source", None)
    if not origin.endswith(".py"):
        what = ("a C extension" if origin.endswith((".so", ".pyd"))
                else f"not Python source ({origin or 'built in'})")
        return f"NO module {name!r} is {what}, which can't be sent to another host".encode()
    try:
        source: str | None = None if get_source is None else get_source(name)
        if source is None:
            # A loader with no get_source (pytest's, which rewrites test
            # modules as it imports them) over a .py file: the file is the source.
            with open(origin, "rb") as f:
                source = importlib.util.decode_source(f.read())
    except (ImportError, OSError, SyntaxError, UnicodeDecodeError) as e:
        return f"NO the caller can't read its source: {e}".encode()
    data = source.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        return b"NO its source contains a NUL byte, which Python refuses"
    head = b"OK " + (b"pkg" if spec.submodule_search_locations is not None else b"mod") + b" " + \
        origin.encode("utf-8", "surrogateescape") + b"\0"
    if len(head) + len(data) + 1 > _MAX:
        return b"NO its source is too large to send"
    code = b""
    if name.partition(".")[0] == "anyfork":
        # anyfork's own modules (an rpc or pool worker's) go compiled too,
        # made once per process.  Not the user's: compiling them here would
        # hold up this connection's relay (this runs in it), and the far side
        # compiles them as well as this side would.
        from ._exec import compiled

        try:
            code = compiled(data, origin)
        except Exception:  # (SyntaxError, RecursionError, MemoryError...: the far side says why)
            code = b""
        if len(head) + len(data) + 1 + len(code) > _MAX:
            code = b""
    return head + data + b"\0" + code

"""Handlers examples/remote.py runs on the remote host: this module is not
installed there; anyfork sends its source when the far side imports it."""

import dataclasses
import os
import socket


@dataclasses.dataclass
class Where:
    host: str
    pid: int
    ppid: int


def where() -> Where:
    return Where(socket.gethostname(), os.getpid(), os.getppid())


def word_count(text: str) -> int:
    return len(text.split())

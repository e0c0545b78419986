"""A signal handler that raises, due in the middle of queueing a frame, in
a program with no other thread (so the kernel can give the signal to no
one but the main thread, which holds signals back meanwhile): how much of
the frame is queued, and did the handler run?"""

import json
import os
import signal
import socket
import sys
import threading

from anyfork import _protocol as P
from anyfork._channel import CommandChannel


class Interrupt(Exception):  # noqa: N818 - stands for a handler's KeyboardInterrupt
    pass


def handler(signum, frame):
    raise Interrupt


def main():
    a, b = socket.socketpair()
    chan = CommandChannel(a)
    signal.signal(signal.SIGUSR1, handler)
    frame = P.fork_frame(7, False)
    sent = False

    def trace(f, event, arg):  # SIGUSR1 between the frame's first and second part
        nonlocal sent
        if f.f_code is P.Outbox.put.__code__ and event == "line" and not sent \
                and f.f_locals.get("first") is False:
            sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return trace

    interrupted = False
    sys.settrace(trace)
    try:
        with chan.lock:
            chan.put(frame, [os.dup(b.fileno())])
    except Interrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    print(json.dumps({"sent": sent, "interrupted": interrupted, "queued": len(chan.out),
                      "whole": sum(len(p) for p in frame), "threads": threading.active_count()}))


if __name__ == "__main__":
    main()

"""run(f) with f defined in this script, run as __main__, in processes that
don't share this __main__ (new, new_exec, a template's fork), and in one
that does (fork_template).  Prints, per kind, what f saw: its result, the
name its module had there, and whether the guarded block below ran there."""

import json
import os

import anyfork

GUARDED_RAN_IN = []  # the pid of the process where the guarded block ran, if it did


def square(sock, n):
    sock.sendall(json.dumps([int(n) ** 2, __name__, bool(GUARDED_RAN_IN)]).encode())


if __name__ == "__main__":
    GUARDED_RAN_IN.append(os.getpid())
    facts = {}
    forked_from_program = anyfork.fork_template()  # before any thread: it forks this program
    tpl = anyfork.new_exec()
    for label, make in [("new", anyfork.new), ("new_exec", anyfork.new_exec), ("fork", tpl.fork),
                        ("fork_template", forked_from_program.fork)]:
        proc = make().send_arg("7")
        with proc.run(square) as sock:
            facts[label] = json.loads(sock.recv(4096))
        facts[label].append(proc.wait(10))
    tpl.close()
    forked_from_program.close()
    print(json.dumps(facts))

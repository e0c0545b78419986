"""A caller forks (os.fork, then multiprocessing's fork) while its Executor
has a task running.  The child's copy of the executor must be dead: its
submit raises, the future it inherited unfinished fails, its shutdown and
its exit leave the parent's workers alone.  The parent's executor goes on
with the same workers.  Prints one JSON line of facts."""

import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import threading

import anyfork
import pool_handlers as h


def bounded(call):
    """What ``call()`` did within 5 s: its value, an exception's name, or "hung"."""
    box = []

    def go():
        try:
            box.append(("value", call()))
        except BaseException as e:
            box.append(("raised", type(e).__name__))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    return list(box[0]) if box else "hung"


def in_child(ex, pending):
    return {
        "submit": bounded(lambda: ex.submit(h.square, 3).result(5)),
        "inherited_result": bounded(lambda: pending.result(5)),
        "inherited_done": bounded(lambda: len(cf.wait([pending], timeout=5).done)),
        "shutdown": bounded(lambda: ex.shutdown(wait=True)),
    }


def mp_child(ex, pending, conn):
    conn.send(in_child(ex, pending))
    conn.close()


if __name__ == "__main__":
    facts = {}
    ex = anyfork.Executor(max_workers=2)
    ex.submit(h.square, 2).result(10)
    ex.submit(h.square, 2).result(10)
    before = sorted(ex._pool.workers)
    pending = ex.submit(h.sleep, 0.5)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(in_child(ex, pending)).encode())
        os.close(w)
        sys.exit(0)  # a normal exit: finalizers and atexit run in the child
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    facts["fork"] = json.loads(b"".join(chunks) or b"{}")
    facts["fork_status"] = os.waitstatus_to_exitcode(status)

    pending2 = ex.submit(h.sleep, 0.5)
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=mp_child, args=(ex, pending2, theirs))
    p.start()
    theirs.close()
    facts["mp"] = mine.recv() if mine.poll(20) else "hung"
    p.join(20)
    facts["mp_status"] = p.exitcode

    facts["parent_pending"] = [pending.result(10), pending2.result(10)]
    facts["parent_after"] = [ex.submit(h.square, i).result(10) for i in range(4)]
    # Every worker the parent had is still there (a second one may have come
    # since: the load above can start it, and it may still have been
    # starting when ``before`` was taken).
    facts["same_workers"] = set(before) <= set(ex._pool.workers)
    ex.shutdown()
    print(json.dumps(facts))

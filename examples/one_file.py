"""A whole program in one file: the function the new process runs is defined
beside the code that creates the process.  Copy it anywhere and run it."""

import anyfork


def shout(sock):
    """Runs in the new process: answer each line in capitals, until EOF."""
    with sock, sock.makefile("rwb") as f:
        for line in f:
            f.write(line.upper())
            f.flush()


# The new process imports this file to find shout() (as multiprocessing's
# spawn does), so the code that creates processes goes under this guard.
if __name__ == "__main__":
    proc = anyfork.new()
    sock = proc.run(shout)
    with sock, sock.makefile("rwb") as f:
        for word in (b"hello", b"world"):
            f.write(word + b"\n")
            f.flush()
            print("worker said:", f.readline().decode().strip())
    # Closing our end is the worker's EOF: shout() returns and it exits 0.
    print("worker exited with status", proc.wait(timeout=10))

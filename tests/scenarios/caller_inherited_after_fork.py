import json
import os
import signal
import subprocess
import threading

import anyfork
import helpers

p = anyfork.new_exec().eval("import time\ndef f(s):\n    time.sleep(60)\n")
s = p.run("f")
tpl = anyfork.new_exec()
c = tpl.fork()  # its pid not read yet
stale = p._child.pidfd.fd
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    facts = {}
    victim = subprocess.Popen(["sleep", "20"])
    held = []
    for _ in range(64):  # make p's old pidfd number name an unrelated process
        fd = os.pidfd_open(victim.pid)
        if fd == stale:
            break
        held.append(fd)
    facts["reused"] = fd == stale
    def attempt(name, call):
        box = []
        def go():
            try:
                call()
                box.append("returned")
            except BaseException as e:
                box.append(type(e).__name__)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(2)
        facts[name] = box[0] if box else "hung"
    for who, proc in (("p", p), ("c", c)):
        attempt(who + ".kill", lambda proc=proc: proc.kill(signal.SIGKILL))
        attempt(who + ".wait", lambda proc=proc: proc.wait(1))
        attempt(who + ".returncode", lambda proc=proc: proc.returncode)
        attempt(who + ".pid", lambda proc=proc: proc.pid)
    facts["victim_killed"] = helpers.wait_exited(victim.pid, 0.5)
    victim.kill()
    victim.wait()
    os.write(w, json.dumps(facts).encode())
    os._exit(0)
os.close(w)
chunks = []
while data := os.read(r, 65536):
    chunks.append(data)
os.close(r)
os.waitpid(pid, 0)
facts = json.loads(b"".join(chunks) or b"{}")
facts["p_alive_in_parent"] = p.returncode is None
p.kill()
facts["p_status"] = p.wait(5)
s.close()
c.close()
tpl.close()
tpl.wait(5)
print(json.dumps(facts))

import json

import anyfork
import anyfork.early  # first, on purpose
import helpers

p = anyfork.new_exec().eval(
    "import threading\n"
    "def job(sock):\n"
    "    def imp():\n"
    "        import anyfork.early\n"
    "    t = threading.Thread(target=imp, daemon=True)\n"
    "    t.start()\n"
    "    t.join(3)\n"
    "    sock.sendall(b'hung' if t.is_alive() else b'imported')\n")
s = p.run("job")
said = helpers.read_all(s, 8).decode()
s.close()
try:
    status = p.wait(3)
except anyfork.TimeoutExpired:
    p.kill(9)
    status = p.wait(5)
print(json.dumps({"said": said, "status": status}))

import json
import site
import sys

import anyfork
import anyfork.early  # first, on purpose
import helpers

site.addsitedir(sys.argv[1])  # runs count.pth here: the hook counts 1
import anyfork_pth_count

code = "import anyfork_pth_count\ndef f(s):\n    s.sendall(str(anyfork_pth_count.count).encode())\n"
counts = {"caller": anyfork_pth_count.count}
for name, make in (("new", anyfork.new), ("new_exec", anyfork.new_exec)):
    p = make().eval(code)
    s = p.run("f")
    counts[name] = int(helpers.read_all(s))
    s.close()
    p.wait(5)
print(json.dumps(counts))

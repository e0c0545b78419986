import json

from caller_pool import fill_pool, start, still_alive

from anyfork import _runtime

before = start()

tpl = _runtime.runtime.default
spares = fill_pool(tpl)
tpl.close()
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": {}}))

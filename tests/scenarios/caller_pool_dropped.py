import gc
import json

from caller_pool import fill_pool, start, still_alive

from anyfork import _runtime

before = start()

spares = fill_pool(_runtime.runtime.default)
_runtime.runtime.default = None
gc.collect()
print(json.dumps({"spares": len(spares), "alive": still_alive(spares), "leaked": {}}))

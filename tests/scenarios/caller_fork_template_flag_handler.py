import json
import signal

import anyfork

stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # a shutdown flag
tpl = anyfork.fork_template()
child = tpl.fork()  # never run
def killed(p):
    p.kill()
    try:
        return p.wait(3)
    except anyfork.TimeoutExpired:
        p.kill(signal.SIGKILL)  # clean up what the test started
        p.wait(5)
        return None
facts = {"child": killed(child), "template": killed(tpl)}
print(json.dumps(facts))

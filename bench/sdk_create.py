"""Times `Sandbox.create` (create-to-usable, as the SDK sees it) N times; prints JSON seconds.

Run by bench/api.py in its own process: the SDK package is named `watasu`,
like our Django project, so the two cannot share an interpreter.
"""

import json
import sys
import time

from watasu import Sandbox

runs = int(sys.argv[1])
times = []
for _ in range(runs):
    started = time.perf_counter()
    sandbox = Sandbox.create(timeout=120)
    times.append(time.perf_counter() - started)
    sandbox.kill()
print(json.dumps(times))

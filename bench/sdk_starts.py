"""Run by bench/api.py in its own process (the SDK package is also named `watasu`).

    sdk_starts.py create <runs>        Sandbox.create to usable, one at a time (JSON seconds)
    sdk_starts.py concurrent <count>   <count> creates at once: each one's seconds, then the wall time
    sdk_starts.py pause <runs>         pause, then resume (Sandbox.connect), of one sandbox
    sdk_starts.py run <runs>           commands.run("true") round trips on one sandbox

Before each create (`create`) it reads a line from stdin, and prints `done` after it:
bench/api.py refills the warm pool in between (as the pool sweep does in the background).
Prints JSON (last line).
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from watasu import Sandbox

action, count = sys.argv[1], int(sys.argv[2])


def timed_create() -> tuple[float, Sandbox]:
    started = time.perf_counter()
    sandbox = Sandbox.create(timeout=300)
    assert sandbox.commands.run("true").exit_code == 0
    return time.perf_counter() - started, sandbox


if action == "create":
    times = []
    for _ in range(count):
        sys.stdin.readline()  # the pool was refilled
        seconds, sandbox = timed_create()
        times.append(seconds)
        sandbox.kill()
        print("done", flush=True)
    print(json.dumps(times))
elif action == "concurrent":
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as workers:
        results = list(workers.map(lambda _: timed_create(), range(count)))
    wall = time.perf_counter() - started
    for _, sandbox in results:
        sandbox.kill()
    print(json.dumps({"each": [seconds for seconds, _ in results], "wall": wall}))
elif action == "pause":
    sandbox = Sandbox.create(timeout=600)
    pauses, resumes = [], []
    for _ in range(count):
        started = time.perf_counter()
        sandbox.pause()
        pauses.append(time.perf_counter() - started)
        started = time.perf_counter()
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=600)
        assert sandbox.commands.run("true").exit_code == 0
        resumes.append(time.perf_counter() - started)
    sandbox.kill()
    print(json.dumps({"pause": pauses, "resume": resumes}))
elif action == "run":
    sandbox = Sandbox.create(timeout=300)
    sandbox.commands.run("true")  # the first one captures the login environment
    trips = []
    for _ in range(count):
        started = time.perf_counter()
        sandbox.commands.run("true")
        trips.append(time.perf_counter() - started)
    sandbox.kill()
    print(json.dumps(trips))
else:
    raise SystemExit(f"unknown action {action}")

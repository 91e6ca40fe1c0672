"""Run by bench/api.py in its own process (the SDK package is also named `watasu`).

    sdk_starts.py create <runs>        Sandbox.create (returned with a session), then a first
                                       commands.run, one sandbox at a time
    sdk_starts.py concurrent <count>   <count> of those at once, and the wall time
    sdk_starts.py pause <runs>         pause, resume (Sandbox.connect), a first command
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


def timed_create() -> tuple[float, float, Sandbox]:
    """Seconds until Sandbox.create returned (a session ready), then for a first command."""
    started = time.perf_counter()
    sandbox = Sandbox.create(timeout=300)
    created = time.perf_counter()
    assert sandbox.commands.run("true").exit_code == 0
    return created - started, time.perf_counter() - created, sandbox


if action == "create":
    creates, firsts = [], []
    for _ in range(count):
        sys.stdin.readline()  # the pool was refilled
        seconds, first, sandbox = timed_create()
        creates.append(seconds)
        firsts.append(first)
        sandbox.kill()
        print("done", flush=True)
    print(json.dumps({"create": creates, "first_command": firsts}))
elif action == "concurrent":
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as workers:
        results = list(workers.map(lambda _: timed_create(), range(count)))
    wall = time.perf_counter() - started
    for _, _, sandbox in results:
        sandbox.kill()
    each = [create for create, _, _ in results]
    usable = [create + first for create, first, _ in results]
    print(json.dumps({"create": each, "with_first_command": usable, "wall": wall}))
elif action == "pause":
    sandbox = Sandbox.create(timeout=600)
    pauses, resumes, firsts = [], [], []
    for _ in range(count):
        started = time.perf_counter()
        sandbox.pause()
        pauses.append(time.perf_counter() - started)
        started = time.perf_counter()
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=600)
        resumed = time.perf_counter()
        assert sandbox.commands.run("true").exit_code == 0
        resumes.append(resumed - started)
        firsts.append(time.perf_counter() - resumed)
    sandbox.kill()
    print(json.dumps({"pause": pauses, "resume": resumes, "first_command": firsts}))
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

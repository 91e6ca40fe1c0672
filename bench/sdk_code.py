"""Run by bench/code.py in its own process (the SDK package is also named `watasu`).

    sdk_code.py <creates> <runs>

Times cold starts (code-interpreter create + first run_code; base create + commands.run) and,
on one code sandbox, run_code and exec round trips through the edge and exec straight at the
agent's forwarded port: it prints `sandbox <id>` and reads back `<agent URL> <agent secret>`,
which the caller looks up. Prints JSON seconds last.
"""

import json
import sys
import time

from watasu_code_interpreter import Sandbox

from watasu import Sandbox as BaseSandbox

creates, runs = int(sys.argv[1]), int(sys.argv[2])
keys = ("base_start", "code_start", "first_run", "run_code", "exec_edge", "exec_direct")
result = {key: [] for key in keys}

for _ in range(creates):
    started = time.perf_counter()
    base = BaseSandbox.create(template="base", timeout=120)
    base.commands.run("true")
    result["base_start"].append(time.perf_counter() - started)
    base.kill()
    started = time.perf_counter()
    code = Sandbox.create(timeout=120)
    first = time.perf_counter()
    assert code.run_code("1+1").text == "2"
    now = time.perf_counter()
    result["code_start"].append(now - started)
    result["first_run"].append(now - first)
    code.kill()

sbx = Sandbox.create(timeout=600)
try:
    sbx.run_code("1+1")
    sbx.commands.run("true")
    for _ in range(runs):
        started = time.perf_counter()
        sbx.run_code("1+1")
        result["run_code"].append(time.perf_counter() - started)
    for _ in range(runs):
        started = time.perf_counter()
        sbx.commands.run("true")
        result["exec_edge"].append(time.perf_counter() - started)
    print(f"sandbox {sbx.sandbox_id}", flush=True)
    sbx._data_plane.base_url, sbx._data_plane.token = sys.stdin.readline().split()  # the agent itself
    for _ in range(runs):
        started = time.perf_counter()
        sbx.commands.run("true")
        result["exec_direct"].append(time.perf_counter() - started)
finally:
    sbx.kill()
print(json.dumps(result))

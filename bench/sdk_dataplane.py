"""Run by bench/dataplane.py in its own process (the SDK package is also named `watasu`).

    sdk_dataplane.py <sandbox id> <direct agent URL> <agent secret> <runs> <MiB>

Measures, through the edge (the session's data_plane_url) and then straight at the
agent's forwarded port (same SDK, base URL and token swapped): `commands.run("true")`
round trips, and a file write and read of <MiB> MiB. Prints JSON.
"""

import json
import os
import sys
import time

from watasu import Sandbox

sandbox_id, direct_url, secret = sys.argv[1:4]
runs, mib = int(sys.argv[4]), int(sys.argv[5])
payload = os.urandom(mib * 2**20)


def measure(sbx: Sandbox) -> dict:
    sbx.commands.run("true")  # warm up
    trips = []
    for _ in range(runs):
        started = time.perf_counter()
        sbx.commands.run("true")
        trips.append(time.perf_counter() - started)
    started = time.perf_counter()
    sbx.files.write("/root/bench.bin", payload)
    write = time.perf_counter() - started
    started = time.perf_counter()
    data = sbx.files.read("/root/bench.bin", format="bytes")
    read = time.perf_counter() - started
    assert data == payload
    return {"round_trips": trips, "write_s": write, "read_s": read}


sbx = Sandbox.connect(sandbox_id)
edge = measure(sbx)
sbx._data_plane.base_url = direct_url  # the same clients, pointed straight at the agent
sbx._data_plane.token = secret
direct = measure(sbx)
print(json.dumps({"edge": edge, "direct": direct}))

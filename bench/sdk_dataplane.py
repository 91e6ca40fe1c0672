"""Run by bench/dataplane.py in its own process (the SDK package is also named `watasu`).

    sdk_dataplane.py <sandbox id> <direct agent URL> <agent secret> <runs> <MiB>

Measures, through the edge (the session's data_plane_url) and then straight at the
agent's forwarded port (same SDK, base URL and token swapped): `commands.run("true")`
round trips, and a file write and read of <MiB> MiB. Straight at the agent it also times,
over the bare process protocol, `true` in a real login shell (`bash -lc true`, what
`commands.run` cost before the agent's login fast path) and a fork/exec of /bin/true.
Prints JSON.
"""

import json
import os
import sys
import time

import websocket

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


def bare_round_trip(cmd: str, args: list[str]) -> float:
    """Start `cmd args` over the agent's process WebSocket and wait for its exit; seconds."""
    started = time.perf_counter()
    sock = websocket.create_connection(
        direct_url.replace("http", "ws", 1) + "/runtime/v1/process",
        timeout=60,
        header=[f"Authorization: Bearer {secret}"],
    )
    sock.send(json.dumps({"type": "start", "cmd": cmd, "args": args}))
    while json.loads(sock.recv())["type"] != "exit":
        pass
    sock.close()
    return time.perf_counter() - started


def against_login_shell(sbx: Sandbox) -> dict:
    """`commands.run("true")`, `bash -lc true` and /bin/true, interleaved so that a busy host
    weighs on the three alike (straight at the agent)."""
    trips: dict[str, list[float]] = {"sdk": [], "login_shell": [], "bin_true": []}
    for i in range(runs + 1):  # the first round warms up
        started = time.perf_counter()
        sbx.commands.run("true")
        sdk = time.perf_counter() - started
        login = bare_round_trip("/bin/bash", ["-lc", "true"])
        true = bare_round_trip("/bin/true", [])
        if i:
            trips["sdk"].append(sdk)
            trips["login_shell"].append(login)
            trips["bin_true"].append(true)
    return trips


sbx = Sandbox.connect(sandbox_id)
edge = measure(sbx)
sbx._data_plane.base_url = direct_url  # the same clients, pointed straight at the agent
sbx._data_plane.token = secret
direct = measure(sbx)
direct["login"] = against_login_shell(sbx)
print(json.dumps({"edge": edge, "direct": direct}))

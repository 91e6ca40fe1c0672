"""Data-plane benchmark: the edge (uvicorn + sandboxes.edge) against the guest agent directly.

    .venv/bin/python bench/dataplane.py [--runs 50] [--mib 64] [--stream-gib 1]

In one run, on one machine, against one real sandbox:
  1. `commands.run("true")` round trips through the real SDK (a WebSocket each), via the
     edge and straight at the agent's forwarded port: p50/p95 and the edge's overhead; and,
     straight at the agent, `bash -lc true` (a real login shell, what `commands.run` cost
     before the agent's login fast path) and a fork/exec of /bin/true for reference;
  2. a <mib> MiB `files.write` and `files.read` both ways: throughput and the share the
     edge keeps;
  3. <stream-gib> GiB uploaded (to /dev/null) and downloaded (from /dev/zero) through the
     edge while the web process's resident memory is sampled from /proc: baseline and peak.
Targets: the edge adds <= 25 % to the round trip, keeps >= 70 % of direct throughput,
and its memory stays flat. Uses PostgreSQL database `watasu_bench` and its own data dir.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import requests
from common import (  # bench/ on sys.path
    ms,
    percentile,
    prepare_database,
    start_uvicorn,
    use_bench_environment,
)

PORT = 18000 + secrets.randbelow(1000)
ROOT = use_bench_environment(WATASU_PUBLIC_URL=f"http://127.0.0.1:{PORT}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


class RssSampler(threading.Thread):
    """Samples a process's resident memory every 20 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)


class ZeroReader:
    """`size` bytes of zeros as a file-like body (never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left, self.block = size, bytes(2**20)

    def __len__(self) -> int:
        return self.left

    def read(self, size: int = -1) -> bytes:
        part = self.block[: min(len(self.block), self.left)]
        self.left -= len(part)
        return part


def stream_through_edge(dp: str, token: str, size: int) -> tuple[float, float]:
    """Upload `size` bytes to /dev/null and download `size` bytes of /dev/zero; seconds each."""
    auth = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    up = requests.put(
        f"{dp}/runtime/v1/files?path=/dev/null", data=ZeroReader(size), headers=auth, timeout=3600
    )
    assert up.status_code == 200, up.text
    upload = time.perf_counter() - started
    started = time.perf_counter()
    received = 0
    with requests.get(
        f"{dp}/runtime/v1/files?path=/dev/zero", headers=auth, stream=True, timeout=3600
    ) as down:
        for part in down.iter_content(2**16):
            received += len(part)
            if received >= size:
                break
    return upload, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--stream-gib", type=float, default=1.0)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm
    from sandboxes.services import host_register_local, sandbox_destroy
    from templates_app.services import base_template_ensure

    base_template_ensure(host=host_register_local())
    team = f"bench-{secrets.token_hex(3)}"
    out = io.StringIO()
    call_command("create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=out)
    key = out.getvalue().strip()
    server = start_uvicorn(
        ROOT, PORT, "--ws", "websockets-sansio", "--ws-ping-interval", "60", "--ws-ping-timeout", "120"
    )
    sandbox = None
    try:
        created = requests.post(
            f"http://127.0.0.1:{PORT}/v1/sandboxes",
            json={"timeout": 3600},
            headers={"Authorization": f"Bearer {key}"},
            timeout=150,
        ).json()
        sandbox = Sandbox.objects.get(pk=created["sandbox"]["id"])
        agent = vm.agent_client(sandbox)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WATASU_", "DJANGO_"))}
        env.update(WATASU_API_URL=f"http://127.0.0.1:{PORT}/v1", WATASU_API_KEY=key)
        result = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-P",
                    str(ROOT / "bench" / "sdk_dataplane.py"),
                    str(sandbox.pk),
                    f"http://127.0.0.1:{agent.port}",
                    agent.secret or "",
                    str(args.runs),
                    str(args.mib),
                ],
                cwd="/",
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=3600,
            ).stdout
        )
        edge, direct = result["edge"], result["direct"]
        print(f"commands.run('true') via edge:    {ms(edge['round_trips'])}")
        print(f"commands.run('true') direct:      {ms(direct['round_trips'])}")
        overhead = percentile(edge["round_trips"], 0.5) / percentile(direct["round_trips"], 0.5) - 1
        print(f"edge overhead at p50:             {overhead * 100:5.1f} % (target <= 25 %)")
        login = direct["login"]
        print(f"interleaved, direct: commands.run('true') {ms(login['sdk'])}")
        print(f"  a real login shell (bash -lc true)    {ms(login['login_shell'])}")
        print(f"  fork/exec of /bin/true                {ms(login['bin_true'])}")
        fast = percentile(login["sdk"], 0.5)
        print(
            f"  commands.run('true') at p50: {fast / percentile(login['login_shell'], 0.5):4.2f}x a real "
            f"login shell, {fast / percentile(login['bin_true'], 0.5):4.2f}x /bin/true (target <= 100 ms)"
        )
        for op in ("write", "read"):
            via, raw = args.mib / edge[f"{op}_s"], args.mib / direct[f"{op}_s"]
            print(
                f"{args.mib} MiB {op:5}: edge {via:6.1f} MiB/s, direct {raw:6.1f} MiB/s, "
                f"kept {via / raw * 100:5.1f} % (target >= 70 %)"
            )

        session = created["session"]
        sampler = RssSampler(server.pid)
        baseline = rss_kib(server.pid)
        sampler.start()
        size = int(args.stream_gib * 2**30)
        upload, download = stream_through_edge(session["data_plane_url"], session["token"], size)
        sampler.running = False
        sampler.join()
        print(
            f"{args.stream_gib:g} GiB through the edge: up {size / upload / 2**20:6.1f} MiB/s, "
            f"down {size / download / 2**20:6.1f} MiB/s"
        )
        print(
            f"web process RSS: before {baseline / 1024:6.1f} MiB, peak while streaming "
            f"{sampler.peak / 1024:6.1f} MiB (+{(sampler.peak - baseline) / 1024:.1f} MiB)"
        )
    finally:
        if sandbox is not None:
            sandbox_destroy(sandbox=sandbox)
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

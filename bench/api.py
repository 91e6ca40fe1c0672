"""Control-plane benchmark: SDK create-to-usable vs the driver's own start, and list latency;
with --fast-starts, warm pools, shapes, concurrency, pause tiers, commands and density.

    make bench-api            (or: .venv/bin/python bench/api.py [--runs 10])
    make bench-starts         (or: .venv/bin/python bench/api.py --fast-starts [--runs 20])

In one run, on one machine:
  1. the driver's own start (restore of the base snapshot + agent ready + init), N times;
  2. `Sandbox.create` through the real SDK against uvicorn (HTTP, auth, quota, placement,
     database, the same driver start), N times -> API overhead = SDK p50 / driver p50 - 1;
  3. `GET /v1/sandboxes?limit=50` over 10,000 sandbox rows: p50 latency through uvicorn,
     and the number of SQL queries for one page at 10 rows and at 10,000 rows.
--fast-starts measures instead, in one run (the figures of docs/fast-starts.md):
  1. the raw QEMU restore floor of the base snapshot (bench/runtime.py's);
  2. SDK create to usable (create + a first `commands.run`) with no pool (a server with
     WATASU_POOL_ENABLED=false) and from a warm pool (the bench refills the pool between
     creates, untimed, as the pool sweep does in the background);
  3. a create of a non-baseline shape (2 vCPU, 1024 MiB) once its shape snapshot exists,
     against a baseline create, both without a pool;
  4. 20 concurrent SDK creates from a pool of 20: every create's time and the wall time;
  5. SDK pause and resume, held in memory (the pool server) and on disk (the other);
  6. `commands.run("true")` through the SDK;
  7. density: idle 512 MiB sandboxes created until placement refuses, on the stated
     operator settings (64 vCPUs, memory overcommit 200 %), host memory per sandbox with
     and without KSM (a host-global knob: turned on for the measurement, then back off).
Uses PostgreSQL database `watasu_bench` (created when missing) and its own data directory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import (  # bench/ is on sys.path
    ms,
    percentile,
    prepare_database,
    sdk,
    start_uvicorn,
    use_bench_environment,
)

ROOT = use_bench_environment()


def driver_starts(runs: int) -> list[float]:
    from sandboxes.runtime import driver_for, lifecycle
    from sandboxes.services import host_register_local
    from templates_app.services import base_template_ensure

    host = host_register_local()
    snapshot = lifecycle.load_template_snapshot(base_template_ensure(host=host).artifact_dir)
    driver = driver_for(host)
    times = []
    for _ in range(runs):
        name = f"wbench-drv-{secrets.token_hex(3)}"
        started = time.perf_counter()
        lifecycle.start_from_snapshot(driver, snapshot, name, driver.state_dir)
        times.append(time.perf_counter() - started)
        driver.destroy(name)
    return times


def sdk_creates(port: int, key: str, runs: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATASU_", "DJANGO_"))}
    env.update(WATASU_API_URL=f"http://127.0.0.1:{port}/v1", WATASU_API_KEY=key)
    out = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bench" / "sdk_create.py"), str(runs)],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(out.stdout)


def seed_sandboxes(team_slug: str, count: int) -> None:
    from django.db import connection

    from sandboxes.models import Sandbox, SandboxState
    from teams.models import Team

    team = Team.objects.get(slug=team_slug)
    Sandbox.objects.bulk_create(
        [
            Sandbox(
                team=team,
                state=SandboxState.STOPPED,
                cpu_count=1,
                memory_mb=512,
                timeout=300,
                metadata={"i": str(i)},
                route_token=secrets.token_hex(8),
            )
            for i in range(count)
        ],
        batch_size=2000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sandboxes_sandbox")  # as autovacuum would after such a load


def list_queries(key: str) -> int:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}", HTTP_HOST="127.0.0.1")
    client.get("/v1/sandboxes?limit=50")
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/v1/sandboxes?limit=50").status_code == 200
    return len(queries)


def list_latency(port: int, key: str, runs: int) -> list[float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/sandboxes?limit=50", headers={"Authorization": f"Bearer {key}"}
    )
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
        times.append(time.perf_counter() - started)
    assert len(body["sandboxes"]) == 50 and body["next_token"]
    return times


def server(port: int, **env: str) -> subprocess.Popen[bytes]:
    """uvicorn with these settings on top of the bench's."""
    saved = dict(os.environ)
    os.environ.update(env, WATASU_PUBLIC_URL=f"http://127.0.0.1:{port}")  # the data plane too
    try:
        return start_uvicorn(ROOT, port, "--ws", "websockets-sansio")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def host_available_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) // 1024


def ksm(run: int) -> int:
    """Switch KSM (0 off and unmerge, 1 on) and return the pages it shares now."""
    root = Path("/sys/kernel/mm/ksm")
    if run:
        (root / "pages_to_scan").write_text("20000")
        (root / "sleep_millisecs").write_text("10")
    (root / "run").write_text(str(2 if run == 0 else 1))
    return int((root / "pages_sharing").read_text())


def density(port: int, key: str) -> None:
    """Idle sandboxes until placement refuses, then memory per sandbox without and with KSM."""
    import httpx

    from sandboxes.models import Sandbox

    ksm(0)
    before = host_available_mb()
    count = 0
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"}
    ) as api:
        while count < 200:
            answer = api.post("/sandboxes", json={"template": "base", "timeout": 3600}, timeout=120)
            if answer.status_code == 503:
                break
            answer.raise_for_status()
            count += 1
        print(
            f"idle 512 MiB sandboxes before placement refused: {count} (target >= 60; 64 vCPUs, 200 % memory)"
        )
        print(f"  refusal: {answer.json()['message']}")
        time.sleep(20)  # settle
        plain = (before - host_available_mb()) / max(count, 1)
        print(f"host memory per idle sandbox, KSM off:  {plain:6.0f} MiB")
        ksm(1)
        time.sleep(90)
        shared = ksm(1)
        merged = (before - host_available_mb()) / max(count, 1)
        print(
            f"host memory per idle sandbox, KSM on:   {merged:6.0f} MiB  "
            f"({merged / plain:.2f}x; {shared * 4 / 1024:.0f} MiB of pages shared after 90 s)"
        )
        for sandbox in Sandbox.objects.filter(state="ready"):
            api.delete(f"/sandboxes/{sandbox.pk}", timeout=120)
    ksm(0)


def fast_starts(team: str, key: str, runs: int) -> None:
    from django.conf import settings
    from runtime import bench_raw_floor  # bench/runtime.py

    from sandboxes import pool
    from sandboxes.models import Host
    from sandboxes.runtime import driver_for, lifecycle
    from sandboxes.services import host_register_local
    from teams.models import Team
    from templates_app.services import base_template_ensure

    host = host_register_local()
    Host.objects.filter(pk=host.pk).update(cpu_capacity=64)  # operator setting: idle VMs need no core
    # the team may hold more than the host: placement, not the quota, ends the density run
    limits = {"max_running_instances": 1000, "max_vcpu_count": 1000, "max_memory_mb": 10**6}
    Team.objects.filter(slug=team).update(**limits)
    version = base_template_ensure(host=host)
    snapshot = lifecycle.load_template_snapshot(version.artifact_dir)
    with tempfile.TemporaryDirectory(prefix="watasu-bench-floor-") as work:
        Path(work).chmod(0o755)
        floor = bench_raw_floor(snapshot, Path(work), 5)
    print(f"raw QEMU restore floor (agent ready):      {ms(floor)}")
    settings.POOL_BASE_SIZE = settings.POOL_MAX_PER_SHAPE = settings.POOL_FILL_BATCH = 20
    settings.POOL_MAX_MEMORY_MB = 20 * 512

    def refill() -> None:
        while pool.pool_sweep()["more"]:
            pass

    cold_port, warm_port = 18000 + secrets.randbelow(500), 18500 + secrets.randbelow(500)
    cold = server(
        cold_port,
        WATASU_POOL_ENABLED="false",
        WATASU_PAUSE_IN_MEMORY_SECONDS="0",
        WATASU_MEMORY_OVERCOMMIT_PERCENT="200",
    )
    warm = server(warm_port)
    try:
        plain = sdk(cold_port, key, "create", runs)
        print(f"SDK create, no pool:                       {ms(plain['create'])}")
        print(f"  then its first commands.run:             {ms(plain['first_command'])}")
        settings.POOL_BASE_SIZE = 1
        pooled = sdk(warm_port, key, "create", runs, between=refill)
        print(f"SDK create, warm pool:                     {ms(pooled['create'])}")
        print(f"  then its first commands.run:             {ms(pooled['first_command'])}")
        p50 = percentile(pooled["create"], 0.5)
        print(
            f"  pool / no pool: {p50 / percentile(plain['create'], 0.5):.2f}x;  pool / raw floor: "
            f"{p50 / percentile(floor, 0.5):.2f}x (target p50 <= 250 ms, below the floor)"
        )
        settings.POOL_BASE_SIZE = 20
        refill()
        crowd = sdk(warm_port, key, "concurrent", 20)
        print(
            f"20 concurrent creates from a pool of 20:   all returned in {max(crowd['create']):.2f} s "
            f"({ms(crowd['create'])}); with a first command each: {max(crowd['with_first_command']):.2f} s "
            "(target all usable within 3 s)"
        )
        settings.POOL_ENABLED = False
        refill()  # the pool drained: what follows measures pauses and density, not pooled VMs
        memory = sdk(warm_port, key, "pause", max(3, runs // 2))
        disk = sdk(cold_port, key, "pause", max(3, runs // 2))
        print(f"SDK pause, held in memory:                 {ms(memory['pause'])}")
        print(f"SDK resume from memory:                    {ms(memory['resume'])} (target <= 100 ms)")
        print(f"  then its first commands.run:             {ms(memory['first_command'])}")
        print(f"SDK pause, to disk:                        {ms(disk['pause'])}")
        print(f"SDK resume from disk:                      {ms(disk['resume'])}")
        print(f"  then its first commands.run:             {ms(disk['first_command'])}")
        trips = sdk(cold_port, key, "run", 30)
        print(f'SDK commands.run("true"):                   {ms(trips)} (target p50 <= 100 ms)')
        density(cold_port, key)
    finally:
        for process in (cold, warm):
            process.terminate()
            process.wait(timeout=30)
        driver = driver_for(host)
        for name in driver.list_domains(settings.RUNTIME_VM_PREFIX):
            driver.destroy(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--fast-starts", action="store_true")
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    from sandboxes.models import Sandbox

    Sandbox.objects.all().delete()
    team = f"bench-{secrets.token_hex(3)}"
    out = io.StringIO()
    call_command("create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=out)
    key = out.getvalue().strip()
    if args.fast_starts:
        fast_starts(team, key, args.runs)
        return

    drivers = driver_starts(args.runs)
    print(f"driver start (restore + agent ready + init): {ms(drivers)}")
    port = 18000 + secrets.randbelow(1000)
    server = start_uvicorn(ROOT, port)
    try:
        creates = sdk_creates(port, key, args.runs)
        print(f"SDK Sandbox.create to usable:                {ms(creates)}")
        overhead = percentile(creates, 0.5) / percentile(drivers, 0.5) - 1
        print(f"API overhead at p50:                         {overhead * 100:5.1f} % (target <= 25 %)")
        seed_sandboxes(team, 10)
        few = list_queries(key)
        seed_sandboxes(team, 10_000 - 10)
        many = list_queries(key)
        print(f"list queries per page, 10 vs 10,000 rows:    {few} vs {many}")
        latency = list_latency(port, key, 50)
        print(f"GET /v1/sandboxes?limit=50 of 10,000 rows:   {ms(latency)} (target p50 <= 25 ms)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        Sandbox.objects.all().delete()


if __name__ == "__main__":
    main()

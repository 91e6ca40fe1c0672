"""Control-plane benchmark: SDK create-to-usable vs the driver's own start, and list latency.

    make bench-api            (or: .venv/bin/python bench/api.py [--runs 10])

In one run, on one machine:
  1. the driver's own start (restore of the base snapshot + agent ready + init), N times;
  2. `Sandbox.create` through the real SDK against uvicorn (HTTP, auth, quota, placement,
     database, the same driver start), N times -> API overhead = SDK p50 / driver p50 - 1;
  3. `GET /v1/sandboxes?limit=50` over 10,000 sandbox rows: p50 latency through uvicorn,
     and the number of SQL queries for one page at 10 rows and at 10,000 rows.
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
import time
import urllib.request

from common import (  # bench/ is on sys.path
    ms,
    percentile,
    prepare_database,
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
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

"""Helpers shared by the benchmarks: percentiles and the benchmark database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def use_bench_environment(**extra: str) -> Path:
    """Point Django at the benchmark database and data dir (call before importing Django
    code); VMs get their own prefix, the broker is the embedded one. Returns the repo root.

    BENCH_DATABASE_URL, BENCH_DATA_DIR and BENCH_VM_PREFIX change them, so that two people
    benchmarking on one machine do not share a database, an image or VM names."""
    database = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/watasu_bench")
    os.environ.update(
        DATABASE_URL=database,
        WATASU_DATA_DIR=os.environ.get("BENCH_DATA_DIR", "/tmp/watasu-bench"),
        WATASU_VM_PREFIX=os.environ.get("BENCH_VM_PREFIX", "wbench-sbx-"),
        DJANGO_SETTINGS_MODULE="watasu.settings",
        WATASU_API_RATE_LIMIT="",
        **extra,
    )  # benchmarks measure, not throttle
    os.environ.pop("REDIS_URL", None)
    sys.path.insert(0, str(ROOT))
    return ROOT


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5) * 1000:7.1f} ms   p95 {percentile(values, 0.95) * 1000:7.1f} ms"


def prepare_database(root: Path) -> None:
    """The PostgreSQL database `watasu_bench`, created when missing, migrated."""
    subprocess.run(
        ["createdb", "-h", "127.0.0.1", "-U", "postgres", "watasu_bench"], capture_output=True, check=False
    )
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=root, check=True)


def start_uvicorn(root: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """uvicorn serving the platform on `port`, once it answers."""
    import time
    import urllib.request

    server = subprocess.Popen(
        [
            str(root / ".venv/bin/uvicorn"),
            "watasu.asgi:application",
            "--port",
            str(port),
            "--no-access-log",
            "--no-server-header",
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=root,
        env=os.environ.copy(),
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/schema", timeout=2)
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("uvicorn did not start")


def sdk(port: int, key: str, action: str, count: int, between: Callable[[], None] | None = None) -> Any:
    """Run bench/sdk_starts.py; with ``between``, call it before each of its creates."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATASU_", "DJANGO_"))}
    env.update(WATASU_API_URL=f"http://127.0.0.1:{port}/v1", WATASU_API_KEY=key)
    process = subprocess.Popen(
        [sys.executable, "-P", str(ROOT / "bench" / "sdk_starts.py"), action, str(count)],
        cwd="/",
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    for _ in range(count if action == "create" else 0):
        if between is not None:
            between()
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "done"
    process.stdin.close()
    out = process.stdout.read()  # through the buffer readline() filled (communicate() reads the pipe)
    if process.wait(timeout=1800):
        raise RuntimeError(f"sdk_starts.py {action} failed")
    return json.loads(out.strip().splitlines()[-1])

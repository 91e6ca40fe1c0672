"""Sweep benchmark: 10,000 sandboxes past their deadline expired in bounded batches.

    .venv/bin/python bench/sweeps.py [--rows 10000] [--batch 500]

On PostgreSQL (database `watasu_bench`), with the code the `sweeps.run` task runs:
  1. deadlines: N ready rows past their deadline (on_timeout kill, no VM behind them, so
     each purge is a real libvirt lookup that finds nothing) -> expired, batch by batch;
  2. retention: the same N rows, now terminal, purged again after the retention period
     (idempotent work on rows already purged is skipped by the query);
  3. reconcile: N ready rows without VMs -> lost, both ways against libvirt.
Prints rows per second and the slowest batch for each.
"""

from __future__ import annotations

import argparse
import secrets
import time
from datetime import timedelta

from common import prepare_database, use_bench_environment  # bench/ is on sys.path

ROOT = use_bench_environment()


def make_rows(count: int, state: str, **fields: object) -> list[int]:
    from sandboxes.models import Sandbox
    from sandboxes.services import host_register_local
    from teams.models import Team

    team = Team.objects.create(slug=f"bench-sweep-{secrets.token_hex(4)}", name="bench")
    host = host_register_local()
    rows = Sandbox.objects.bulk_create(
        [
            Sandbox(team=team, host=host, state=state, cpu_count=1, memory_mb=512, timeout=60, **fields)
            for _ in range(count)
        ],
        batch_size=2000,
    )
    return [row.pk for row in rows]


def drain(name: str, count: int, **kwargs: object) -> None:
    from sandboxes.sweeps import sweep_run

    batches, slowest, started = 0, 0.0, time.monotonic()
    while True:
        clock = time.monotonic()
        result = sweep_run(name, **kwargs)  # type: ignore[arg-type]
        slowest = max(slowest, time.monotonic() - clock)
        batches += 1
        if not result.get("more"):
            break
    seconds = time.monotonic() - started
    print(
        f"{name:10} {count} rows in {seconds:6.2f} s = {count / seconds:7.0f} rows/s "
        f"({batches} calls, slowest {slowest:.2f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.conf import settings
    from django.utils import timezone

    from sandboxes.models import Sandbox, SandboxState

    settings.SWEEP_BATCH_SIZE = args.batch
    settings.SANDBOX_DISK_RETENTION_SECONDS = 0
    Sandbox.objects.filter(team__slug__startswith="bench-sweep-").update(  # earlier runs' rows
        state=SandboxState.DESTROYED, purged_at=timezone.now()
    )
    print(f"PostgreSQL, batches of {args.batch}, one process (what one `sweeps.run` worker does)")

    past = timezone.now() - timedelta(seconds=5)
    ids = make_rows(args.rows, SandboxState.READY, deadline_at=past, on_timeout="kill")
    drain("deadlines", args.rows)
    assert not Sandbox.objects.filter(pk__in=ids).exclude(state=SandboxState.EXPIRED).exists()

    Sandbox.objects.filter(pk__in=ids).update(purged_at=None)  # as if every purge had failed
    drain("retention", args.rows, now=timezone.now() + timedelta(seconds=1))

    ids = make_rows(args.rows, SandboxState.READY, deadline_at=timezone.now() + timedelta(hours=1))
    Sandbox.objects.filter(pk__in=ids).update(updated_at=timezone.now() - timedelta(seconds=5))
    drain("reconcile", args.rows)
    assert not Sandbox.objects.filter(pk__in=ids).exclude(state=SandboxState.LOST).exists()


if __name__ == "__main__":
    main()

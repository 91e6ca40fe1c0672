"""Metering benchmark: one pass of the meter over 10,000 running sandboxes and 100,000
storage subjects (interval rows, not VMs) on PostgreSQL.

    .venv/bin/python bench/billing.py [--running 10000] [--storage 100000] [--teams 1000]

Builds the rows in the database `watasu_bench` (open intervals spread over `--teams`
teams), then bills one runtime window and one storage window with the code the `billing`
sweep runs, and prints the seconds and the queries of each. The baseline, in the same run,
is the same pass over a tenth of the rows: the ratio shows the pass grows with the rows,
and the queries per batch of 2,000 subjects stay constant (target: ≤ 10 s a pass).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

from common import prepare_database, use_bench_environment  # bench/ is on sys.path

ROOT = use_bench_environment()


def build(running: int, storage: int, teams: int, start: datetime) -> None:
    from billing.models import Account, IntervalKind, LedgerEntry, MeterCursor, UsageInterval, UsageRecord
    from teams.models import Team

    UsageRecord.objects.all().delete()
    LedgerEntry.objects.filter(team__slug__startswith="bench-bill-").delete()
    UsageInterval.objects.all().delete()
    MeterCursor.objects.all().delete()
    Account.objects.filter(team__slug__startswith="bench-bill-").delete()
    Team.objects.filter(slug__startswith="bench-bill-").delete()
    made = Team.objects.bulk_create([Team(slug=f"bench-bill-{n}", name="bench") for n in range(teams)])
    Account.objects.bulk_create([Account(team=team) for team in made])
    ids = [team.pk for team in made]
    kinds = [IntervalKind.STOPPED_DISK, IntervalKind.CHECKPOINT, IntervalKind.TEMPLATE, IntervalKind.VOLUME]
    rows = [
        UsageInterval(
            team_id=ids[n % teams],
            kind=IntervalKind.RUNTIME,
            subject_id=n + 1,
            cpu_count=1 + n % 4,
            memory_mb=512 * (1 + n % 8),
            started_at=start,
        )
        for n in range(running)
    ]
    rows += [
        UsageInterval(
            team_id=ids[n % teams],
            kind=kinds[n % 4],
            subject_id=n + 1,
            size_bytes=(n % 97 + 1) * 2**24,
            started_at=start,
        )
        for n in range(storage)
    ]
    UsageInterval.objects.bulk_create(rows, batch_size=5000)
    for meter in ("runtime", "storage"):
        MeterCursor.objects.create(meter=meter, metered_until=start)


def one_pass(meter: str, start: datetime) -> tuple[float, int, int]:
    """Seconds, queries and records of billing the meter's first window."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing.metering import Window, window_bill, window_seconds

    window = Window(meter, start, start + timedelta(seconds=window_seconds(meter)))
    with CaptureQueriesContext(connection) as queries:
        clock = time.monotonic()
        records = window_bill(window)
        seconds = time.monotonic() - clock
    return seconds, len(queries), records or 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--running", type=int, default=10_000)
    parser.add_argument("--storage", type=int, default=100_000)
    parser.add_argument("--teams", type=int, default=1_000)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    start = datetime(2026, 1, 5, tzinfo=UTC)
    print("PostgreSQL, one process (what one `billing` sweep does); interval rows, no VMs")
    figures = {}
    for label, scale in (("baseline (1/10)", 10), ("full", 1)):
        running, storage = args.running // scale, args.storage // scale
        build(running, storage, max(1, args.teams // scale), start)
        for meter, subjects in (("runtime", running), ("storage", storage)):
            seconds, queries, records = one_pass(meter, start)
            figures[(label, meter)] = seconds
            batches = -(-records // 2000)
            print(
                f"{label:16} {meter:8} {subjects:7} subjects -> {records:7} records in {seconds:6.2f} s, "
                f"{queries:4} queries for {batches} batches of 2,000 records",
                flush=True,
            )
    for meter in ("runtime", "storage"):
        ratio = figures[("full", meter)] / max(figures[("baseline (1/10)", meter)], 1e-9)
        print(f"{meter}: full / baseline = {ratio:.1f}x for 10x the rows")
    total = figures[("full", "runtime")] + figures[("full", "storage")]
    print(f"one pass over both meters: {total:.2f} s (target <= 10 s)")


if __name__ == "__main__":
    main()

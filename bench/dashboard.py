"""Dashboard page times on PostgreSQL with 10,000 sandboxes in one team.

    .venv/bin/python bench/dashboard.py [--sandboxes 10000] [--requests 40]

Builds, in the database `watasu_bench`, a team with `--sandboxes` sandboxes (a mix of
states, three events each, metadata), 20 templates of 5 versions, and 100,000 usage
records this month, then renders the sandboxes list, a sandbox's detail page, the
templates page and the usage page through Django's own request handling (server time:
URL routing, middleware, queries, templates; no network) `--requests` times each and
prints p50/p95 and the queries per page. The baseline, in the same run, is the same pages
for a team of 100 sandboxes (a hundredth): the ratio shows what the 10,000 cost.
Target: p95 ≤ 150 ms for each page at 10,000.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

from common import percentile, prepare_database, use_bench_environment  # bench/ is on sys.path

ROOT = use_bench_environment(WATASU_SIGNUP_OPEN="false")

PAGES = ["sandboxes", "sandbox", "templates", "usage"]


def build(slug: str, sandboxes: int, usage_records: int) -> tuple[object, int]:
    from django.utils import timezone

    from billing.models import LineItem, UsageRecord
    from billing.services import accounts_ensure
    from sandboxes.models import Sandbox, SandboxEvent, SandboxState
    from teams.models import Membership, Role, Team, User
    from templates_app.models import Template, TemplateVersion, VersionStatus

    team = Team.objects.filter(slug=slug).first()
    user = User.objects.filter(email=f"owner.{slug}@bench.test").first() or User.objects.create_user(
        email=f"owner.{slug}@bench.test"
    )
    if team is not None and Sandbox.objects.filter(team=team).count() == sandboxes:
        first = Sandbox.objects.filter(team=team).order_by("-id").first()
        return user, first.pk if first else 0
    if team is not None:  # a different size from an earlier run: start over
        UsageRecord.objects.filter(team=team).delete()
        SandboxEvent.objects.filter(sandbox__team=team).delete()
        Sandbox.objects.filter(team=team).delete()
        Template.objects.filter(team=team).delete()
        team.delete()
    team = Team.objects.create(slug=slug, name=f"Bench {slug}")
    Membership.objects.create(user=user, team=team, role=Role.OWNER)
    accounts_ensure(team_ids=[team.pk])
    now = timezone.now()
    states = [SandboxState.READY, SandboxState.STOPPED, SandboxState.DESTROYED, SandboxState.FAILED]
    rows = [
        Sandbox(
            team=team,
            state=states[n % len(states)],
            cpu_count=1 + n % 4,
            memory_mb=512 * (1 + n % 4),
            timeout=300,
            metadata={"job": f"job-{n % 50}", "owner": "bench"},
            started_at=now,
            deadline_at=now + timedelta(minutes=5),
        )
        for n in range(sandboxes)
    ]
    made = Sandbox.objects.bulk_create(rows, batch_size=2000)
    SandboxEvent.objects.bulk_create(
        [
            SandboxEvent(sandbox=sandbox, from_state=a, to_state=b, at=now, reason="bench")
            for sandbox in made
            for a, b in (("", "creating"), ("creating", "ready"), ("ready", sandbox.state))
        ],
        batch_size=5000,
    )
    for t in range(20):
        template = Template.objects.create(team=team, slug=f"{slug}-tpl-{t}", name=f"Template {t}")
        TemplateVersion.objects.bulk_create(
            [
                TemplateVersion(
                    template=template, version=f"v{v}", status=VersionStatus.READY, cpu=1, memory_mb=512
                )
                for v in range(5)
            ]
        )
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = max(1, int((now - month_start).total_seconds() // 60) - 1)
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                team=team,
                line_item=LineItem.VCPU if n % 2 else LineItem.MEMORY,
                subject_id=made[n % len(made)].pk,
                window_start=month_start + timedelta(minutes=n % span),
                window_end=month_start + timedelta(minutes=n % span + 1),
                quantity=60,
                cumulative=60,
                amount_micros=660,
            )
            for n in range(usage_records)
        ],
        batch_size=5000,
        ignore_conflicts=True,
    )
    return user, made[-1].pk


def measure(user: object, slug: str, sandbox_id: int, requests: int) -> dict[str, tuple[list[float], int]]:
    from django.db import connection
    from django.test import Client

    client = Client()
    client.force_login(user)  # type: ignore[arg-type]
    urls = {
        "sandboxes": f"/dashboard/t/{slug}/sandboxes",
        "sandbox": f"/dashboard/t/{slug}/sandboxes/{sandbox_id}",
        "templates": f"/dashboard/t/{slug}/templates",
        "usage": f"/dashboard/t/{slug}/usage",
    }
    results: dict[str, tuple[list[float], int]] = {}
    for page, url in urls.items():
        queries: list[str] = []

        def count(execute, sql, *rest, queries=queries):  # type: ignore[no-untyped-def]
            queries.append(sql)
            return execute(sql, *rest)

        with connection.execute_wrapper(count):
            response = client.get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200
        results[page] = (times, len(queries))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.conf import settings

    settings.ALLOWED_HOSTS = ["*"]
    print(f"building: {args.sandboxes} sandboxes (and a baseline of {args.sandboxes // 100}) ...", flush=True)
    big_user, big_id = build("bench-dash-big", args.sandboxes, 100_000)
    small_user, small_id = build("bench-dash-small", max(1, args.sandboxes // 100), 1_000)
    small = measure(small_user, "bench-dash-small", small_id, args.requests)
    big = measure(big_user, "bench-dash-big", big_id, args.requests)
    print(f"\n{'page':<10} {'baseline p95':>13} {'p50':>9} {'p95':>9} {'ratio p95':>10} {'queries':>8}")
    for page in PAGES:
        (small_times, small_queries), (times, queries) = small[page], big[page]
        base95, p50, p95 = percentile(small_times, 0.95), percentile(times, 0.5), percentile(times, 0.95)
        verdict = "ok" if p95 <= 0.150 else "OVER 150 ms"
        print(
            f"{page:<10} {base95 * 1000:10.1f} ms {p50 * 1000:6.1f} ms {p95 * 1000:6.1f} ms"
            f" {p95 / base95:9.2f}x {queries:4d} ({small_queries} at baseline)  {verdict}"
        )


if __name__ == "__main__":
    main()

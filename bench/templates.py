"""Template build benchmark: a first build vs a cached rebuild of the same template.

    .venv/bin/python bench/templates.py [--runs 3]

In one run, on one machine, with the builder the Celery worker runs (in-process here):
  1. a first build with `skip_cache` (every step runs in a build VM: apt, pip, a command,
     then flatten, start command + ready check, memory snapshot);
  2. the same template again (target: <= 10 % of the first build's time);
  3. the template with its last step changed (earlier layers from the cache).
Uses PostgreSQL database `watasu_bench` (created when missing) and its own data directory.
"""

from __future__ import annotations

import argparse
import secrets
import time

from common import percentile, prepare_database, use_bench_environment  # bench/ is on sys.path

ROOT = use_bench_environment()

WAIT_FOR_PORT = (
    "python3 - <<'PY'\nimport socket\ns=socket.create_connection(('127.0.0.1', 8000), 5)\ns.close()\nPY"
)


def spec(last_step: str) -> dict[str, object]:
    return {
        "from_image": "python:3",
        "packages": {"pip": ["six"]},
        "setup": ["mkdir -p /srv/app && echo bench > /srv/app/index.txt", last_step],
        "env": {"GREETING": "hello"},
        "start_cmd": "cd /srv/app && python3 -m http.server 8000",
        "ready_cmd": WAIT_FOR_PORT,
    }


def timed_build(user, build_spec: dict[str, object], *, skip_cache: bool = False) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    from django.db import transaction

    from templates_app.builds import template_build_run, template_build_start
    from templates_app.models import TemplateVersion, VersionStatus

    started = time.monotonic()
    with transaction.atomic():
        version = template_build_start(
            user=user,
            name="bench-py",
            build_spec=build_spec,
            cpu=1,
            memory_mb=512,
            tags=[],
            team_slug=None,
            skip_cache=skip_cache,
        )
    template_build_run(version_id=version.pk)  # what the worker's task runs
    seconds = time.monotonic() - started
    version = TemplateVersion.objects.get(pk=version.pk)
    if version.status != VersionStatus.READY:
        raise SystemExit(f"build failed: {version.last_error_message}")
    return seconds, version.log_entries.filter(message__endswith=": cached").count()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from teams.services import user_get_or_create
    from templates_app.services import base_template_ensure

    base_template_ensure()
    user = user_get_or_create(email=f"bench-{secrets.token_hex(4)}@example.com")
    first, cached, changed = [], [], []
    for run in range(args.runs):
        marker = f"echo run-{run}-{secrets.token_hex(4)} > /srv/app/marker"
        seconds, _ = timed_build(user, spec(marker), skip_cache=True)
        first.append(seconds)
        seconds, _ = timed_build(user, spec(marker))
        cached.append(seconds)
        seconds, reused = timed_build(user, spec(marker + "-changed"))
        changed.append(seconds)
        print(
            f"run {run + 1}: first {first[-1]:6.1f} s   cached {cached[-1]:5.2f} s   "
            f"last step changed {changed[-1]:5.1f} s ({reused} steps from the cache)",
            flush=True,
        )
    p50 = {
        name: percentile(values, 0.5)
        for name, values in (("first", first), ("cached", cached), ("changed", changed))
    }
    print(
        f"first build p50 {p50['first']:.1f} s; cached rebuild p50 {p50['cached']:.2f} s = "
        f"{p50['cached'] / p50['first'] * 100:.2f} % of the first (target <= 10 %); "
        f"last step changed p50 {p50['changed']:.1f} s = {p50['changed'] / p50['first'] * 100:.0f} %"
    )


if __name__ == "__main__":
    main()

"""A real Celery worker answers through the configured broker.

Runs against Redis when REDIS_URL is set (CI's PostgreSQL pass) and through
the embedded file-system broker otherwise (the SQLite pass).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.conftest import celery_worker
from watasu.celery import app, ping


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker() as process:
        yield process


def test_ping_task_round_trips_through_a_real_worker(worker: subprocess.Popen[bytes]) -> None:
    result = ping.delay()

    assert result.get(timeout=60) == "pong"
    expected = "redis" if settings.REDIS_URL else "watasu.broker:Transport"  # whole messages only
    assert app.connection_for_write().transport_cls == expected


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_sweeps_run_while_the_build_queue_is_blocked(require_postgres: None) -> None:
    from sandboxes.models import SweepRun
    from sandboxes.tasks import sweep_task
    from templates_app.tasks import template_build_task
    from tests.conftest import helper_process_env
    from tests.waiting import wait_until

    # given a worker that serves only the sweeps (as `make run` starts one), and a build
    # queued with no build worker to take it, alone on its queue (earlier tests may have
    # queued shape snapshot makes there with no worker running)
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("builds")
    build = template_build_task.delay(10**9)
    with celery_worker(helper_process_env(), queues="sweeps,celery"):
        # when a sweep is queued behind it
        sweep_task.delay("hosts")

        # then the sweep runs, and the build is left on its own queue, untouched
        wait_until(
            lambda: SweepRun.objects.filter(name="hosts", runs__gte=1).exists(), 60, "the hosts sweep to run"
        )
    assert build.state == "PENDING"
    with app.connection_for_write() as connection:  # leave no build for later tests' workers
        assert connection.default_channel.queue_purge("builds") == 1
    assert app.amqp.router.route({}, "templates.build")["queue"].name == "builds"
    assert app.amqp.router.route({}, "sweeps.run")["queue"].name == "sweeps"

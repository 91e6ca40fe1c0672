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
    expected = "redis" if settings.REDIS_URL else "filesystem"
    assert app.connection_for_write().transport_cls == expected

"""A real Celery worker answers through the configured broker.

Runs against Redis when REDIS_URL is set (CI's PostgreSQL pass) and through
the embedded file-system broker otherwise (the SQLite pass).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from watasu.celery import app, ping

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "watasu", "worker", "--pool", "solo",
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=os.environ.copy(),
    )
    yield process
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def test_ping_task_round_trips_through_a_real_worker(worker: subprocess.Popen[bytes]) -> None:
    result = ping.delay()

    assert result.get(timeout=60) == "pong"
    expected = "redis" if settings.REDIS_URL else "filesystem"
    assert app.connection_for_write().transport_cls == expected

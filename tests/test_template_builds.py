"""Template builds on a real Celery worker and real VMs, driven by the real SDK."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from django.conf import settings as django_settings
from django.db import connection

from templates_app.builds import build_steps
from tests.conftest import VM_TEST_PREFIX, Actor, celery_worker
from tests.edge_support import ServerThread
from tests.sdk import run_scenario


def test_build_spec_becomes_ordered_steps() -> None:
    spec = {"packages": {"apt": ["git"], "pip": ["six"]}, "setup": ["echo one", "echo two"],
            "files": [{"path": "/a b/c", "content_b64": "aGk="}]}

    steps = build_steps(spec, ["python3-venv"])

    assert [s.name for s in steps] == ["packages.apt", "packages.pip", "files[0]", "setup[0]", "setup[1]"]
    assert steps[0].command.endswith("python3-venv git python3-pip")
    assert "'/a b/c'" in steps[2].command


@pytest.fixture
def build_worker(require_postgres) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    """A real Celery worker on the test database and broker, naming VMs like the tests."""
    database = connection.settings_dict
    env = {**os.environ, "WATASU_VM_PREFIX": VM_TEST_PREFIX,
           "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/"
                           f"{database['NAME']}"}
    assert django_settings.REDIS_URL, "builds need the Redis broker in tests"
    with celery_worker(env) as worker:
        yield worker


@pytest.mark.vm
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_sdk_builds_a_template_and_starts_sandboxes_from_it(owner: Actor, base_version, vm_cleanup,
                                                           build_worker, settings) -> None:  # type: ignore[no-untyped-def]
    from watasu.asgi import application

    server = ServerThread(application)  # ASGI: the data plane needs WebSockets
    settings.PUBLIC_URL = server.url
    with server:
        output = run_scenario("template_build", api_url=f"{server.url}/v1", api_key=owner.write_key,
                              timeout=1200)

    assert output == "ok\n"

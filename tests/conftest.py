"""Shared fixtures: the owner / member / outsider trio and API clients."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import OperationalError, connection
from rest_framework.test import APIClient

from teams.models import Role, Team, User
from teams.services import api_key_create, membership_ensure, user_get_or_create


@dataclass
class Actor:
    """A user with a write and a read API key, and clients for both."""

    user: User
    write_key: str
    read_key: str

    @property
    def personal_team(self) -> Team:
        return Team.objects.get(personal_for=self.user)

    def client(self, scope: str = "write") -> APIClient:
        client = APIClient()
        key = self.write_key if scope == "write" else self.read_key
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        return client


def concurrently(count: int, send) -> list:  # type: ignore[no-untyped-def]
    """`send()` from `count` threads released at once (a barrier); their results, in the
    order they finished. Each thread closes its own database connection."""
    barrier = threading.Barrier(count)
    results: list = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait()
            result = send()
            with lock:
                results.append(result)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def make_actor(email: str) -> Actor:
    user = user_get_or_create(email=email)
    _, write_key = api_key_create(user=user, scope="write")
    _, read_key = api_key_create(user=user, scope="read")
    return Actor(user=user, write_key=write_key, read_key=read_key)


@pytest.fixture
def acme(db: None) -> Team:
    return Team.objects.create(slug="acme", name="Acme")


@pytest.fixture
def owner(acme: Team) -> Actor:
    actor = make_actor("owner@acme.test")
    membership_ensure(user=actor.user, team=acme, role=Role.OWNER)
    return actor


@pytest.fixture
def member(acme: Team) -> Actor:
    actor = make_actor("member@acme.test")
    membership_ensure(user=actor.user, team=acme, role=Role.MEMBER)
    return actor


@pytest.fixture
def viewer(acme: Team) -> Actor:
    actor = make_actor("viewer@acme.test")
    membership_ensure(user=actor.user, team=acme, role=Role.VIEWER)
    return actor


@pytest.fixture
def outsider(db: None) -> Actor:
    return make_actor("outsider@other.test")


@pytest.fixture(scope="session", autouse=True)
def _end_other_sessions(django_db_setup, django_db_blocker) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Before the test database is dropped, end the sessions other threads keep open
    (the edge's worker threads hold persistent connections, CONN_MAX_AGE)."""
    yield
    with django_db_blocker.unblock(), contextlib.suppress(OperationalError):  # no test used a database
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture
def edge(settings) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """The whole web app (edge + Django) served by a real uvicorn in a thread, as the public URL."""
    from tests.edge_support import ServerThread
    from watasu.asgi import application

    server = ServerThread(application)
    settings.PUBLIC_URL = server.url
    settings.DATA_PLANE_DOMAIN = ""
    with server:
        yield server


@pytest.fixture
def require_postgres() -> None:
    """Concurrency tests need real row locks and unique-constraint races."""
    if connection.vendor != "postgresql":
        raise RuntimeError(
            "This test needs PostgreSQL: set DATABASE_URL=postgres://... "
            "(it is deselected with -m 'not postgres' on SQLite runs)."
        )


# --- real VMs -----------------------------------------------------------------------
# Tests marked `vm` start libvirt/QEMU domains (TCG here). Their domain names carry a
# test-only prefix so a `make run` on the same machine is never touched, and every
# domain with that prefix is destroyed after each test.

# Two test runs share one libvirt without destroying each other's domains: by default the
# prefix is scoped to the run's data directory (`make test` and `make test-stress` in two
# checkouts, or with two TEST_DATA_DIRs, never reap each other's VMs; a crashed earlier run
# with the same directory still has its leftovers reaped). WATASU_TEST_VM_PREFIX overrides
# it (neither prefix may be a prefix of the other).
VM_TEST_PREFIX = os.environ.get("WATASU_TEST_VM_PREFIX") or "wtest-{}-sbx-".format(
    hashlib.sha256(
        str(Path(os.environ.get("WATASU_DATA_DIR", "/var/lib/watasu")).resolve()).encode()
    ).hexdigest()[:6]
)


@pytest.fixture(autouse=True)
def _vm_prefix(settings) -> None:  # type: ignore[no-untyped-def]
    settings.RUNTIME_VM_PREFIX = VM_TEST_PREFIX


@pytest.fixture(autouse=True)
def _hosts_answer_afresh() -> None:
    """No test inherits another's memory of a host that let a call time out."""
    from sandboxes import hostcalls

    hostcalls._silent.clear()


@pytest.fixture(autouse=True)
def _no_rate_limit(settings) -> None:  # type: ignore[no-untyped-def]
    """Tests drive the API far faster than any client; tests/test_rate_limits.py turns it on."""
    settings.API_RATE_LIMIT = ""


@pytest.fixture
def local_host(db: None):  # type: ignore[no-untyped-def]
    from sandboxes.services import host_register_local

    return host_register_local()


@pytest.fixture
def base_version(local_host):  # type: ignore[no-untyped-def]
    """The ready `base` template version (snapshot adopted from disk after the first build)."""
    from templates_app.services import base_template_ensure

    return base_template_ensure(host=local_host)


@pytest.fixture
def vm_cleanup(local_host):  # type: ignore[no-untyped-def]
    from sandboxes.runtime import driver_for

    yield driver_for(local_host)
    driver = driver_for(local_host)
    for name in driver.list_domains(VM_TEST_PREFIX):
        driver.destroy(name)


@pytest.fixture(autouse=True)
def _egress_enforced_on_vms_only(request, settings):  # type: ignore[no-untyped-def]
    """The host firewall is real for VM tests; elsewhere policies are only recorded (a test
    without VMs must not leave rules on the host)."""
    if request.node.get_closest_marker("vm") is None:
        settings.EGRESS_ENFORCE = False
    else:  # VMs these tests start without the service layer get the same firewall
        from sandboxes.network import ensure_host

        ensure_host()


@pytest.fixture
def fake_driver(settings, tmp_path, local_host):  # type: ignore[no-untyped-def]
    """The local host's runtime as `tests/fake_driver.FakeDriver`, its files under tmp_path:
    for service tests where a real VM adds nothing (the contract suite pins the fake)."""
    from sandboxes.runtime import driver_for
    from sandboxes.services import host_register_local

    settings.RUNTIME_DRIVER = "tests.fake_driver.FakeDriver"
    settings.RUNTIME_LIBVIRT_URI = "fake:///"
    settings.RUNTIME_HOST_DATA_DIR = tmp_path / "runtime"
    host_register_local()
    local_host.refresh_from_db()
    return driver_for(local_host)


@pytest.fixture
def base_version_row(local_host):  # type: ignore[no-untyped-def]
    """A ready `base` version row whose artifact is never started (for tests without VMs)."""
    from templates_app.models import Template, TemplateVersion, VersionStatus

    template = Template.objects.create(slug="base", name="Base")
    return TemplateVersion.objects.create(
        template=template,
        version="test",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=local_host,
        artifact_dir="/nonexistent",
    )


def helper_process_env(**extra: str) -> dict[str, str]:
    """Environment for a helper process (worker, beat, web) on the test database,
    naming VMs like the tests. The test must use `django_db(transaction=True)`."""
    database = connection.settings_dict
    if connection.vendor == "postgresql":
        url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    else:
        url = f"sqlite:///{database['NAME']}"
    from django.conf import settings

    return {
        **os.environ,
        "WATASU_VM_PREFIX": VM_TEST_PREFIX,
        "DATABASE_URL": url,
        # as in the test: the host firewall is real for VM tests only
        "WATASU_EGRESS_ENFORCE": "true" if settings.EGRESS_ENFORCE else "false",
        **extra,
    }


@contextlib.contextmanager
def _helper_process(argv: list[str], env: dict[str, str] | None) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery process of the project, terminated (then killed) when the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "watasu", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        env=env or os.environ.copy(),
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def celery_beat(
    env: dict[str, str], schedule: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """A real Celery beat process sending the settings' schedule."""
    return _helper_process(["beat", "--loglevel", "WARNING", "--schedule", str(schedule)], env)


ALL_QUEUES = "celery,sweeps,builds"


def celery_worker(
    env: dict[str, str] | None = None, queues: str = ALL_QUEUES
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """A real Celery worker process (solo pool) on the configured broker, serving `queues`."""
    return _helper_process(
        [
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
            "--queues",
            queues,
        ],
        env,
    )


@pytest.fixture(scope="session")
def localstripe() -> Iterator[str]:
    """The Stripe stand-in (`localstripe` from PyPI) on 127.0.0.1 for the session; its URL."""
    from tests.billing_support import localstripe_running

    with localstripe_running() as base:
        yield base

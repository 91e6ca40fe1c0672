"""Two VM hosts on this machine, each a real host worker (`scripts/run-host`) with its own
data directory, queue, VM prefix and address in 127.0.0.0/8, sharing the system libvirtd,
and a web process (this test's) that drives no VM at all: every runtime step goes through
the host workers, and the real SDK is the client.

- `base` is built on host A and starts on host B after B pulled it from the artifact store;
  creates spread across both.
- Host B's worker killed: the hosts sweep marks B down and its sandbox unreachable (kept,
  its data plane answers 503); new creates go to A; B's worker back: B up, its sandbox
  answers again (its VM ran on meanwhile).
- A drained: new creates go to B.
- Everything destroyed: no domain of either prefix and no sandbox file left on either host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from sandboxes import hosts
from sandboxes.models import Host, HostState, Sandbox
from sandboxes.runtime import driver_for
from sandboxes.runtime.libvirt_driver import LibvirtDriver
from templates_app.artifacts import hosts_with
from templates_app.services import base_template_ensure_on
from tests.conftest import VM_TEST_PREFIX, Actor, helper_process_env
from tests.sdk import run_scenario
from tests.waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}


def _prefix(name: str) -> str:
    return f"{VM_TEST_PREFIX}{name}-"


def _data_dir(name: str) -> Path:
    return Path(django_settings.DATA_DIR) / "hosts" / name


@contextmanager
def host_worker(name: str) -> Iterator[subprocess.Popen[bytes]]:
    """`scripts/run-host` for host ``name``, as an operator starts it on a VM host."""
    env = helper_process_env(
        WATASU_HOST_NAME=f"test-{name}",
        WATASU_HOST_ADDRESS=HOSTS[name],
        WATASU_DATA_DIR=str(_data_dir(name)),
        WATASU_VM_PREFIX=_prefix(name),
        WATASU_ARTIFACT_STORE=f"file://{_data_dir('store')}",
        # one deployment, one key (each data directory would otherwise make its own)
        WATASU_SECRET_KEY=django_settings.SECRET_KEY,
        WATASU_ENCRYPTION_KEYS=",".join(django_settings.ENCRYPTION_KEYS),
        WATASU_HOST_HEARTBEAT_SECONDS="1",
        WATASU_POOL_ENABLED="false",
        WATASU_EGRESS_ENFORCE="false",  # one machine's firewall, two hosts: see docs/hosts.md
        HOST_CONCURRENCY="4",
    )
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "run-host")], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _registered(name: str) -> Host:
    return wait_until(
        lambda: Host.objects.filter(name=f"test-{name}", last_seen_at__isnull=False, queue__gt="").first(),
        120,
        f"host {name} to register",
    )


def _hosts_of(ids: list[str]) -> list[str]:
    return [Sandbox.objects.select_related("host").get(pk=int(i)).host.name for i in ids]


def _domains() -> set[str]:
    driver = LibvirtDriver(
        uri=django_settings.RUNTIME_LIBVIRT_URI, accel="tcg", state_dir=Path("/nonexistent")
    )
    try:
        return {d for name in HOSTS for d in driver.list_domains(_prefix(name))}
    finally:
        driver.close()


def _sandbox_files(name: str) -> list[Path]:
    state_dir = _data_dir(name) / "runtime" / "sandboxes"
    return (
        sorted(p for p in state_dir.iterdir() if p.name.startswith(_prefix(name)))
        if state_dir.is_dir()
        else []
    )


@pytest.fixture
def domains_cleared() -> Iterator[None]:
    """Whatever the test leaves (it failed midway), no domain of either host outlives it."""
    yield
    driver = LibvirtDriver(
        uri=django_settings.RUNTIME_LIBVIRT_URI, accel="tcg", state_dir=Path("/nonexistent")
    )
    try:
        for name in _domains():
            driver.destroy(name)
    finally:
        driver.close()


def test_two_hosts_spread_transfer_fail_over_and_drain(edge, owner: Actor, settings, domains_cleared) -> None:  # type: ignore[no-untyped-def]
    settings.RUNTIME_IN_PROCESS = False  # this web process drives no VM and touches no host file
    settings.HOST_DOWN_AFTER_SECONDS = 4
    api = {"api_url": f"{edge.url}/v1", "api_key": owner.write_key}
    for name in HOSTS:  # an earlier run's sandbox files (its template files are kept, and adopted)
        shutil.rmtree(_data_dir(name) / "runtime" / "sandboxes", ignore_errors=True)
    for stale in _domains():  # an earlier run's, killed midway
        LibvirtDriver(uri=settings.RUNTIME_LIBVIRT_URI, accel="tcg", state_dir=Path("/nonexistent")).destroy(
            stale
        )
    with host_worker("a"), host_worker("b") as worker_b:
        host_a, host_b = _registered("a"), _registered("b")
        assert (host_a.address, host_b.address) == ("127.0.0.2", "127.0.0.3")
        with pytest.raises(RuntimeError, match=r"driven by its own worker"):
            driver_for(host_a)  # the web process has no runtime of its own

        # given base built on host A (its worker makes the snapshot, then publishes it)
        version = base_template_ensure_on(host_a)
        assert version.host_id == host_a.pk and version.store_digest
        assert hosts_with(version) == {host_a.pk}

        # when four sandboxes are created through the SDK
        ids = run_scenario("hosts", **api, args=("create", "4")).split()

        # then both hosts run some, and B pulled the template from the store first
        placed = _hosts_of(ids)
        assert set(placed) == {"test-a", "test-b"}, placed
        assert hosts_with(version) == {host_a.pk, host_b.pk}
        assert any((_data_dir("b") / "runtime" / "artifacts").iterdir())
        on_b = ids[placed.index("test-b")]
        on_a = ids[placed.index("test-a")]

        # when host B's worker dies
        os.killpg(worker_b.pid, signal.SIGKILL)  # the script and its Celery worker
        worker_b.wait(timeout=30)
        killed = time.monotonic()

        # then the hosts sweep marks B down within its interval, and B's sandbox unreachable
        wait_until(
            lambda: hosts.host_health_sweep() and Host.objects.get(pk=host_b.pk).state == HostState.DOWN,
            settings.HOST_DOWN_AFTER_SECONDS + settings.SWEEP_INTERVAL_SECONDS["hosts"],
            "host B to be marked down",
        )
        down_after = time.monotonic() - killed
        stranded = Sandbox.objects.get(pk=int(on_b))
        assert (stranded.state, stranded.reachable) == ("ready", False)
        assert run_scenario("hosts", **api, args=("unreachable", on_b)).strip() == "unreachable"
        # new creates go to A; A's sandboxes carry on
        [fresh] = run_scenario("hosts", **api, args=("create", "1")).split()
        assert _hosts_of([fresh]) == ["test-a"]
        assert run_scenario("hosts", **api, args=("run", on_a)).strip() == "alive"

        # when B's worker returns, B is up and its sandbox answers (its VM ran on)
        with host_worker("b"):
            wait_until(
                lambda: hosts.host_health_sweep() and Host.objects.get(pk=host_b.pk).state == HostState.UP,
                60,
                "host B to be back up",
            )
            assert Sandbox.objects.get(pk=int(on_b)).reachable
            assert run_scenario("hosts", **api, args=("run", on_b)).strip() == "alive"

            # when A is drained, new work goes to B
            Host.objects.filter(pk=host_a.pk).update(state=HostState.DRAINING)
            [drained] = run_scenario("hosts", **api, args=("create", "1")).split()
            assert _hosts_of([drained]) == ["test-b"]
            assert run_scenario("hosts", **api, args=("run", on_a)).strip() == "alive"

            # when every sandbox is destroyed, nothing is left the database does not know
            everything = [*ids, fresh, drained]
            run_scenario("hosts", **api, args=("kill", *everything))
            assert set(Sandbox.objects.filter(pk__in=everything).values_list("state", flat=True)) == {
                "destroyed"
            }
            assert _domains() == set()
            assert _sandbox_files("a") == [] and _sandbox_files("b") == []
    print(f"host B marked down {down_after:.1f} s after its worker died ({timezone.now():%H:%M:%S})")

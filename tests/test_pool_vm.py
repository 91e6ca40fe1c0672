"""Warm pools and tiered pauses on real VMs.

- Creates that take pooled VMs never share an identity: agent secret, machine id, hostname,
  the first /dev/urandom bytes after the claim, and each has the host's clock although it
  was restored (and suspended) before.
- A pool sweep killed in the middle of a fill (its worker dies) leaks no domain: the next
  run removes the half-made VM, keeps the ready ones, and a create still takes one.
- A pause is held in memory (the VM suspended): its resume continues the processes; the pool
  sweep moves it to disk when due, and that resume continues them too. A host crash while it
  is held in memory loses the processes, not the files written before the pause: the resume
  boots on its disk.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from sandboxes import pool, services, sweeps
from sandboxes.models import PooledVm, PooledVmState, Sandbox, SandboxState
from sandboxes.runtime import vm
from sandboxes.tasks import sweep_task
from tests.conftest import VM_TEST_PREFIX, Actor, celery_worker, helper_process_env
from tests.waiting import wait_until
from watasu import crypto

S = SandboxState
pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]

IDENTITY = (
    "cat /etc/machine-id; hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s.%N"
)


def _create(owner: Actor, **body) -> Sandbox:  # type: ignore[no-untyped-def]
    response = owner.client().post(
        "/v1/sandboxes", {"template": "base", "timeout": 600, **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return Sandbox.objects.get(pk=response.json()["sandbox"]["id"])


def _pool_domains(driver) -> set[str]:  # type: ignore[no-untyped-def]
    return set(driver.list_domains(f"{VM_TEST_PREFIX}pool-"))


def test_pooled_creates_never_share_an_identity(owner: Actor, base_version, vm_cleanup, settings) -> None:  # type: ignore[no-untyped-def]
    # given a pool of three suspended clones of base, kept for a while before any create
    settings.POOL_BASE_SIZE, settings.POOL_FILL_BATCH = 3, 3
    result = pool.pool_sweep()["hosts"][base_version.host.name]
    assert result["filled"] == 3, result
    pooled = list(PooledVm.objects.filter(state=PooledVmState.READY))
    assert {vm_cleanup.domain_status(p.domain_name) for p in pooled} == {"suspended"}

    # when three sandboxes are created
    sandboxes = [_create(owner) for _ in range(3)]

    # then each runs a pooled domain, under the pool's uid
    assert {s.vm_name for s in sandboxes} == {p.domain_name for p in pooled}
    assert {s.runtime_uid for s in sandboxes} == {p.qemu_uid for p in pooled}
    assert PooledVm.objects.filter(state=PooledVmState.READY).count() == 0
    # and no two share a secret, machine id, hostname or random bytes; each has the host's
    # clock (a restored clone wakes up with the snapshot's, taken when the template was built)
    seen = []
    for sandbox in sandboxes:
        out = vm.agent_client(sandbox).exec(IDENTITY)
        assert out["exit_code"] == 0, out
        assert len(out["stdout"].split()) == 4, out
        machine_id, hostname, random_bytes, clock = out["stdout"].split()
        assert abs(float(clock) - time.time()) < 2.0, (sandbox.pk, clock)
        assert hostname == sandbox.vm_name  # the pooled domain's name
        seen.append((crypto.decrypt_text(sandbox.agent_secret_encrypted), machine_id, hostname, random_bytes))
    for column in zip(*seen, strict=True):
        assert len(set(column)) == 3, column
    # and reconciliation knows the taken domains (nothing removed, nothing lost)
    Sandbox.objects.update(updated_at=timezone.now() - timedelta(seconds=5))
    reconciled = sweeps.reconcile_sweep()["hosts"][base_version.host.name]
    assert (reconciled["removed"], reconciled["lost"]) == (0, 0), reconciled
    # and a destroy removes the pooled domain with its disk
    gone = sandboxes[0]
    services.sandbox_destroy(sandbox=gone)
    assert vm_cleanup.domain_status(gone.vm_name) == "absent"
    assert not vm.disk_path(gone).exists()


def test_a_worker_killed_mid_fill_leaks_no_domain(owner: Actor, base_version, vm_cleanup, settings) -> None:  # type: ignore[no-untyped-def]
    # given a worker filling a pool of four, killed while a clone is being restored
    env = helper_process_env(WATASU_POOL_BASE_SIZE="4", WATASU_POOL_FILL_BATCH="4")
    with celery_worker(env) as worker:
        sweep_task.delay("pool")
        wait_until(
            lambda: (
                PooledVm.objects.filter(state=PooledVmState.READY).exists()
                and PooledVm.objects.filter(state=PooledVmState.FILLING).exists()
            ),
            120,
            "one pooled VM ready and another filling",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    ready_before = set(PooledVm.objects.filter(state=PooledVmState.READY).values_list("pk", flat=True))
    assert PooledVm.objects.filter(state=PooledVmState.FILLING).exists()

    # when the pool sweep runs again once the fill is old enough to be abandoned
    settings.POOL_BASE_SIZE, settings.POOL_FILL_BATCH, settings.SWEEP_STUCK_AFTER_SECONDS = 4, 4, 60
    abandoned = PooledVm.objects.filter(state=PooledVmState.FILLING)
    abandoned.update(created_at=timezone.now() - timedelta(minutes=5))
    result = pool.pool_sweep()["hosts"][base_version.host.name]

    # then the half-made VM is gone, the ready ones were kept, the pool is full again, and
    # every pool domain on the host has its row
    assert result["abandoned"] == 1, result
    rows = {p.domain_name for p in PooledVm.objects.all()}
    assert ready_before <= set(PooledVm.objects.values_list("pk", flat=True))
    assert PooledVm.objects.filter(state=PooledVmState.READY).count() == 4
    assert _pool_domains(vm_cleanup) == rows
    # and a create takes one of them
    sandbox = _create(owner)
    assert sandbox.vm_name in rows
    assert vm.agent_client(sandbox).exec("echo up")["stdout"] == "up\n"


def test_a_pause_held_in_memory_then_on_disk_then_lost_with_its_host(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox with a file and a counting process (no pool: this is about pauses)
    settings.POOL_ENABLED = False
    sandbox = _create(owner)
    agent = vm.agent_client(sandbox)
    agent.exec("echo kept > /root/kept.txt")
    counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"
    pid = agent.exec(["/bin/sh", "-c", counter], background=True)["pid"]

    def resume() -> Sandbox:
        response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json")
        assert response.status_code == 200, response.content
        return Sandbox.objects.get(pk=sandbox.pk)

    def running(row: Sandbox) -> dict[int, bool]:
        return {p["pid"]: p["running"] for p in vm.agent_client(row).processes()}

    # when it is paused: held in memory
    services.sandbox_pause(sandbox=sandbox)
    sandbox.refresh_from_db()
    assert (sandbox.state, sandbox.paused_in_memory) == (S.STOPPED, True)
    assert vm_cleanup.domain_status(sandbox.vm_name) == "suspended"
    # then its resume continues the process
    row = resume()
    assert (row.state, row.paused_in_memory) == (S.READY, False)
    assert running(row) == {pid: True}

    # when it is paused again and the pool sweep finds the pause due: its memory goes to disk
    services.sandbox_pause(sandbox=row)
    settings.PAUSE_IN_MEMORY_SECONDS = 1
    Sandbox.objects.filter(pk=sandbox.pk).update(paused_at=timezone.now() - timedelta(seconds=5))
    assert pool.pool_sweep()["hosts"][base_version.host.name]["paused_to_disk"] == 1
    row = Sandbox.objects.get(pk=sandbox.pk)
    assert (row.state, row.paused_in_memory, vm_cleanup.domain_status(row.vm_name)) == (
        S.STOPPED,
        False,
        "saved",
    )
    # then its resume continues the process too
    row = resume()
    assert running(row) == {pid: True}
    agent = vm.agent_client(row)
    agent.exec("echo written-before-the-pause > /root/late.txt")

    # when it is paused in memory and its host dies (the QEMU process killed, the domain stopped)
    settings.PAUSE_IN_MEMORY_SECONDS = 300
    services.sandbox_pause(sandbox=row)
    vm_cleanup.conn.lookupByName(row.vm_name).destroy()
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now() - timedelta(seconds=5))
    reconciled = sweeps.reconcile_sweep()["hosts"][base_version.host.name]
    swept = pool.pool_sweep()["hosts"][base_version.host.name]

    # then reconciliation keeps it stopped, and its resume boots on its disk: the files are
    # there (synced at the pause), the processes are not
    assert reconciled["lost"] == 0, reconciled
    assert swept["memory_lost"] == 1, swept  # it holds no host memory any more
    row = Sandbox.objects.get(pk=sandbox.pk)
    assert (row.state, row.paused_in_memory, row.memory_lost) == (S.STOPPED, False, True)
    row = resume()
    agent = vm.agent_client(row)
    assert agent.exec("cat /root/kept.txt /root/late.txt")["stdout"] == "kept\nwritten-before-the-pause\n"
    assert running(row) == {}
    assert row.events.order_by("-pk").values_list("reason", flat=True)[0].startswith("resumed on its disk")

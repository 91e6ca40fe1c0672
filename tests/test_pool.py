"""Warm pools and in-memory pauses on the fake runtime (tests/fake_driver.py): which pooled VM
a create takes, what the pool sweep keeps, drains and releases, how placement counts memory
that does not run, and what the sweeps make of pooled and suspended domains. Filling a pool
and taking a VM from it on real VMs: tests/test_pool_vm.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from sandboxes import pool, sweeps
from sandboxes.models import PooledVm, PooledVmState, Sandbox, SandboxState
from sandboxes.placement import hosts_with_room
from templates_app.models import TemplateVersion, VersionStatus
from tests.conftest import Actor
from tests.factories import SandboxFactory
from tests.fake_driver import FakeDriver, fake_vm

pytestmark = pytest.mark.django_db
S = SandboxState


def _pooled(driver: FakeDriver, host, version, *, cpu=1, memory_mb=512, state=PooledVmState.READY, **kw):  # type: ignore[no-untyped-def]
    pooled = PooledVm.objects.create(
        host=host,
        template_version=version,
        cpu_count=cpu,
        memory_mb=memory_mb,
        state=state,
        agent_port=40000,
        ready_at=timezone.now(),
        **kw,
    )
    fake_vm(driver, pooled.domain_name, "suspended" if state == PooledVmState.READY else "running")
    return pooled


def _claim(version: TemplateVersion, cpu: int = 1, memory_mb: int = 512) -> pool.Claimed | None:
    with transaction.atomic():
        return pool.pool_claim(version=version, cpu=cpu, memory_mb=memory_mb, among=None)


def test_a_claim_takes_a_ready_pooled_vm_of_the_version_and_shape_once(
    local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a ready pooled VM of the base version, one of another shape, and one still filling
    ready = _pooled(fake_driver, local_host, base_version_row)
    _pooled(fake_driver, local_host, base_version_row, cpu=2, memory_mb=1024)
    _pooled(fake_driver, local_host, base_version_row, state=PooledVmState.FILLING)
    name, uid = ready.domain_name, ready.qemu_uid

    # when two creates of the base shape claim
    first, second = _claim(base_version_row), _claim(base_version_row)

    # then the first takes the ready one (its row gone, its domain and uid handed over), the
    # second finds none of that shape ready
    assert first is not None and (first.domain_name, first.qemu_uid, first.agent_port) == (name, uid, 40000)
    assert not PooledVm.objects.filter(pk=ready.pk).exists()
    assert second is None
    assert uid is not None and uid > 2_000_000_000  # above every sandbox's uid


def test_a_claim_skips_a_host_without_the_vcpus(
    local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a ready pooled VM on a host whose vCPUs are all handed out
    _pooled(fake_driver, local_host, base_version_row)
    local_host.cpu_capacity = 1
    local_host.save()
    SandboxFactory(host=local_host, state=S.READY, cpu_count=1, memory_mb=512)

    # when a create claims
    claimed = _claim(base_version_row)

    # then nothing is taken
    assert claimed is None
    assert PooledVm.objects.count() == 1


def test_the_pool_is_off_without_a_uid_per_vm(
    local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given a ready pooled VM on an installation where QEMUs share one uid
    _pooled(fake_driver, local_host, base_version_row)
    settings.RUNTIME_QEMU_UID_BASE = 0

    # when a create claims, then nothing is taken (a pooled VM's policy is its uid's rules)
    assert _claim(base_version_row) is None


def test_placement_counts_the_memory_of_pooled_vms_and_in_memory_pauses_but_not_their_vcpus(
    local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given an empty host, then a pooled VM and a pause held in memory on it
    before = next(r for r in hosts_with_room() if r.host.pk == local_host.pk)
    _pooled(fake_driver, local_host, base_version_row, memory_mb=512)
    SandboxFactory(host=local_host, state=S.STOPPED, paused_in_memory=True, cpu_count=2, memory_mb=1024)
    SandboxFactory(host=local_host, state=S.STOPPED, paused_in_memory=False, cpu_count=2, memory_mb=1024)

    # when placement looks at the host
    after = next(r for r in hosts_with_room() if r.host.pk == local_host.pk)

    # then 512 + 1024 MiB are taken, no vCPU (the pause on disk holds nothing)
    assert before.free_memory_mb - after.free_memory_mb == 1536
    assert after.free_cpu == before.free_cpu


def test_memory_overcommit_widens_placement(local_host, settings) -> None:  # type: ignore[no-untyped-def]
    # given a host's memory capacity
    base = next(r for r in hosts_with_room() if r.host.pk == local_host.pk).free_memory_mb

    # when the operator allows 150 %
    settings.RUNTIME_MEMORY_OVERCOMMIT_PERCENT = 150

    # then placement may hand out half as much again
    after = next(r for r in hosts_with_room() if r.host.pk == local_host.pk).free_memory_mb
    assert after == local_host.memory_capacity_mb * 3 // 2 == base * 3 // 2


def test_placement_refuses_a_host_short_of_measured_memory(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given a host with room on paper whose measured free memory is below the floor
    settings.HOST_MIN_AVAILABLE_MB = 1024
    fake_driver.available_mb = 1000

    # when a sandbox is created
    response = owner.client().post("/v1/sandboxes", {"template": "base"}, format="json")

    # then it is refused as overloaded (the SDK's SandboxOverloadedException), nothing created
    assert response.status_code == 503, response.content
    assert response.json()["error"] == "sandbox_overloaded"
    assert not Sandbox.objects.exists()


def test_targets_keep_base_warm_and_follow_recent_demand(
    owner: Actor, local_host, base_version_row, settings
) -> None:  # type: ignore[no-untyped-def]
    # given the base version, another team template with two creates in the window and one
    # created from long ago, and a superseded version of it
    settings.POOL_BASE_SIZE, settings.POOL_MAX_PER_SHAPE = 2, 8
    template = base_version_row.template.__class__.objects.create(
        team=owner.personal_team, slug="t", name="T"
    )
    now = timezone.now()
    old = TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.READY, cpu=1, memory_mb=512, built_at=now
    )
    current = TemplateVersion.objects.create(
        template=template,
        version="v2",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        built_at=now + timedelta(seconds=1),
    )
    for version, shape in ((current, (2, 1024)), (current, (2, 1024)), (old, (1, 512))):
        SandboxFactory(
            team=owner.personal_team,
            host=local_host,
            template_version=version,
            cpu_count=shape[0],
            memory_mb=shape[1],
        )
    stale = SandboxFactory(
        team=owner.personal_team, host=local_host, template_version=current, memory_mb=2048
    )
    Sandbox.objects.filter(pk=stale.pk).update(created_at=now - timedelta(hours=1))

    # when the pool's targets are computed
    targets = pool.pool_targets(local_host, timezone.now())

    # then base is kept at its size, the current version at its recent creates per shape;
    # the superseded version and the old demand get nothing
    assert targets == {(base_version_row.pk, 1, 512): 2, (current.pk, 2, 1024): 2}


def test_the_pool_sweep_drains_what_is_unwanted_stopped_or_abandoned(
    local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given three ready pooled VMs of base (target 2), one whose domain stopped (a host
    # restart), one of a deleted version, and one whose filler died long ago
    settings.POOL_BASE_SIZE, settings.SWEEP_STUCK_AFTER_SECONDS = 2, 60
    kept = [_pooled(fake_driver, local_host, base_version_row) for _ in range(3)]
    stopped = _pooled(fake_driver, local_host, base_version_row)
    fake_driver.forget(stopped.domain_name)
    deleted = TemplateVersion.objects.create(
        template=base_version_row.template,
        version="gone",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        deleted_at=timezone.now(),
    )
    unwanted = _pooled(fake_driver, local_host, deleted)
    abandoned = _pooled(fake_driver, local_host, base_version_row, state=PooledVmState.FILLING)
    PooledVm.objects.filter(pk=abandoned.pk).update(created_at=timezone.now() - timedelta(minutes=5))

    # when the pool sweep runs (it cannot fill here: the fake has no agent)
    result = pool.pool_sweep()["hosts"][local_host.name]

    # then two of base stay, everything else is gone with its domain
    left = set(PooledVm.objects.values_list("pk", flat=True))
    assert len(left) == 2 and left < {p.pk for p in kept}
    assert (result["unwanted"], result["stopped"], result["abandoned"]) == (2, 1, 1)
    for gone in (unwanted, abandoned, *[p for p in kept if p.pk not in left]):
        assert fake_driver.domain_status(gone.domain_name) == "absent"


def test_a_host_short_of_memory_releases_its_pooled_vms_and_fills_none(
    local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given two wanted pooled VMs on a host whose measured free memory is below the pool's floor
    settings.POOL_BASE_SIZE, settings.POOL_MIN_AVAILABLE_MB = 2, 2048
    pooled = [_pooled(fake_driver, local_host, base_version_row) for _ in range(2)]
    fake_driver.available_mb = 1500

    # when the pool sweep runs
    result = pool.pool_sweep()["hosts"][local_host.name]

    # then both are released and none filled
    assert result["released_for_memory"] == 2 and result["filled"] == 0
    assert not PooledVm.objects.exists()
    assert all(fake_driver.domain_status(p.domain_name) == "absent" for p in pooled)


def test_in_memory_pauses_go_to_disk_when_due_or_when_memory_is_short(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given a pause held in memory for long, a recent one, and a recent one on a host short of memory
    settings.PAUSE_IN_MEMORY_SECONDS = 300
    due, recent = (
        SandboxFactory(team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=True)
        for _ in range(2)
    )
    for sandbox in (due, recent):
        fake_vm(fake_driver, sandbox.vm_name, "suspended")
    Sandbox.objects.filter(pk=due.pk).update(paused_at=timezone.now() - timedelta(minutes=10))
    Sandbox.objects.filter(pk=recent.pk).update(paused_at=timezone.now())

    # when the pool sweep runs, then again with the host short of memory
    first = pool.pool_sweep()["hosts"][local_host.name]["paused_to_disk"]
    statuses = (fake_driver.domain_status(due.vm_name), fake_driver.domain_status(recent.vm_name))
    fake_driver.available_mb = 100
    second = pool.pool_sweep()["hosts"][local_host.name]["paused_to_disk"]

    # then the due one went to disk first, the recent one once memory was short; both stay stopped
    assert (first, statuses, second) == (1, ("saved", "suspended"), 1)
    assert fake_driver.domain_status(recent.vm_name) == "saved"
    for sandbox in (due, recent):
        sandbox.refresh_from_db()
        assert (sandbox.state, sandbox.paused_in_memory) == (S.STOPPED, False)


def test_reconcile_knows_pooled_domains_and_sandboxes_running_them(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a pooled VM, a sandbox running a domain it took from the pool, a pool-named
    # domain no row owns, and a pause held in memory whose host restarted (domain gone)
    pooled = _pooled(fake_driver, local_host, base_version_row)
    taken = SandboxFactory(
        team=owner.personal_team,
        host=local_host,
        state=S.READY,
        domain_name=f"{pooled.domain_name[:-1]}999999",
    )
    fake_vm(fake_driver, taken.vm_name)
    stray = pooled.domain_name.replace("pool-", "pool-12345")
    fake_vm(fake_driver, stray, "suspended")
    crashed = SandboxFactory(
        team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=True
    )
    on_disk = SandboxFactory(
        team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=False
    )
    Sandbox.objects.update(updated_at=timezone.now() - timedelta(seconds=5))

    # when reconciliation runs
    result = sweeps.reconcile_sweep()["hosts"][local_host.name]

    # then the pooled VM and the taken domain stay, the stray goes; the pause held in memory
    # stays stopped (it resumes on its disk), the one whose saved memory vanished is lost
    assert fake_driver.domain_status(pooled.domain_name) == "suspended"
    assert fake_driver.domain_status(taken.vm_name) == "running"
    assert fake_driver.domain_status(stray) == "absent"
    assert result["removed"] == 1 and result["lost"] == 1
    crashed.refresh_from_db()
    on_disk.refresh_from_db()
    assert (crashed.state, on_disk.state) == (S.STOPPED, S.LOST)


def test_the_stuck_sweep_turns_a_suspended_stop_into_an_in_memory_pause(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given a sandbox left `stopping` by a process that died after suspending its VM
    settings.SWEEP_STUCK_AFTER_SECONDS = 60
    sandbox = SandboxFactory(team=owner.personal_team, host=local_host, state=S.STOPPING)
    fake_vm(fake_driver, sandbox.vm_name, "suspended")
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now() - timedelta(minutes=5))

    # when the stuck sweep runs
    result = sweeps.stuck_sweep()

    # then it is a stopped sandbox whose memory is held (its resume continues the VM)
    sandbox.refresh_from_db()
    assert result["recovered"] == {S.STOPPED: 1}
    assert (sandbox.state, sandbox.paused_in_memory) == (S.STOPPED, True)


def test_a_team_at_its_cap_of_in_memory_pauses_pauses_to_disk(
    owner: Actor, local_host, fake_driver: FakeDriver, settings
) -> None:  # type: ignore[no-untyped-def]
    # given a team holding its cap of in-memory pauses
    settings.PAUSE_IN_MEMORY_PER_TEAM = 2
    for _ in range(2):
        SandboxFactory(team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=True)
    ready = SandboxFactory(team=owner.personal_team, host=local_host, state=S.READY)
    other = SandboxFactory(host=local_host, state=S.READY)

    # then its next pause goes to disk, another team's may stay in memory; the tier off: disk
    assert pool.pause_in_memory_allowed(ready) is False
    assert pool.pause_in_memory_allowed(other) is True
    settings.PAUSE_IN_MEMORY_SECONDS = 0
    assert pool.pause_in_memory_allowed(other) is False


def test_a_row_touched_while_paused_in_memory_still_goes_to_disk_in_time(
    owner: Actor, local_host, fake_driver: FakeDriver, settings
) -> None:
    # given a pause held in memory for 10 minutes whose row a client keeps touching
    # (a set_timeout every minute)
    settings.PAUSE_IN_MEMORY_SECONDS = 300
    sandbox = SandboxFactory(
        team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=True
    )
    fake_vm(fake_driver, sandbox.vm_name, "suspended")
    Sandbox.objects.filter(pk=sandbox.pk).update(
        paused_at=timezone.now() - timedelta(minutes=10), updated_at=timezone.now()
    )

    # when the pool sweep runs, then its memory goes to disk (the pause's age counts)
    assert pool.pool_sweep()["hosts"][local_host.name]["paused_to_disk"] == 1
    assert fake_driver.domain_status(sandbox.vm_name) == "saved"


def test_an_in_memory_pause_whose_vm_died_stops_holding_memory_and_resumes_on_disk(
    owner: Actor, local_host, fake_driver: FakeDriver
) -> None:
    # given a pause held in memory whose VM is gone (its host restarted)
    sandbox = SandboxFactory(
        team=owner.personal_team, host=local_host, state=S.STOPPED, paused_in_memory=True, memory_mb=1024
    )
    held = next(r for r in hosts_with_room() if r.host.pk == local_host.pk).free_memory_mb

    # when the pool sweep runs
    result = pool.pool_sweep()["hosts"][local_host.name]

    # then it holds no host memory and no in-memory slot of its team, and is marked to
    # resume on its disk; reconciliation keeps it stopped
    sandbox.refresh_from_db()
    assert result["memory_lost"] == 1
    assert (sandbox.state, sandbox.paused_in_memory, sandbox.memory_lost) == (S.STOPPED, False, True)
    assert next(r for r in hosts_with_room() if r.host.pk == local_host.pk).free_memory_mb == held + 1024
    Sandbox.objects.update(updated_at=timezone.now() - timedelta(seconds=5))
    assert sweeps.reconcile_sweep()["hosts"][local_host.name]["lost"] == 0


def test_a_shape_that_does_not_fit_the_pool_does_not_stop_the_others_filling(
    local_host, base_version_row, fake_driver: FakeDriver, settings, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # given targets of a big shape that no longer fits the pool's memory, and of base
    settings.POOL_MAX_MEMORY_MB, settings.POOL_FILL_BATCH = 1024, 10
    filled: list[tuple[int, int]] = []

    def fill_one(host, driver, version, cpu, memory_mb) -> bool:  # type: ignore[no-untyped-def]
        filled.append((cpu, memory_mb))
        PooledVm.objects.create(
            host=host, template_version=version, cpu_count=cpu, memory_mb=memory_mb, state=PooledVmState.READY
        )
        return True

    monkeypatch.setattr(pool, "_fill_one", fill_one)
    targets = {(base_version_row.pk, 4, 2048): 3, (base_version_row.pk, 1, 512): 2}

    # when the pool fills
    pool._fill(local_host, fake_driver, targets)

    # then the big shape was skipped and base filled
    assert filled == [(1, 512), (1, 512)]

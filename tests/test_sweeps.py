"""Sweeps without VMs: bounded batches, state recovery, host health, retention, operators' tools.

The runtime here is real libvirt (a sandbox whose domain does not exist is what these
rows describe); tests/test_sweeps_vm.py does the same with real VMs and real beat.
"""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from sandboxes import hosts, sweeps
from sandboxes.models import Host, HostState, Sandbox, SandboxEvent, SandboxState, SweepRun
from teams.models import IdempotencyRecord
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db
S = SandboxState


def _rows(count: int, host: Host, version, **fields) -> list[Sandbox]:  # type: ignore[no-untyped-def]
    return [
        SandboxFactory(host=host, template_version=version, template=version.template, **fields)
        for _ in range(count)
    ]


def test_deadline_sweep_expires_in_bounded_batches(
    owner: Actor, local_host, base_version_row, settings
) -> None:
    settings.SWEEP_BATCH_SIZE = 10
    past = timezone.now() - timedelta(seconds=1)
    due = _rows(25, local_host, base_version_row, team=owner.personal_team, state=S.READY, deadline_at=past)
    later = _rows(
        1,
        local_host,
        base_version_row,
        team=owner.personal_team,
        state=S.READY,
        deadline_at=timezone.now() + timedelta(hours=1),
    )

    results = [sweeps.deadline_sweep() for _ in range(3)]

    assert [(r["expired"], r["more"]) for r in results] == [(10, True), (10, True), (5, False)]
    assert set(Sandbox.objects.filter(pk__in=[s.pk for s in due]).values_list("state", flat=True)) == {
        S.EXPIRED
    }
    expired = Sandbox.objects.get(pk=due[0].pk)
    assert expired.purged_at is not None and expired.ended_at is not None
    assert expired.session_epoch == due[0].session_epoch + 1  # its session tokens are dead
    events = SandboxEvent.objects.filter(sandbox=expired).values_list("from_state", "to_state", "reason")
    assert list(events) == [("ready", "expired", "timeout")]
    assert Sandbox.objects.get(pk=later[0].pk).state == S.READY
    assert sweeps.deadline_sweep()["expired"] == 0  # idempotent


def test_stuck_sandboxes_are_moved_to_their_true_state(
    owner: Actor, local_host, base_version_row, settings
) -> None:
    settings.SWEEP_STUCK_AFTER_SECONDS = 60
    team = owner.personal_team
    creating, stopping, restoring = (
        _rows(1, local_host, base_version_row, team=team, state=state)[0]
        for state in (S.CREATING, S.STOPPING, S.RESTORING)
    )
    fresh = _rows(1, local_host, base_version_row, team=team, state=S.CREATING)[0]
    old = timezone.now() - timedelta(minutes=5)
    Sandbox.objects.exclude(pk=fresh.pk).update(updated_at=old)

    result = sweeps.stuck_sweep()

    states = dict(Sandbox.objects.values_list("pk", "state"))
    assert states == {creating.pk: S.FAILED, stopping.pk: S.LOST, restoring.pk: S.LOST, fresh.pk: S.CREATING}
    assert result["recovered"] == {"failed": 1, "lost": 2}
    assert "stopped before it was ready" in Sandbox.objects.get(pk=creating.pk).last_error


def test_ready_rows_without_a_vm_become_lost(owner: Actor, local_host, base_version_row) -> None:
    ghost = _rows(
        1,
        local_host,
        base_version_row,
        team=owner.personal_team,
        state=S.READY,
        deadline_at=timezone.now() + timedelta(hours=1),
    )[0]
    Sandbox.objects.filter(pk=ghost.pk).update(updated_at=timezone.now() - timedelta(seconds=5))

    result = sweeps.reconcile_sweep()

    ghost.refresh_from_db()
    assert result["hosts"][local_host.name]["lost"] == 1
    assert ghost.state == S.LOST and ghost.ended_at is not None and ghost.purged_at is None
    assert SandboxEvent.objects.filter(sandbox=ghost, to_state=S.LOST).exists()  # its meter stops here


def test_a_host_whose_libvirt_is_gone_is_down_and_gets_no_placements(
    owner: Actor, local_host, base_version_row
) -> None:
    dead = Host.objects.create(
        name="dead",
        libvirt_uri="qemu+tcp://127.0.0.1:1/system",
        data_dir="/tmp/nowhere",
        cpu_capacity=64,
        memory_capacity_mb=65536,
    )
    _rows(2, dead, base_version_row, team=owner.personal_team, state=S.READY)
    Host.objects.filter(pk=local_host.pk).update(state=HostState.DOWN)  # as if it had failed earlier

    result = hosts.host_health_sweep()

    assert result["hosts"]["dead"] == {"state": "down", "sandboxes": {"ready": 2}}  # reported
    assert result["hosts"][local_host.name] == "up"  # answers again: back up
    assert Host.objects.get(pk=dead.pk).state == HostState.DOWN
    assert Sandbox.objects.filter(host=dead, state=S.READY).count() == 2  # not silently dropped
    from sandboxes.placement import host_place

    assert host_place(cpu=1, memory_mb=512).pk == local_host.pk  # never the down one
    assert sweeps.reconcile_sweep()["hosts"].keys() == {local_host.name}


def _touch(path: Path, age_seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"disk")
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_retention_removes_only_what_nothing_references(
    owner: Actor, local_host, base_version_row, settings
) -> None:
    settings.SANDBOX_DISK_RETENTION_SECONDS = 3600
    settings.ORPHAN_FILE_GRACE_SECONDS = 60
    team = owner.personal_team
    state_dir = Path(local_host.data_dir) / "sandboxes"
    long_ago, recently = timezone.now() - timedelta(hours=2), timezone.now() - timedelta(minutes=5)
    old_failed = _rows(1, local_host, base_version_row, team=team, state=S.FAILED, ended_at=long_ago)[0]
    new_lost = _rows(1, local_host, base_version_row, team=team, state=S.LOST, ended_at=recently)[0]
    stopped = _rows(1, local_host, base_version_row, team=team, state=S.STOPPED)[0]
    disks = {
        s.pk: _touch(state_dir / f"{VM_TEST_PREFIX}{s.pk}.qcow2", 7200)
        for s in (old_failed, new_lost, stopped)
    }
    orphan = _touch(state_dir / f"{VM_TEST_PREFIX}99999999.qcow2", 7200)
    young_orphan = _touch(state_dir / f"{VM_TEST_PREFIX}99999998.qcow2", 1)
    foreign = _touch(state_dir / "someone-elses.qcow2", 7200)
    key = owner.user.api_keys.first()
    now = timezone.now()
    for name, expires in (("old", now - timedelta(seconds=1)), ("new", now + timedelta(hours=1))):
        IdempotencyRecord.objects.create(
            api_key=key, key=name, fingerprint="x", lease_expires_at=now, expires_at=expires
        )

    result = sweeps.retention_sweep()

    assert not disks[old_failed.pk].exists() and Sandbox.objects.get(pk=old_failed.pk).purged_at
    assert disks[new_lost.pk].exists() and disks[stopped.pk].exists()  # retained / still in use
    assert not orphan.exists() and young_orphan.exists() and foreign.exists()
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]
    assert (result["sandboxes_purged"], result["idempotency_records"]) == (1, 1)
    assert result["orphan_files"] >= 1  # the shared test data dir may hold earlier runs' leftovers


def test_deleted_version_files_wait_for_their_last_sandbox(owner: Actor, acme, local_host) -> None:
    from templates_app.models import Template, TemplateVersion, VersionStatus

    template = Template.objects.create(team=acme, slug="lab", name="Lab")
    home = Path(local_host.data_dir) / "templates" / "lab" / "v1-abcd1234"
    (home / "snapshot").mkdir(parents=True, exist_ok=True)
    (home / "base.qcow2").write_bytes(b"disk")
    version = TemplateVersion.objects.create(
        template=template,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=local_host,
        artifact_dir=str(home / "snapshot"),
        deleted_at=timezone.now(),
    )
    user = _rows(1, local_host, version, team=acme, state=S.STOPPED)[0]

    sweeps.retention_sweep()
    assert home.exists()  # a stopped sandbox still runs on its disk

    Sandbox.objects.filter(pk=user.pk).update(state=S.DESTROYED, purged_at=timezone.now())
    sweeps.retention_sweep()
    assert not home.exists() and TemplateVersion.objects.get(pk=version.pk).artifact_dir == ""


def test_operators_list_and_run_sweeps(admin_client, local_host) -> None:
    out = io.StringIO()
    call_command("sweep", stdout=out)
    assert [line.split()[0] for line in out.getvalue().splitlines()] == list(sweeps.SWEEPS)
    call_command("sweep", "deadlines", "hosts", stdout=out)
    assert "deadlines: {" in out.getvalue() and "hosts: {" in out.getvalue()
    with pytest.raises(Exception, match="unknown sweep"):
        call_command("sweep", "nope")

    page = admin_client.get("/admin/sandboxes/sweeprun/")
    assert page.status_code == 200
    assert set(SweepRun.objects.values_list("name", flat=True)) == set(sweeps.SWEEPS)
    run = SweepRun.objects.get(name="retention")
    admin_client.post("/admin/sandboxes/sweeprun/", {"action": "run_sweeps", "_selected_action": [run.pk]})
    run.refresh_from_db()
    assert run.runs == 1 and run.last_finished_at is not None and "orphan_files" in run.last_result


def test_beat_schedules_every_sweep_with_an_expiry(settings) -> None:
    schedule = settings.CELERY_BEAT_SCHEDULE
    assert {entry["args"][0] for entry in schedule.values()} == set(sweeps.SWEEPS)
    assert all(
        entry["task"] == "sweeps.run" and entry["options"]["expires"] > 0 for entry in schedule.values()
    )


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_full_batch_queues_the_sweep_again_until_done(
    require_postgres, owner: Actor, local_host, base_version_row
) -> None:
    """One `sweeps.run` message, a real worker, batches of 200: it re-queues itself until done."""
    from sandboxes.tasks import sweep_task
    from tests.conftest import celery_worker, helper_process_env
    from tests.waiting import wait_until

    past = timezone.now() - timedelta(seconds=1)
    ids = [
        s.pk
        for s in Sandbox.objects.bulk_create(
            Sandbox(
                team=owner.personal_team,
                host=local_host,
                state=S.READY,
                cpu_count=1,
                memory_mb=512,
                timeout=60,
                deadline_at=past,
            )
            for _ in range(1200)
        )
    ]

    with celery_worker(helper_process_env(WATASU_SWEEP_BATCH_SIZE="200")):
        sweep_task.delay("deadlines")
        # the last, empty run is recorded after the rows are gone: wait for what is asserted
        wait_until(
            lambda: (
                SweepRun.objects.filter(name="deadlines", runs__gte=7).exists()
                and not Sandbox.objects.filter(pk__in=ids, state=S.READY).exists()
            ),
            180,
            "the sweep's seventh run",
        )

    run = SweepRun.objects.get(name="deadlines")
    assert run.runs == 7  # six full batches, then one that found nothing left
    assert Sandbox.objects.filter(pk__in=ids, state=S.EXPIRED, purged_at__isnull=False).count() == 1200


def test_build_cache_retention_keeps_chains_whole(local_host, base_version_row, settings) -> None:
    from templates_app.layers import layers_dir
    from templates_app.models import BuildLayer

    settings.BUILD_LAYER_RETENTION_SECONDS = 3600
    settings.ORPHAN_FILE_GRACE_SECONDS = 60
    directory = layers_dir(local_host)

    def layer(key: str, parent: BuildLayer | None, *, age_hours: float, file: bool = True) -> BuildLayer:
        path = directory / f"{key}.qcow2"
        if file:
            _touch(path, 7200)
        row = BuildLayer.objects.create(
            host=local_host,
            key=key,
            parent=parent,
            step="setup[0]",
            base_version=base_version_row,
            path=str(path),
        )
        BuildLayer.objects.filter(pk=row.pk).update(last_used_at=timezone.now() - timedelta(hours=age_hours))
        return row

    old_root = layer("old-root", None, age_hours=5)
    old_leaf = layer("old-leaf", old_root, age_hours=5)
    used_root = layer("used-root", None, age_hours=5)
    used_leaf = layer("used-leaf", used_root, age_hours=0)  # used recently: its parent stays too
    gone = layer("gone", None, age_hours=0, file=False)
    on_gone = layer("on-gone", gone, age_hours=0)  # its backing file vanished: unusable
    unregistered = _touch(directory / "crashed-build.qcow2", 7200)

    sweeps.retention_sweep()
    left = set(BuildLayer.objects.values_list("key", flat=True))
    assert left == {"old-root", "used-root", "used-leaf"}  # one level per run: leaves first
    assert not Path(old_leaf.path).exists() and not Path(on_gone.path).exists()
    assert not unregistered.exists()

    sweeps.retention_sweep()
    assert set(BuildLayer.objects.values_list("key", flat=True)) == {"used-root", "used-leaf"}
    assert not Path(old_root.path).exists()
    assert Path(used_root.path).exists() and Path(used_leaf.path).exists()


def test_a_deleted_templates_files_and_the_layers_on_it_are_swept(owner: Actor, acme, local_host) -> None:
    from templates_app import services
    from templates_app.models import BuildLayer, Template, TemplateVersion, VersionStatus

    # given a team template with a ready version, and cached build layers built on it
    template = Template.objects.create(team=acme, slug="gone", name="Gone")
    home = Path(local_host.data_dir) / "templates" / "gone" / "v1-abcd1234"
    (home / "snapshot").mkdir(parents=True, exist_ok=True)
    (home / "base.qcow2").write_bytes(b"disk")
    version = TemplateVersion.objects.create(
        template=template,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=local_host,
        artifact_dir=str(home / "snapshot"),
    )
    parent = None
    files = []
    for index in range(2):
        files.append(Path(local_host.data_dir) / "layers" / f"gone-{index}.qcow2")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_bytes(b"layer")
        parent = BuildLayer.objects.create(
            host=local_host,
            key=f"gone-{index}",
            parent=parent,
            step=f"setup[{index}]",
            base_version=version,
            path=str(files[-1]),
        )

    # when the template is deleted and the retention sweep runs
    services.template_delete(user=owner.user, template=template)
    result = sweeps.retention_sweep()

    # then its files and the layers nobody can build from any more are gone
    assert result["template_versions"] == 1
    assert not home.exists() and not any(path.exists() for path in files)
    assert not BuildLayer.objects.filter(base_version=version).exists()


def test_a_drained_host_that_goes_down_is_still_drained_when_it_returns(local_host) -> None:  # type: ignore[no-untyped-def]
    # given a host the operator drained, whose libvirt then stops answering
    flaky = Host.objects.create(
        name="flaky",
        libvirt_uri="qemu+tcp://127.0.0.1:1/system",
        data_dir="/tmp/nowhere",
        cpu_capacity=64,
        memory_capacity_mb=65536,
        state=HostState.DRAINING,
    )

    # when the health sweep finds it silent
    result = hosts.host_health_sweep()

    # then it is reported down but keeps the drain (it takes no placements either way)
    assert result["hosts"]["flaky"]["state"] == "down"
    assert Host.objects.get(pk=flaky.pk).state == HostState.DRAINING

"""Checkpoints on real VMs: the SDK end to end, the guest's freeze, checkpoints outliving
their source and their template version, volumes kept out, and no loss over many
checkpoint -> restore rounds."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

from sandboxes import services, sweeps
from sandboxes.models import Checkpoint, Sandbox, SandboxState
from sandboxes.runtime import lifecycle, vm
from templates_app.models import Template, TemplateVersion, VersionStatus
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.sdk import run_scenario
from tests.waiting import wait_until

pytestmark = pytest.mark.vm
S = SandboxState


def _run(sandbox_id: int, command: str, timeout: float = 60) -> str:
    result = vm.agent_client(Sandbox.objects.get(pk=sandbox_id)).exec(command, timeout=timeout)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def _create(actor: Actor, **body: object) -> int:
    response = actor.client().post("/v1/sandboxes", body, format="json")
    assert response.status_code == 201, response.content
    return int(response.json()["sandbox"]["id"])


def _checkpoint(actor: Actor, sandbox_id: int, **body: object) -> dict:  # type: ignore[type-arg]
    response = actor.client().post(f"/v1/sandboxes/{sandbox_id}/checkpoints", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["sandbox_checkpoint"]  # type: ignore[no-any-return]


@pytest.mark.django_db(transaction=True)
def test_sdk_drives_checkpoints(edge, owner: Actor, base_version, vm_cleanup) -> None:
    output = run_scenario("checkpoints", api_url=f"{edge.url}/v1", api_key=owner.write_key)

    assert output == "ok\n"
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []
    assert not Checkpoint.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_guest_checkpoint_holds_what_a_busy_writer_wrote_and_the_guest_runs_on(
    owner: Actor, base_version, vm_cleanup
) -> None:
    # given a sandbox whose process appends a line every few milliseconds
    source = _create(owner)
    _run(source, "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i >> /root/log; done' >/dev/null 2>&1 &")
    _run(source, "sleep 0.5")

    # when it is checkpointed in guest mode while writing, and its disk keeps changing
    checkpoint = _checkpoint(owner, source, name="busy")
    lines_after = int(_run(source, "sleep 0.3; wc -l < /root/log"))
    _run(source, "echo after > /root/after.txt")

    # then the checkpoint is consistent: its log is whole lines up to the freeze
    assert checkpoint["status"] == "ready" and checkpoint["size_bytes"] > 0
    assert Sandbox.objects.get(pk=source).state == S.READY
    copy = _create(owner, snapshot_id=checkpoint["id"])
    captured = _run(copy, "cat /root/log")
    numbers = [int(line) for line in captured.splitlines()]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers, captured[-200:]
    assert len(numbers) < lines_after
    assert _run(copy, "test -e /root/after.txt || echo absent") == "absent\n"
    # the source's disk is one layer again and it keeps every write
    driver = vm.driver_for(Sandbox.objects.get(pk=source).placed_host)
    assert not (driver.sandbox_dir(f"{VM_TEST_PREFIX}{source}") / "checkpoint-top.qcow2").exists()
    assert _run(source, "cat /root/after.txt") == "after\n"


@pytest.mark.django_db(transaction=True)
def test_a_frozen_guest_thaws_itself_when_the_host_never_asks(owner: Actor, base_version, vm_cleanup) -> None:
    sandbox_id = _create(owner)
    client = vm.agent_client(Sandbox.objects.get(pk=sandbox_id))

    client.request("POST", "/checkpoint/freeze", {"thaw_after": 1}, timeout=10)
    started = time.monotonic()
    _run(sandbox_id, "echo written > /root/late.txt && sync")  # blocks until the guest thaws

    assert time.monotonic() - started >= 0.5
    assert _run(sandbox_id, "cat /root/late.txt") == "written\n"
    assert client.request("POST", "/checkpoint/thaw", {}, timeout=10) == {"thawed": False}


@pytest.fixture
def team_version(owner: Actor, base_version, local_host):  # type: ignore[no-untyped-def]
    """A team template version laid out as the build pipeline lays one out, its snapshot a
    copy of the base's (so the retention sweep may remove it without touching the base)."""
    snapshot = lifecycle.load_template_snapshot(base_version.artifact_dir)
    home = Path(local_host.data_dir) / "templates" / "ckpt-tpl" / f"v1-{secrets.token_hex(4)}"
    artifact = home / "snapshot"
    artifact.mkdir(parents=True)
    os.link(snapshot.save_path, artifact / snapshot.save_path.name)
    shutil.copyfile(snapshot.disk_path, artifact / snapshot.disk_path.name)
    (artifact / snapshot.disk_path.name).chmod(0o444)
    dataclasses.replace(
        snapshot, save_path=artifact / snapshot.save_path.name, disk_path=artifact / snapshot.disk_path.name
    ).write(artifact / lifecycle.SNAPSHOT_FILE)
    template = Template.objects.create(team=owner.personal_team, slug="ckpt-tpl", name="ckpt")
    version = TemplateVersion.objects.create(
        template=template,
        version="v1",
        status=VersionStatus.READY,
        cpu=base_version.cpu,
        memory_mb=base_version.memory_mb,
        host=local_host,
        artifact_dir=str(artifact),
    )
    yield version
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.django_db(transaction=True)
def test_a_checkpoint_outlives_its_source_and_its_deleted_template_version(
    owner: Actor, team_version, vm_cleanup
) -> None:
    # given a checkpoint of a sandbox on a team template's version
    source = _create(owner, template="ckpt-tpl")
    _run(source, "echo kept > /root/kept.txt && sync")  # crash mode takes what is on disk
    checkpoint = _checkpoint(owner, source, quiesce_mode="crash")
    version = TemplateVersion.objects.get(pk=checkpoint["template_version_id"])
    assert version == team_version

    # when the source is destroyed, the version retired, and the retention sweep runs
    assert owner.client().delete(f"/v1/sandboxes/{source}").status_code == 200
    TemplateVersion.objects.filter(pk=version.pk).update(deleted_at="2000-01-01T00:00:00Z")
    sweeps.sweep_run("retention")

    # then the checkpoint is listed, its files are there, and it restores
    assert TemplateVersion.objects.get(pk=version.pk).artifact_dir == version.artifact_dir
    listed = owner.client().get(f"/v1/sandboxes/{source}/checkpoints").json()["sandbox_checkpoints"]
    assert [c["id"] for c in listed] == [checkpoint["id"]]
    restored = owner.client().post(
        f"/v1/sandboxes/{source}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
    )
    assert restored.status_code == 201, restored.content
    assert _run(restored.json()["sandbox"]["id"], "cat /root/kept.txt") == "kept\n"
    owner.client().delete(f"/v1/sandboxes/{restored.json()['sandbox']['id']}")
    # and once the checkpoint is deleted, retention removes the version's files
    assert owner.client().delete(f"/v1/sandbox_snapshots/{checkpoint['id']}").status_code == 204
    sweeps.sweep_run("retention")
    assert TemplateVersion.objects.get(pk=version.pk).artifact_dir == ""
    assert not Path(version.artifact_dir).exists()


@pytest.mark.django_db(transaction=True)
def test_volumes_are_not_in_a_checkpoint_and_not_inherited(owner: Actor, base_version, vm_cleanup) -> None:
    source = _create(owner, volume_mounts={"/data": "shared"})
    _run(source, "echo on-volume > /data/v.txt && echo on-root > /root/r.txt")

    checkpoint = _checkpoint(owner, source)
    restored = owner.client().post(
        f"/v1/sandboxes/{source}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
    )

    assert restored.status_code == 201, restored.content
    body = restored.json()["sandbox"]
    assert body["volume_mounts"] == []
    assert _run(body["id"], "cat /root/r.txt; ls -A /data | wc -l") == "on-root\n0\n"
    # the source still holds its volume, with its file
    assert _run(source, "cat /data/v.txt") == "on-volume\n"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_thirty_rounds_of_checkpoint_and_restore_lose_nothing(owner: Actor, base_version, vm_cleanup) -> None:
    rounds = 30
    current = _create(owner)
    for round_ in range(rounds):
        _run(
            current,
            f"mkdir -p /data && head -c {8192 + round_ * 4096} /dev/urandom > /data/f{round_} && "
            f"sha256sum /data/f{round_} >> /data/SUMS",
        )
        checkpoint = _checkpoint(owner, current, name=f"round-{round_}")
        restored = owner.client().post(
            f"/v1/sandboxes/{current}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
        )
        assert restored.status_code == 201, restored.content
        owner.client().delete(f"/v1/sandboxes/{current}")
        owner.client().delete(f"/v1/sandbox_snapshots/{checkpoint['id']}")
        current = restored.json()["sandbox"]["id"]
        checked = _run(current, "sha256sum -c /data/SUMS")
        assert checked.count(": OK") == round_ + 1, checked
    assert len(vm_cleanup.list_domains(VM_TEST_PREFIX)) == 1
    assert not Checkpoint.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_checkpoint_taken_while_the_sandbox_is_destroyed_leaves_nothing_behind(
    owner: Actor, base_version, vm_cleanup
) -> None:
    source = _create(owner)
    _run(source, "head -c 50000000 /dev/urandom > /root/big")
    outcome: dict[str, object] = {}

    def capture() -> None:
        outcome["response"] = owner.client().post(f"/v1/sandboxes/{source}/checkpoints", {}, format="json")

    worker = threading.Thread(target=capture)
    worker.start()
    wait_until(lambda: Sandbox.objects.get(pk=source).state == S.CHECKPOINTING, 30, "the capture to start")
    services.sandbox_destroy(sandbox=Sandbox.objects.get(pk=source))
    worker.join(60)

    status = outcome["response"].status_code  # type: ignore[attr-defined]
    assert status in (201, 404), outcome["response"].content  # type: ignore[attr-defined]
    assert Sandbox.objects.get(pk=source).state == S.DESTROYED
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []
    # its disk went with it, whether the capture had merged its layer back or not
    assert not (vm_cleanup.state_dir / f"{VM_TEST_PREFIX}{source}.qcow2").exists()
    for checkpoint in Checkpoint.objects.all():
        assert checkpoint.status in ("ready", "failed")
        assert checkpoint.path.exists() == (checkpoint.status == "ready")


@pytest.mark.django_db(transaction=True)
def test_a_checkpoint_with_memory_restores_running_processes(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:
    # given a sandbox with a process counting and a note in memory only (tmpfs)
    source = _create(owner)
    _run(
        source,
        "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/counter; sleep 0.05; done' "
        ">/dev/null 2>&1 & echo $! > /dev/shm/pid; echo in-memory-only > /dev/shm/note",
    )

    # when it is checkpointed with its memory and restored
    checkpoint = _checkpoint(owner, source, include_memory=True, name="warm")
    restored = owner.client().post(
        f"/v1/sandboxes/{source}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
    )

    # then the copy runs the same process, counting on, with the note, under a new identity
    assert checkpoint["include_memory"] is True and checkpoint["size_bytes"] > 10 * 2**20
    assert restored.status_code == 201, restored.content
    copy = restored.json()["sandbox"]["id"]
    pid = _run(copy, "cat /dev/shm/pid").strip()
    assert _run(copy, f"kill -0 {pid} && cat /dev/shm/note") == "in-memory-only\n"
    first = int(_run(copy, "cat /root/counter"))
    assert int(_run(copy, "sleep 0.5; cat /root/counter")) > first
    assert _run(copy, "hostname") != _run(source, "hostname")
    copy_row, source_row = Sandbox.objects.get(pk=copy), Sandbox.objects.get(pk=source)
    assert vm.agent_client(copy_row).secret != vm.agent_client(source_row).secret
    # and the source carries on too, its process alive
    assert _run(source, f"kill -0 {pid} && echo alive") == "alive\n"
    # a memory checkpoint restores at its own shape only
    bigger = owner.client().post(
        "/v1/sandboxes",
        {
            "snapshot_id": checkpoint["id"],
            "memory_mb": base_version.memory_mb + settings.SANDBOX_MEMORY_INCREMENT_MB,
        },
        format="json",
    )
    assert bigger.status_code == 422 and bigger.json()["error"] == "invalid_resources", bigger.content
    # and a sandbox holding volumes cannot be checkpointed with its memory
    holder = _create(owner, volume_mounts={"/data": "mem"})
    refused = owner.client().post(
        f"/v1/sandboxes/{holder}/checkpoints", {"include_memory": True}, format="json"
    )
    assert refused.status_code == 422 and refused.json()["error"] == "checkpoint_memory_with_volumes"


@pytest.mark.django_db(transaction=True)
def test_a_restore_destroyed_while_it_boots_is_a_404_and_leaves_nothing(
    owner: Actor, base_version, vm_cleanup
) -> None:
    source = _create(owner)
    checkpoint = _checkpoint(owner, source, quiesce_mode="crash")
    outcome: dict[str, object] = {}

    def restore() -> None:
        outcome["response"] = owner.client().post(
            f"/v1/sandboxes/{source}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
        )

    worker = threading.Thread(target=restore)
    worker.start()
    booting = wait_until(
        lambda: Sandbox.objects.filter(restored_from_id=checkpoint["id"], state=S.RESTORING).first(),
        60,
        "the restore to start",
    )
    services.sandbox_destroy(sandbox=booting)
    worker.join(120)

    response = outcome["response"]
    assert response.status_code == 404, response.content  # type: ignore[attr-defined]
    assert "destroyed" in response.json()["message"]  # type: ignore[attr-defined]
    assert Sandbox.objects.get(pk=booting.pk).state == S.DESTROYED
    assert vm.driver_for(booting.placed_host).domain_status(booting.vm_name) == "absent"
    assert not (vm.driver_for(booting.placed_host).state_dir / f"{booting.vm_name}.qcow2").exists()


@pytest.mark.django_db(transaction=True)
def test_a_guest_frozen_by_itself_takes_and_restores_a_memory_checkpoint(
    owner: Actor, base_version, vm_cleanup
) -> None:
    # given a guest that froze its own root filesystem
    source = _create(owner)
    _run(source, "echo before > /root/before.txt && sync && fsfreeze -f /")

    # when it is checkpointed with its memory (no freeze needed) and restored
    checkpoint = _checkpoint(owner, source, include_memory=True)
    restored = owner.client().post(
        f"/v1/sandboxes/{source}/restore", {"checkpoint_id": checkpoint["id"]}, format="json"
    )

    # then both run, still frozen as the guest left them, and both thaw when asked
    assert restored.status_code == 201, restored.content
    copy = restored.json()["sandbox"]["id"]
    for sandbox_id in (source, copy):
        assert _run(sandbox_id, "fsfreeze -u / && echo after > /root/after.txt && cat /root/before.txt") == (
            "before\n"
        )
    # and a disk checkpoint of a frozen guest is a clear 409
    _run(source, "fsfreeze -f /")
    frozen = owner.client().post(f"/v1/sandboxes/{source}/checkpoints", {}, format="json")
    assert frozen.status_code == 409 and frozen.json()["error"] == "checkpoint_freeze_failed", frozen.content
    _run(source, "fsfreeze -u /")

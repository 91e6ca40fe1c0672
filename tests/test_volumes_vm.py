"""Volumes on real VMs: the SDK end to end, one holder at a time under concurrency,
release on every way a sandbox ends, and durability across pause/resume cycles."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from sandboxes import services, sweeps
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime import vm
from tests.conftest import VM_TEST_PREFIX, Actor, concurrently
from tests.sdk import run_scenario
from volumes.models import Volume

pytestmark = pytest.mark.vm
S = SandboxState


@pytest.fixture(autouse=True)
def _small_volumes(settings):  # type: ignore[no-untyped-def]
    settings.VOLUME_SIZE_GIB = 2


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _run(sandbox_id: int, command: str) -> str:
    result = vm.agent_client(Sandbox.objects.get(pk=sandbox_id)).exec(command, timeout=60)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def _create(actor: Actor, mounts: object, **body: object):  # type: ignore[no-untyped-def]
    return actor.client().post("/v1/sandboxes", {"volume_mounts": mounts, **body}, format="json")


@pytest.mark.django_db(transaction=True)
def test_sdk_drives_volumes(edge, owner: Actor, base_version, vm_cleanup, settings) -> None:
    settings.VOLUME_SIZE_GIB = 10  # the platform baseline the scenario checks

    output = run_scenario("volumes", api_url=f"{edge.url}/v1", api_key=owner.write_key)

    assert output == "ok\n"
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []
    assert not Volume.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_creates_mounting_one_volume_at_once_one_wins(
    require_postgres, owner: Actor, base_version, vm_cleanup
) -> None:
    def send():  # type: ignore[no-untyped-def]
        response = _client(owner.write_key).post(
            "/v1/sandboxes", {"volume_mounts": {"/data": "shared"}}, format="json"
        )
        return response.status_code, response.json()

    results = concurrently(2, send)

    statuses = sorted(status for status, _ in results)
    assert statuses == [201, 409], results
    winner = next(body for status, body in results if status == 201)["sandbox"]["id"]
    loser = next(body for status, body in results if status == 409)
    assert loser["error"] == "volume_in_use" and str(winner) in loser["message"]
    assert Volume.objects.count() == 1  # auto-created once, not twice
    assert Volume.objects.get().holder_id == int(winner)
    assert len(vm_cleanup.list_domains(VM_TEST_PREFIX)) == 1


@pytest.mark.django_db(transaction=True)
def test_every_way_a_sandbox_ends_releases_its_volumes(owner: Actor, base_version, vm_cleanup) -> None:
    # destroy
    first = _create(owner, {"/v": "ends"})
    assert first.status_code == 201, first.content
    _run(first.json()["sandbox"]["id"], "echo 1 > /v/destroy.txt")
    owner.client().delete(f"/v1/sandboxes/{first.json()['sandbox']['id']}")
    assert Volume.objects.get().holder_id is None

    # expiry (on_timeout kill), by the deadline sweep
    second = _create(owner, {"/v": "ends"}, timeout=30).json()["sandbox"]["id"]
    _run(second, "echo 2 > /v/expired.txt")
    Sandbox.objects.filter(pk=second).update(deadline_at="2000-01-01T00:00:00Z")
    sweeps.deadline_sweep()
    assert Sandbox.objects.get(pk=second).state == S.EXPIRED
    assert Volume.objects.get().holder_id is None

    # lost (the VM went away without us): the volumes sweep releases it
    third = _create(owner, {"/v": "ends"}).json()["sandbox"]["id"]
    sandbox = Sandbox.objects.get(pk=third)
    _run(third, "echo 3 > /v/lost.txt && sync")
    services.sandbox_transition(sandbox=sandbox, from_states=[S.READY], to_state=S.LOST, reason="test")
    vm.forget(sandbox)
    assert Volume.objects.get().holder_id == third
    assert sweeps.sweep_run("volumes")["released"] == 1

    # a start that fails (the image is not a filesystem any more) leaves no VM and no holder
    fourth = _create(owner, {"/v": "ends"}).json()["sandbox"]["id"]
    assert _run(fourth, "cat /v/destroy.txt /v/expired.txt /v/lost.txt") == "1\n2\n3\n"
    owner.client().delete(f"/v1/sandboxes/{fourth}")
    assert owner.client().post("/v1/volumes", {"name": "broken"}, format="json").status_code == 201
    with open(Volume.objects.get(name="broken").image_path, "r+b") as image:  # wipe the superblock
        image.seek(1024)
        image.write(b"\0" * 1024)
    # a mount path through a symlink of the image (Debian's /var/run -> /run) is refused
    through = _create(owner, {"/var/run/v": "ends"})
    assert through.status_code == 422 and through.json()["error"] == "invalid_path", through.content
    assert "symbolic link" in through.json()["message"]
    assert Volume.objects.get(name="ends").holder_id is None
    failed = _create(owner, {"/v": "broken"})
    assert failed.status_code == 503, failed.content
    assert "could not mount" in failed.json()["message"]
    assert Volume.objects.get(name="broken").holder_id is None
    assert Volume.objects.get(name="ends").holder_id is None
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_files_survive_fifty_pause_resume_cycles_and_a_remount(
    owner: Actor, base_version, vm_cleanup
) -> None:
    created = _create(owner, {"/data": "durable"})
    assert created.status_code == 201, created.content
    sandbox_id = created.json()["sandbox"]["id"]
    cycles = 50
    for cycle in range(cycles):
        # a file of pseudo-random bytes per cycle, its checksum kept on the volume too
        _run(
            sandbox_id,
            f"head -c {4096 + cycle * 1000} /dev/urandom > /data/f{cycle} && "
            f"sha256sum /data/f{cycle} >> /data/SUMS",
        )
        sandbox = Sandbox.objects.get(pk=sandbox_id)
        services.sandbox_pause(sandbox=sandbox)
        services.sandbox_resume(sandbox=Sandbox.objects.get(pk=sandbox_id))
    expected = _run(sandbox_id, "cat /data/SUMS")
    owner.client().delete(f"/v1/sandboxes/{sandbox_id}")

    again = _create(owner, {"/mnt/again": "durable"}).json()["sandbox"]["id"]
    checked = _run(again, "cd / && sed 's# /data/# /mnt/again/#' /mnt/again/SUMS | sha256sum -c -")
    assert checked.count(": OK") == cycles, checked
    assert len(expected.splitlines()) == cycles

"""Checkpoints through the API on the fake runtime (tests/fake_driver.py): both route
families, bodies, states, isolation, quota, retention and restore's refusals. Captures
here are `crash` mode (the fake has no guest to freeze); the VM tests cover the guest."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone

from sandboxes import services, sweeps
from sandboxes.checkpoints import checkpoints_retention
from sandboxes.models import Checkpoint, CheckpointStatus, Sandbox, SandboxEvent, SandboxState
from sandboxes.runtime.agent_client import AgentClient, AgentError
from sandboxes.runtime.driver import free_tcp_port
from sandboxes.runtime.lifecycle import sandbox_spec
from templates_app.models import Template, TemplateVersion, VersionStatus
from tests.conftest import Actor
from tests.factories import SandboxFactory
from tests.fake_driver import FakeDriver
from watasu import crypto

pytestmark = pytest.mark.django_db
S = SandboxState
CRASH = {"quiesce_mode": "crash"}


@pytest.fixture
def running(owner: Actor, local_host, base_version_row, fake_driver: FakeDriver) -> Sandbox:
    """A ready sandbox whose (fake) VM runs on a disk holding some bytes."""
    sandbox = SandboxFactory(
        team=owner.personal_team,
        host=local_host,
        template_version=base_version_row,
        template=base_version_row.template,
        metadata={"role": "source"},
        agent_port=free_tcp_port(),  # nothing listens: the fake VM has no guest agent
        agent_secret_encrypted=crypto.encrypt_text("s" * 32),
    )
    spec = sandbox_spec(
        sandbox.vm_name,
        fake_driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=Path("/vmlinuz"),
        initrd=Path("/initrd.img"),
        cmdline="",
        backing=Path("/base.qcow2"),
    )
    fake_driver.boot(spec)
    spec.disk_path.write_bytes(b"root disk bytes")
    return sandbox  # type: ignore[no-any-return]


def _take(actor: Actor, sandbox: Sandbox, route: str = "snapshots", **body: object):  # type: ignore[no-untyped-def]
    return actor.client().post(f"/v1/sandboxes/{sandbox.pk}/{route}", {**CRASH, **body}, format="json")


def test_both_route_families_create_list_and_delete(
    owner: Actor, running: Sandbox, fake_driver: FakeDriver, django_capture_on_commit_callbacks
) -> None:
    # when two checkpoints are taken, one per route family and body shape
    flat = _take(owner, running, name="first", metadata={"n": 1})
    enveloped = owner.client().post(
        f"/v1/sandboxes/{running.pk}/checkpoints",
        {"sandbox_checkpoint": {"name": "second", "quiesce_mode": "crash"}},
        format="json",
    )

    # then both are ready copies of the disk, and the sandbox went through checkpointing
    assert flat.status_code == enveloped.status_code == 201, (flat.content, enveloped.content)
    first, second = flat.json()["sandbox_checkpoint"], enveloped.json()["sandbox_checkpoint"]
    assert (first["name"], first["status"], first["local_state"], first["quiesce_mode"]) == (
        "first",
        "ready",
        "present",
        "crash",
    )
    assert first["metadata"] == {"n": "1"} and first["sandbox_id"] == running.pk
    assert first["size_bytes"] > 0 and first["expires_at"] is None
    assert Checkpoint.objects.get(pk=first["id"]).path.read_bytes() == b"root disk bytes"
    running.refresh_from_db()
    assert running.state == S.READY
    assert list(SandboxEvent.objects.filter(sandbox=running).values_list("to_state", flat=True)) == [
        S.CHECKPOINTING,
        S.READY,
        S.CHECKPOINTING,
        S.READY,
    ]
    # the VM writes to its own disk again, all its bytes in it
    assert (
        fake_driver.domains[running.vm_name].disk_path == fake_driver.state_dir / f"{running.vm_name}.qcow2"
    )

    client = owner.client()
    ids = [second["id"], first["id"]]
    assert [c["id"] for c in client.get(f"/v1/sandboxes/{running.pk}/snapshots").json()["snapshots"]] == ids
    scoped = client.get(f"/v1/sandboxes/{running.pk}/checkpoints").json()
    assert [c["id"] for c in scoped["sandbox_checkpoints"]] == ids
    page = client.get(f"/v1/sandbox_snapshots?sandbox_id={running.pk}&limit=1").json()
    assert [c["id"] for c in page["snapshots"]] == [second["id"]] and page["next_token"]
    rest = client.get(f"/v1/sandbox_snapshots?sandbox_id={running.pk}&next_token={page['next_token']}").json()
    assert [c["id"] for c in rest["snapshots"]] == [first["id"]] and rest["next_token"] is None
    assert client.get("/v1/sandbox_snapshots?sandbox_id=nope").json()["snapshots"] == []
    assert client.get(f"/v1/sandbox_snapshots/{first['id']}").json()["sandbox_checkpoint"]["name"] == "first"
    scoped_one = client.get(f"/v1/sandboxes/{running.pk}/snapshots/{first['id']}").json()
    assert scoped_one["sandbox_checkpoint"]["id"] == first["id"]

    # and deleting frees the storage, on either route, once
    path = Checkpoint.objects.get(pk=first["id"]).path
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/v1/sandboxes/{running.pk}/checkpoints/{first['id']}").status_code == 204
    assert not path.exists()
    assert client.delete(f"/v1/sandbox_snapshots/{first['id']}").status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/v1/sandbox_snapshots/{second['id']}").status_code == 204
    for malformed in ("abc", "0", "-1", "1.5", "%20", "99999999999999999999999"):
        assert client.delete(f"/v1/sandbox_snapshots/{malformed}").status_code == 404, malformed


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"quiesce_mode": "memory"}, "quiesce_mode"),
        ({"quiesce_mode": "crash", "expires_at": "2001-01-01T00:00:00Z"}, "in the future"),
        ({"quiesce_mode": "crash", "expires_at": "2099-01-01T00:00:00"}, "with a zone"),
        ({"quiesce_mode": "crash", "expires_at": "tomorrow"}, "expires_at"),
        ({"quiesce_mode": "crash", "nmae": "x"}, "nmae"),
        ({"quiesce_mode": "crash", "metadata": ["x"]}, "metadata must be an object"),
        ({"quiesce_mode": "crash", "name": "a\nb"}, "name"),
        ({"quiesce_mode": "crash", "name": "x" * 201}, "name"),
        ({"sandbox_checkpoint": "x"}, "must be an object"),
        ({"include_memory": "yes"}, "include_memory must be true or false"),
    ],
)
def test_bad_bodies_are_422_and_take_nothing(owner: Actor, running: Sandbox, body: dict, words: str) -> None:  # type: ignore[type-arg]
    response = owner.client().post(f"/v1/sandboxes/{running.pk}/snapshots", body, format="json")

    assert response.status_code == 422, response.content
    assert words in response.json()["message"], response.json()
    assert not Checkpoint.objects.exists()
    running.refresh_from_db()
    assert running.state == S.READY


def test_an_expiry_in_the_future_is_kept_and_honoured(
    owner: Actor, running: Sandbox, django_capture_on_commit_callbacks
) -> None:
    soon = (timezone.now() + timedelta(hours=1)).isoformat()
    taken = _take(owner, running, expires_at=soon).json()["sandbox_checkpoint"]
    assert taken["expires_at"] is not None
    checkpoint = Checkpoint.objects.get(pk=taken["id"])

    # once past its expiry it is gone for its users at once, and its file with the sweep
    Checkpoint.objects.filter(pk=checkpoint.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert owner.client().get("/v1/sandbox_snapshots").json()["snapshots"] == []
    assert owner.client().get(f"/v1/sandbox_snapshots/{checkpoint.pk}").status_code == 404
    assert checkpoint.path.exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert checkpoints_retention(timezone.now())["checkpoints_removed"] == 1
    assert not checkpoint.path.exists() and not Checkpoint.objects.exists()


def test_only_a_ready_sandbox_can_be_checkpointed(owner: Actor, running: Sandbox) -> None:
    for state, code in ((S.STOPPED, "sandbox_not_running"), (S.CREATING, "sandbox_busy")):
        Sandbox.objects.filter(pk=running.pk).update(state=state)
        response = _take(owner, running)
        assert response.status_code == 409, response.content
        assert response.json()["error"] == code
    Sandbox.objects.filter(pk=running.pk).update(state=S.DESTROYED)
    gone = _take(owner, running)
    assert gone.status_code == 404 and "destroyed" in gone.json()["message"]
    assert not Checkpoint.objects.exists()


def test_a_checkpointing_sandbox_refuses_pause_and_answers_connect_after(
    owner: Actor, running: Sandbox
) -> None:
    Sandbox.objects.filter(pk=running.pk).update(state=S.CHECKPOINTING)
    paused = owner.client().post(f"/v1/sandboxes/{running.pk}/pause")
    assert paused.status_code == 409 and paused.json()["error"] == "sandbox_busy"
    again = _take(owner, running)
    assert again.status_code == 409 and again.json()["error"] == "sandbox_busy"


def test_other_teams_and_read_keys(
    owner: Actor, outsider: Actor, viewer: Actor, running: Sandbox, acme, local_host, base_version_row
) -> None:
    taken = _take(owner, running).json()["sandbox_checkpoint"]
    sid = taken["id"]

    # another team sees nothing and can do nothing: every route is a 404
    other = outsider.client()
    assert other.get("/v1/sandbox_snapshots").json()["snapshots"] == []
    assert other.get(f"/v1/sandbox_snapshots?sandbox_id={running.pk}").json()["snapshots"] == []
    assert other.get(f"/v1/sandbox_snapshots/{sid}").status_code == 404
    assert other.delete(f"/v1/sandbox_snapshots/{sid}").status_code == 404
    assert other.post(f"/v1/sandboxes/{running.pk}/snapshots", CRASH, format="json").status_code == 404
    assert other.get(f"/v1/sandboxes/{running.pk}/checkpoints").status_code == 404
    assert other.delete(f"/v1/sandboxes/{running.pk}/checkpoints/{sid}").status_code == 404
    restore = other.post(f"/v1/sandboxes/{running.pk}/restore", {"checkpoint_id": sid}, format="json")
    assert restore.status_code == 404
    by_id = other.post("/v1/sandboxes", {"snapshot_id": str(sid)}, format="json")
    assert by_id.status_code == 422 and by_id.json()["error"] == "template_not_found", by_id.content

    # a read key lists, never writes
    reader = owner.client(scope="read")
    assert [c["id"] for c in reader.get("/v1/sandbox_snapshots").json()["snapshots"]] == [sid]
    assert reader.post(f"/v1/sandboxes/{running.pk}/snapshots", CRASH, format="json").status_code == 403
    assert reader.delete(f"/v1/sandbox_snapshots/{sid}").status_code == 403
    assert (
        reader.post(f"/v1/sandboxes/{running.pk}/restore", {"checkpoint_id": sid}, format="json").status_code
        == 403
    )

    # a viewer of a team sees its checkpoints and changes nothing
    shared = SandboxFactory(team=acme, host=local_host, template_version=base_version_row)
    Checkpoint.objects.create(
        team=acme,
        sandbox=shared,
        template_version=base_version_row,
        host=local_host,
        cpu_count=1,
        memory_mb=512,
    )
    team_sid = Checkpoint.objects.get(team=acme).pk
    assert [c["id"] for c in viewer.client().get("/v1/sandbox_snapshots").json()["snapshots"]] == [team_sid]
    assert viewer.client().delete(f"/v1/sandbox_snapshots/{team_sid}").status_code == 403
    assert Checkpoint.objects.count() == 2


def test_a_guest_that_does_not_answer_fails_the_checkpoint_cleanly(
    owner: Actor, running: Sandbox, fake_driver: FakeDriver, settings
) -> None:
    settings.CHECKPOINT_FREEZE_SECONDS = 1
    # the fake VM has no agent: a guest-mode freeze cannot be asked for
    response = owner.client().post(f"/v1/sandboxes/{running.pk}/snapshots", {}, format="json")

    # then the answer says why, nothing is kept, and the sandbox is ready on one disk layer
    assert response.status_code == 503, response.content
    assert response.json()["error"] == "checkpoint_failed"
    assert not Checkpoint.objects.exists()
    assert not list((Path(running.host.data_dir) / "checkpoints").iterdir())
    running.refresh_from_db()
    assert running.state == S.READY
    assert fake_driver.domains[running.vm_name].chain == []
    assert owner.client().get("/v1/sandbox_snapshots").json()["snapshots"] == []


def test_a_guest_that_refuses_the_freeze_is_a_409(owner: Actor, running: Sandbox, monkeypatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AgentError(
            409, {"error": "freeze_failed", "message": "cannot freeze /: Device or resource busy"}
        )

    monkeypatch.setattr(AgentClient, "request", refuse)

    response = owner.client().post(f"/v1/sandboxes/{running.pk}/snapshots", {}, format="json")

    assert response.status_code == 409, response.content
    assert response.json()["error"] == "checkpoint_freeze_failed"
    assert "fsfreeze -u /" in response.json()["message"] and "busy" in response.json()["message"]
    assert not Checkpoint.objects.exists()
    running.refresh_from_db()
    assert running.state == S.READY


def test_the_team_quota(owner: Actor, running: Sandbox, settings) -> None:
    settings.CHECKPOINT_MAX_PER_TEAM = 2
    assert _take(owner, running).status_code == 201
    assert (
        _take(owner, running, expires_at=(timezone.now() + timedelta(hours=1)).isoformat()).status_code == 201
    )

    third = _take(owner, running)

    assert third.status_code == 422 and third.json()["error"] == "checkpoint_quota_exceeded", third.content
    assert Checkpoint.objects.count() == 2
    running.refresh_from_db()
    assert running.state == S.READY
    # an expired checkpoint (gone for its users) no longer counts, before any sweep
    Checkpoint.objects.filter(expires_at__isnull=False).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert _take(owner, running).status_code == 201


def test_the_team_quota_in_bytes_and_the_hosts_free_disk(owner: Actor, running: Sandbox, settings) -> None:
    settings.CHECKPOINT_MAX_TOTAL_GIB = 1
    taken = _take(owner, running).json()["sandbox_checkpoint"]
    Checkpoint.objects.filter(pk=taken["id"]).update(size_bytes=2**30 - 10)  # the team holds 1 GiB

    over = _take(owner, running)

    assert over.status_code == 422 and over.json()["error"] == "checkpoint_quota_exceeded", over.content
    assert "WATASU_CHECKPOINT_MAX_TOTAL_GIB" in over.json()["message"]
    # a host whose disk would fall under the reserve refuses captures and restores' copies
    settings.CHECKPOINT_MAX_TOTAL_GIB = 100
    settings.HOST_MIN_FREE_GIB = 10**6
    full = _take(owner, running)
    assert full.status_code == 507 and full.json()["error"] == "not_enough_space", full.content
    restore = owner.client().post(
        f"/v1/sandboxes/{running.pk}/restore", {"checkpoint_id": taken["id"]}, format="json"
    )
    assert restore.status_code == 507, restore.content
    assert Checkpoint.objects.count() == 1 and Sandbox.objects.count() == 1
    running.refresh_from_db()
    assert running.state == S.READY


def test_deleting_twice_at_once_is_one_204_and_one_404(owner: Actor, running: Sandbox) -> None:
    taken = _take(owner, running).json()["sandbox_checkpoint"]
    checkpoint = Checkpoint.objects.get(pk=taken["id"])
    from sandboxes.checkpoints import checkpoint_delete

    assert checkpoint_delete(checkpoint=checkpoint) is True
    assert checkpoint_delete(checkpoint=checkpoint) is False
    scoped = owner.client().get(f"/v1/sandboxes/{running.pk}/checkpoints/{taken['id']}")
    assert scoped.status_code == 404


def test_an_idempotent_retry_replays_the_checkpoint(owner: Actor, running: Sandbox) -> None:
    client = owner.client()
    first = client.post(
        f"/v1/sandboxes/{running.pk}/snapshots", CRASH, format="json", HTTP_IDEMPOTENCY_KEY="k1"
    )
    again = client.post(
        f"/v1/sandboxes/{running.pk}/snapshots", CRASH, format="json", HTTP_IDEMPOTENCY_KEY="k1"
    )

    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert Checkpoint.objects.count() == 1


def test_restore_refusals(owner: Actor, running: Sandbox, local_host, base_version_row, settings) -> None:
    taken = _take(owner, running).json()["sandbox_checkpoint"]
    client = owner.client()
    other = SandboxFactory(team=owner.personal_team, host=local_host, template_version=base_version_row)

    # the checkpoint must be the path's sandbox's
    wrong = client.post(f"/v1/sandboxes/{other.pk}/restore", {"checkpoint_id": taken["id"]}, format="json")
    assert wrong.status_code == 404 and wrong.json()["error"] == "checkpoint_not_found"
    for bad in (
        {},
        {"checkpoint_id": "abc"},
        {"checkpoint_id": taken["id"], "timeout_seconds": 0},
        {"checkpoint_id": taken["id"], "snapshot_id": taken["id"] + 1},
    ):
        response = client.post(f"/v1/sandboxes/{running.pk}/restore", bad, format="json")
        assert response.status_code == 422, (bad, response.content)
    # a pending capture is waited for, then refused if still pending
    settings.CHECKPOINT_WAIT_SECONDS = 0.3
    Checkpoint.objects.filter(pk=taken["id"]).update(status=CheckpointStatus.PENDING)
    pending = client.post(
        f"/v1/sandboxes/{running.pk}/restore", {"checkpoint_id": taken["id"]}, format="json"
    )
    assert pending.status_code == 409 and pending.json()["error"] == "checkpoint_not_ready"
    # a ready checkpoint whose file is gone
    Checkpoint.objects.filter(pk=taken["id"]).update(status=CheckpointStatus.READY)
    Checkpoint.objects.get(pk=taken["id"]).path.unlink()
    missing = client.post("/v1/sandboxes", {"snapshot_id": taken["id"]}, format="json")
    assert missing.status_code == 409 and missing.json()["error"] == "checkpoint_missing", missing.content
    # an unknown snapshot on create
    unknown = client.post("/v1/sandboxes", {"snapshot_id": "987654"}, format="json")
    assert unknown.status_code == 422 and unknown.json()["error"] == "template_not_found"
    assert Sandbox.objects.count() == 2  # no row was made for any of these


def test_a_template_string_is_a_template_first_then_a_checkpoint(
    owner: Actor, running: Sandbox, monkeypatch
) -> None:
    taken = _take(owner, running, name="named").json()["sandbox_checkpoint"]
    chosen: list[str] = []
    monkeypatch.setattr(
        services, "sandbox_restore", lambda **kw: chosen.append(f"checkpoint {kw['checkpoint'].pk}")
    )
    monkeypatch.setattr(
        services, "_launch", lambda **kw: chosen.append(f"template {kw['version'].template.slug}")
    )

    for template in (str(taken["id"]), "named"):
        services.sandbox_create(user=owner.user, spec=services.CreateSpec(template=template))
    # a team template whose slug is the checkpoint's id wins over the checkpoint
    template = Template.objects.create(team=owner.personal_team, slug=str(taken["id"]), name="digits")
    TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.READY, cpu=1, memory_mb=512, artifact_dir="/x"
    )
    services.sandbox_create(user=owner.user, spec=services.CreateSpec(template=str(taken["id"])))

    assert chosen == [f"checkpoint {taken['id']}", f"checkpoint {taken['id']}", f"template {taken['id']}"]


def test_retention_of_failed_abandoned_and_orphaned(owner: Actor, running: Sandbox, settings) -> None:
    now = timezone.now()
    old_failed = Checkpoint.objects.create(
        team=running.team,
        sandbox=running,
        template_version=running.template_version,
        host=running.host,
        cpu_count=1,
        memory_mb=512,
        status=CheckpointStatus.FAILED,
    )
    abandoned = Checkpoint.objects.create(
        team=running.team,
        sandbox=running,
        template_version=running.template_version,
        host=running.host,
        cpu_count=1,
        memory_mb=512,
    )
    abandoned.path.parent.mkdir(parents=True, exist_ok=True)
    abandoned.path.write_bytes(b"half")
    orphan = abandoned.path.parent / "12345.qcow2"
    orphan.write_bytes(b"nobody's")
    os.utime(orphan, (0, 0))  # older than the grace period
    Checkpoint.objects.filter(pk__in=[old_failed.pk, abandoned.pk]).update(created_at=now - timedelta(days=2))

    result = sweeps.sweep_run("retention", now=now)

    assert result["checkpoints_removed"] == 1 and result["checkpoints_abandoned"] == 1
    assert result["checkpoint_orphan_files"] == 1 and not orphan.exists()
    assert not Checkpoint.objects.filter(pk=old_failed.pk).exists()
    abandoned.refresh_from_db()
    assert abandoned.status == CheckpointStatus.FAILED and not abandoned.path.exists()


def test_the_admin_lists_checkpoints_and_deletes_them_with_their_files(
    admin_client, owner: Actor, running: Sandbox, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    taken = _take(owner, running, name="for-the-admin").json()["sandbox_checkpoint"]
    checkpoint = Checkpoint.objects.get(pk=taken["id"])

    page = admin_client.get("/admin/sandboxes/checkpoint/")
    detail = admin_client.get(f"/admin/sandboxes/checkpoint/{checkpoint.pk}/change/")
    with django_capture_on_commit_callbacks(execute=True):
        deleted = admin_client.post(
            "/admin/sandboxes/checkpoint/",
            {"action": "delete_checkpoints", "_selected_action": [checkpoint.pk]},
        )

    assert page.status_code == 200 and b"for-the-admin" in page.content
    assert detail.status_code == 200 and b"agent_secret" not in detail.content
    assert deleted.status_code == 302
    assert not Checkpoint.objects.exists() and not checkpoint.path.exists()
    # Django's own bulk delete (rows without files) is not offered
    assert b"delete_selected" not in page.content


@pytest.mark.django_db(transaction=True)
def test_connect_waits_for_a_restore_in_progress(owner: Actor, running: Sandbox, local_host) -> None:
    taken = _take(owner, running).json()["sandbox_checkpoint"]
    restoring = SandboxFactory(
        team=owner.personal_team,
        host=local_host,
        template_version=running.template_version,
        state=S.RESTORING,
        restored_from_id=taken["id"],
    )

    def finish() -> None:  # the restore's own process, half a second later
        Sandbox.objects.filter(pk=restoring.pk).update(state=S.READY, agent_port=1)
        connections.close_all()

    worker = threading.Timer(0.5, finish)
    worker.start()
    response = owner.client().post(f"/v1/sandboxes/{restoring.pk}/connect", {}, format="json")
    worker.join()

    assert response.status_code == 200, response.content
    assert response.json()["sandbox"]["state"] == "ready" and response.json()["session"]["token"]
    assert response.json()["sandbox"]["snapshot_id"] == taken["id"]


def test_a_restore_inherits_the_network_policy_and_its_secret_rules(owner: Actor, running: Sandbox) -> None:
    from sandboxes.api.requests import SandboxCreateSerializer

    rules = {"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer s3"}}}]}
    policy = {"allow_internet_access": False, "allow_out": ["alpha.test"], "rules": rules}
    assert owner.client().put(f"/v1/sandboxes/{running.pk}/network", policy, format="json").status_code == 200
    checkpoint = Checkpoint.objects.get(pk=_take(owner, running).json()["sandbox_checkpoint"]["id"])

    inherited = services.restore_spec(checkpoint, None)
    request = SandboxCreateSerializer(data={"allow_out": ["beta.test"], "allow_internet_access": False})
    assert request.is_valid(), request.errors
    overridden = services.restore_spec(checkpoint, request.spec())

    running.refresh_from_db()
    assert inherited.network_policy == running.network_policy
    assert inherited.network_rules == {"api.example.com": {"Authorization": "Bearer s3"}}
    assert overridden.network_policy["allow_out"] == ["beta.test"] and overridden.network_rules == {}

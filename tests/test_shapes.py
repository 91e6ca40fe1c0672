"""Shape snapshots without VMs (tests/fake_driver.py): which snapshot a shape starts from,
one make per shape however many creates ask, failures that leave nothing and back off,
makes that die midway, the operator's declared shapes and limits. tests/test_shapes_vm.py
makes and restores one for real."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from sandboxes import sweeps
from sandboxes.runtime import lifecycle, vm
from sandboxes.runtime.driver import MemorySnapshot
from templates_app import shapes
from templates_app.models import Template, TemplateVersion, VersionStatus
from templates_app.tasks import shape_snapshot_task
from tests.conftest import concurrently
from tests.waiting import wait_until
from watasu.settings.base import _shapes
from watasu.settings.env import Env

pytestmark = pytest.mark.django_db


def _snapshot_files(directory: Path, cpu: int, memory_mb: int) -> MemorySnapshot:
    """A snapshot directory laid out as make_template_snapshot leaves one (tiny files)."""
    directory.mkdir(parents=True)
    for name in (lifecycle.SAVE_FILE, lifecycle.DISK_FILE, "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"x")
    snapshot = MemorySnapshot(
        save_path=directory / lifecycle.SAVE_FILE,
        disk_path=directory / lifecycle.DISK_FILE,
        agent_secret="secret",
        vcpus=cpu,
        memory_mb=memory_mb,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline="console=ttyS0",
    )
    snapshot.write(directory / lifecycle.SNAPSHOT_FILE)
    return snapshot


@pytest.fixture
def version(fake_driver, local_host) -> TemplateVersion:  # type: ignore[no-untyped-def]
    """A ready provider version with a 1x512 snapshot on the fake host."""
    home = Path(local_host.data_dir) / "templates" / "tpl" / "v1-abcd"
    _snapshot_files(home / "snapshot", 1, 512)
    return TemplateVersion.objects.create(
        template=Template.objects.create(slug="tpl", name="tpl"),
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=local_host,
        artifact_dir=str(home / "snapshot"),
    )


@pytest.fixture
def sent(monkeypatch) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """The shape makes queued (the broker is not this test's subject)."""
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def delay(*args: int) -> None:
        with lock:
            calls.append(args)

    monkeypatch.setattr(shape_snapshot_task, "delay", delay)
    return calls


@pytest.fixture
def no_agent_wait(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A fake VM has no agent: a make fails after this short wait instead of a minute."""
    monkeypatch.setattr(lifecycle, "READY_TIMEOUT", 0.2)


def test_the_baseline_starts_from_the_versions_own_snapshot(version, sent) -> None:
    snapshot = vm.snapshot_for(version, 1, 512)

    assert snapshot is not None and snapshot.save_path == Path(version.artifact_dir) / lifecycle.SAVE_FILE
    assert sent == []


@pytest.mark.django_db(transaction=True)
def test_creates_of_a_new_shape_at_once_queue_one_make(version, sent) -> None:
    results = concurrently(6, lambda: vm.snapshot_for(TemplateVersion.objects.get(pk=version.pk), 2, 1024))

    assert results == [None] * 6  # they cold-boot
    assert sent == [(version.pk, 2, 1024)]
    assert vm.snapshot_for(version, 2, 1024) is None and len(sent) == 1  # still queued: not again
    assert shapes.summary(version) == "2x1024: queued"


def test_a_made_shape_is_what_its_creates_start_from(version, sent) -> None:
    _snapshot_files(shapes.shapes_dir(version) / "2x1024", 2, 1024)

    snapshot = vm.snapshot_for(version, 2, 1024)

    assert snapshot is not None and (snapshot.vcpus, snapshot.memory_mb) == (2, 1024)
    assert snapshot.save_path.parent == shapes.shapes_dir(version) / "2x1024"
    assert vm.snapshot_for(version, 4, 2048) is None
    assert sent == [(version.pk, 4, 2048)]
    assert shapes.summary(version).splitlines() == ["2x1024: ready (0 MiB)", "4x2048: queued"]


def test_a_failing_make_leaves_nothing_backs_off_and_gives_up(version, sent, no_agent_wait) -> None:
    assert shapes.request(version, 2, 1024)
    for attempt in range(1, shapes.MAX_ATTEMPTS + 1):
        assert shape_snapshot_task(version.pk, 2, 1024) == "failed"
        failed_at = time.time()

        # nothing half-made is left, and nothing would start from it
        directory = shapes.shapes_dir(version)
        assert not (directory / "2x1024").exists() and not (directory / "2x1024.tmp").exists()
        assert shapes.made(version, 2, 1024) is None
        state = shapes.state(version, 2, 1024)
        assert state.attempts == attempt and "not ready" in state.last_error
        # the next need waits out the back-off, which doubles
        wait = shapes.BACKOFF_SECONDS * 2 ** (attempt - 1)
        assert not shapes.request(version, 2, 1024, now=failed_at + wait - 5)
        assert shapes.request(version, 2, 1024, now=failed_at + wait + 5) == (attempt < shapes.MAX_ATTEMPTS)

    assert len(sent) == shapes.MAX_ATTEMPTS  # the first ask and one per failure but the last
    assert not shapes.request(version, 2, 1024, now=time.time() + 10**6)  # given up: it keeps cold-booting
    assert shape_snapshot_task(version.pk, 2, 1024) == "gave_up"  # a stray message too
    assert "failed 5x (given up)" in shapes.summary(version)


@pytest.mark.django_db(transaction=True)
def test_a_running_make_is_neither_queued_again_nor_reaped(version, sent, fake_driver, monkeypatch) -> None:
    monkeypatch.setattr(lifecycle, "READY_TIMEOUT", 3.0)
    outcome: list[str] = []
    maker = threading.Thread(target=lambda: outcome.append(shapes.make(version.pk, 2, 1024)))
    maker.start()
    name = shapes.vm_name(version.pk, 2, 1024)
    wait_until(lambda: fake_driver.domain_status(name) != "absent", 2, "the make's VM")

    # while it runs: no second make, and reconciliation keeps its VM
    assert shapes.making(version, 2, 1024)
    assert not shapes.request(version, 2, 1024)
    assert shapes.make(version.pk, 2, 1024) == "busy"
    sweeps.sweep_run("reconcile")
    assert fake_driver.domain_status(name) == "running"
    assert shapes.summary(version) == "2x1024: being made"

    maker.join()
    assert outcome == ["failed"] and sent == []
    assert fake_driver.domain_status(name) == "absent"


def test_a_make_that_died_midway_is_retried_by_the_next_need(version, sent) -> None:
    # given what a worker killed during a make leaves: its state says started, a half-made
    # directory, and no one holding the make lock
    directory = shapes.shapes_dir(version)
    directory.mkdir()
    (directory / "2x1024.tmp").mkdir()
    (directory / "2x1024.tmp" / lifecycle.SAVE_FILE).write_bytes(b"half")
    shapes._write(directory, "2x1024", shapes.ShapeState(started_at=time.time()))

    assert shapes.made(version, 2, 1024) is None
    assert vm.snapshot_for(version, 2, 1024) is None

    assert sent == [(version.pk, 2, 1024)]
    state = shapes.state(version, 2, 1024)
    assert state.attempts == 1 and state.last_error == "the make died midway" and state.queued_at


def test_a_make_of_a_deleted_version_does_nothing(version, sent) -> None:
    TemplateVersion.objects.filter(pk=version.pk).update(status=VersionStatus.FAILED)

    assert shapes.make(version.pk, 2, 1024) == "gone"
    assert not shapes.shapes_dir(version).exists()


def test_declared_shapes_are_queued_for_provider_versions_only(version, sent, settings, owner) -> None:
    settings.SNAPSHOT_SHAPES = [(1, 512), (2, 1024), (4, 2048)]

    assert shapes.request_declared(version) == 2  # the baseline is the version's own
    assert sorted(sent) == [(version.pk, 2, 1024), (version.pk, 4, 2048)]

    team_version = TemplateVersion.objects.create(
        template=Template.objects.create(team=owner.personal_team, slug="mine", name="mine"),
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=version.host,
        artifact_dir=version.artifact_dir,
    )
    assert shapes.request_declared(team_version) == 0


def test_on_demand_shapes_stop_at_the_limit(version, sent, settings) -> None:
    settings.SNAPSHOT_SHAPES_MAX = 1
    _snapshot_files(shapes.shapes_dir(version) / "2x1024", 2, 1024)

    assert vm.snapshot_for(version, 4, 2048) is None
    assert sent == []
    assert shapes.request(version, 4, 2048, declared=True)  # the operator's shapes still are made


def test_retention_removes_a_deleted_versions_shape_snapshots(version, sent) -> None:
    _snapshot_files(shapes.shapes_dir(version) / "2x1024", 2, 1024)
    home = Path(version.artifact_dir).parent
    TemplateVersion.objects.filter(pk=version.pk).update(deleted_at="2026-01-01T00:00:00Z")

    sweeps.sweep_run("retention")

    assert not home.exists()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", []), ("2x1024, 4X2048,2x1024", [(2, 1024), (4, 2048)])],
)
def test_declared_shapes_setting_is_parsed(raw: str, expected: list[tuple[int, int]]) -> None:
    assert _shapes(Env({"WATASU_SNAPSHOT_SHAPES": raw}).list("WATASU_SNAPSHOT_SHAPES", [])) == expected


@pytest.mark.parametrize("raw", ["2", "2x", "3x1024", "2x1000", "2x999999", "twoxfour"])
def test_declared_shapes_setting_refuses_what_no_sandbox_may_have(raw: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="WATASU_SNAPSHOT_SHAPES"):
        _shapes(Env({"WATASU_SNAPSHOT_SHAPES": raw}).list("WATASU_SNAPSHOT_SHAPES", []))


def test_the_admin_page_of_a_version_lists_its_shapes(version, sent, admin_client, no_agent_wait) -> None:
    _snapshot_files(shapes.shapes_dir(version) / "2x1024", 2, 1024)
    shapes.request(version, 4, 2048)
    shapes.make(version.pk, 4, 2048)

    page = admin_client.get(f"/admin/templates_app/templateversion/{version.pk}/change/")

    assert page.status_code == 200
    text = page.content.decode()
    assert "2x1024: ready (0 MiB)" in text and "4x2048: failed 1x: agent on port" in text

"""Service and sweep tests on the fake runtime (tests/fake_driver.py): what the platform does
with the rows when a VM's fate is given, without starting one. The contract suite
(tests/test_driver_contract.py) keeps the fake honest; the VM tests cover the real thing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from sandboxes import services, sweeps
from sandboxes.models import Sandbox, SandboxEvent, SandboxState
from templates_app.builds import build_vm_names
from templates_app.models import TemplateVersion, VersionStatus
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.factories import SandboxFactory
from tests.fake_driver import FakeDriver, fake_vm
from watasu import errors
from watasu import sweeps as registry

pytestmark = pytest.mark.django_db
S = SandboxState


def _vm(driver: FakeDriver, name: str) -> Path:
    """A running VM named ``name`` on its own disk; returns the disk."""
    return fake_vm(driver, name)


def _sandbox(owner: Actor, host, version, **fields) -> Sandbox:  # type: ignore[no-untyped-def]
    return SandboxFactory(
        team=owner.personal_team, host=host, template_version=version, template=version.template, **fields
    )


def test_destroying_a_ready_sandbox_removes_its_vm_and_disk(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a ready sandbox whose VM runs
    sandbox = _sandbox(owner, local_host, base_version_row, state=S.READY)
    disk = _vm(fake_driver, sandbox.vm_name)

    # when it is destroyed
    services.sandbox_destroy(sandbox=sandbox)

    # then its VM and disk are gone and the row says so
    sandbox.refresh_from_db()
    assert fake_driver.domain_status(sandbox.vm_name) == "absent"
    assert not disk.exists()
    assert sandbox.state == S.DESTROYED and sandbox.purged_at is not None


def test_pausing_a_ready_sandbox_saves_its_vm(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a ready sandbox whose VM runs
    sandbox = _sandbox(owner, local_host, base_version_row, state=S.READY)
    _vm(fake_driver, sandbox.vm_name)

    # when it is paused
    services.sandbox_pause(sandbox=sandbox)

    # then its memory is saved and the row is stopped
    sandbox.refresh_from_db()
    assert fake_driver.domain_status(sandbox.vm_name) == "saved"
    assert sandbox.state == S.STOPPED


def test_a_pause_the_runtime_refuses_puts_the_sandbox_back_to_ready(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver
) -> None:
    # given a ready sandbox whose VM the runtime does not know
    sandbox = _sandbox(owner, local_host, base_version_row, state=S.READY)

    # when it is paused
    with pytest.raises(errors.Unavailable) as refused:
        services.sandbox_pause(sandbox=sandbox)

    # then the caller hears why, and the sandbox is ready again with the reason recorded
    sandbox.refresh_from_db()
    assert str(refused.value).startswith(f"Sandbox {sandbox.pk} could not pause: ")
    assert sandbox.state == S.READY
    events = SandboxEvent.objects.filter(sandbox=sandbox).order_by("pk").values_list("to_state", "reason")
    assert list(events) == [(S.STOPPING, "pause"), (S.READY, "pause failed")]


def test_a_stuck_stop_whose_memory_was_saved_becomes_stopped(
    owner: Actor, local_host, base_version_row, fake_driver: FakeDriver, settings
) -> None:
    # given a sandbox left `stopping` by a process that died after its VM's memory was saved
    settings.SWEEP_STUCK_AFTER_SECONDS = 60
    sandbox = _sandbox(owner, local_host, base_version_row, state=S.STOPPING)
    _vm(fake_driver, sandbox.vm_name)
    fake_driver.pause(sandbox.vm_name)
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now() - timedelta(minutes=5))

    # when the stuck sweep runs
    result = sweeps.stuck_sweep()

    # then the sandbox is stopped, its saved memory kept for a resume
    sandbox.refresh_from_db()
    assert result["recovered"] == {S.STOPPED: 1}
    assert sandbox.state == S.STOPPED
    assert fake_driver.domain_status(sandbox.vm_name) == "saved"


def test_reconcile_keeps_the_vms_of_running_builds_and_removes_the_others(
    acme, local_host, fake_driver: FakeDriver
) -> None:  # type: ignore[no-untyped-def]
    from templates_app.models import Template

    # given VMs of a running build, of a failed build, and one under a name we never give
    template = Template.objects.create(team=acme, slug="t", name="T")
    running = TemplateVersion.objects.create(
        template=template, version="b1", cpu=1, memory_mb=512, status=VersionStatus.BUILDING
    )
    failed = TemplateVersion.objects.create(
        template=template, version="b2", cpu=1, memory_mb=512, status=VersionStatus.FAILED
    )
    kept = build_vm_names(running.pk)[0]
    for name in (kept, build_vm_names(failed.pk)[1], f"{VM_TEST_PREFIX}stray"):
        _vm(fake_driver, name)

    # when reconciliation runs
    result = sweeps.reconcile_sweep()

    # then only the running build's VM is left
    assert result["hosts"][local_host.name]["removed"] == 2
    assert fake_driver.list_domains(VM_TEST_PREFIX) == [kept]


def test_a_sweep_without_an_interval_is_refused() -> None:
    # when a sweep is registered that the beat schedule has no interval for
    with pytest.raises(ImproperlyConfigured) as refused:
        registry.register_sweep("nightly", sweeps.retention_sweep)

    # then it is refused by name and not registered
    assert str(refused.value) == "sweep 'nightly' has no interval in SWEEP_INTERVAL_SECONDS"
    assert list(registry.SWEEPS) == [
        "deadlines",
        "stuck",
        "reconcile",
        "hosts",
        "builds",
        "retention",
        "volumes",
        "billing",
        "pool",
    ]

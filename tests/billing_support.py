"""Helpers of the billing tests: a controlled clock and sandboxes moved through the services."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.utils import timezone

from sandboxes import services
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.lifecycle import sandbox_spec
from sandboxes.specs import CreateSpec, Lifecycle
from teams.models import Team, User
from templates_app.models import TemplateVersion
from tests.fake_driver import FakeDriver

S = SandboxState
DAY = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday in a closed month


@dataclasses.dataclass
class Clock:
    """What `timezone.now()` answers (the clock is the one thing billing tests control)."""

    now: datetime

    def at(self, hms: str) -> datetime:
        hours, minutes, seconds = (int(part) for part in hms.split(":"))
        self.now = DAY + timedelta(hours=hours, minutes=minutes, seconds=seconds)
        return self.now

    def after(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def clock_install(monkeypatch) -> Clock:  # type: ignore[no-untyped-def]
    clock = Clock(DAY)
    monkeypatch.setattr(timezone, "now", lambda: clock.now)
    return clock


def start(
    *,
    team: Team,
    user: User,
    version: TemplateVersion,
    driver: FakeDriver,
    cpu: int,
    memory_mb: int,
    timeout: int = 86400,
    on_timeout: str = "kill",
    clock: Clock,
    ready_after: float = 1,
) -> Sandbox:
    """What `sandbox_create` does, the VM being a fake one: reserve (creating), boot, ready."""
    spec = CreateSpec(
        team=team.slug,
        cpu_count=cpu,
        memory_mb=memory_mb,
        timeout=timeout,
        lifecycle=Lifecycle(on_timeout=on_timeout),
    )
    sandbox = services._reserve(team=team, user=user, version=version, spec=spec, volumes=[])
    vm = sandbox_spec(
        sandbox.vm_name,
        driver.state_dir,
        vcpus=cpu,
        memory_mb=memory_mb,
        kernel=Path("/vmlinuz"),
        initrd=Path("/initrd.img"),
        cmdline="",
        backing=Path("/base.qcow2"),
    )
    driver.boot(vm)
    now = clock.after(ready_after)
    assert services.sandbox_transition(
        sandbox=sandbox,
        from_states=[S.CREATING],
        to_state=S.READY,
        reason="started",
        ready_at=now,
        started_at=now,
        deadline_at=now + timedelta(seconds=timeout),
    )
    return sandbox


def resume(sandbox: Sandbox, driver: FakeDriver, clock: Clock) -> None:
    """What `sandbox_resume` does around the VM: claim (restoring), restore, ready."""
    assert services._claim_resume(sandbox)
    driver.resume(sandbox.vm_name)
    clock.after(1)
    assert services.sandbox_transition(
        sandbox=sandbox, from_states=[S.RESTORING], to_state=S.READY, reason="resumed", ready_at=clock.now
    )

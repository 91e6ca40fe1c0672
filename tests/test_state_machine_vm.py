"""The state machine's races and failures against real VMs.

- A resume whose guest agent never answers (the agent is frozen with SIGSTOP from
  inside the guest before the pause) leaves the VM saved again under a `stopped` row,
  never a running VM the database calls stopped.
- A `stopped` sandbox whose VM was started behind the platform's back is saved again
  by reconciliation.
- A timeout extended after the deadline sweep selected the sandbox keeps it alive,
  for both `on_timeout` kill and pause.
- The stuck sweep claims before it acts: a row that moved since the listing keeps its VM.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sandboxes import services, sweeps
from sandboxes.models import Sandbox, SandboxEvent, SandboxState
from sandboxes.runtime import vm
from tests.conftest import Actor
from tests.waiting import wait_until
from watasu import errors

S = SandboxState
pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]


def _create(owner: Actor, **body) -> Sandbox:  # type: ignore[no-untyped-def]
    response = owner.client().post(
        "/v1/sandboxes", {"template": "base", "timeout": 600, **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return Sandbox.objects.get(pk=response.json()["sandbox"]["id"])


def test_a_resume_whose_agent_never_answers_saves_the_vm_again(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox whose guest agent freezes itself (SIGSTOP from a child it started), then paused
    settings.RUNTIME_RESUME_TIMEOUT_SECONDS = 5
    settings.PAUSE_IN_MEMORY_SECONDS = 0  # the memory on disk (a pause held in memory: tests/test_pool_vm.py)
    sandbox = _create(owner)
    agent = vm.agent_client(sandbox)
    agent.exec(["/bin/sh", "-c", "sleep 1; kill -STOP $PPID"], background=True)
    wait_until(lambda: not agent.health(timeout=1.0), 60, "the guest agent to stop answering")
    services.sandbox_pause(sandbox=sandbox)
    assert vm_cleanup.domain_status(sandbox.vm_name) == "saved"

    # when it is resumed: the VM starts, the agent handshake never completes
    response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json")

    # then the caller hears it failed, and the VM is saved again under the stopped row
    assert response.status_code == 503, response.content
    sandbox.refresh_from_db()
    assert sandbox.state == S.STOPPED
    assert vm_cleanup.domain_status(sandbox.vm_name) == "saved"
    reasons = list(SandboxEvent.objects.filter(sandbox=sandbox).values_list("to_state", "reason"))
    assert reasons[-2:] == [(S.RESTORING, "resume"), (S.STOPPED, "resume failed; memory saved again")]


def test_a_stopped_sandbox_whose_vm_runs_is_saved_again_by_reconcile(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    # given a paused sandbox whose VM someone started from its saved memory outside the platform
    settings.PAUSE_IN_MEMORY_SECONDS = 0
    sandbox = _create(owner)
    services.sandbox_pause(sandbox=sandbox)
    vm_cleanup.resume(sandbox.vm_name)
    assert vm_cleanup.domain_status(sandbox.vm_name) == "running"
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now() - timedelta(seconds=5))

    # when reconciliation runs
    result = sweeps.reconcile_sweep()

    # then the VM is saved again and the row is still a resumable stopped sandbox
    assert result["hosts"][sandbox.host.name]["saved_again"] == 1
    sandbox.refresh_from_db()
    assert sandbox.state == S.STOPPED
    assert vm_cleanup.domain_status(sandbox.vm_name) == "saved"
    resumed = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json")
    assert resumed.status_code == 200, resumed.content
    assert vm.agent_client(Sandbox.objects.get(pk=sandbox.pk)).exec("echo up")["stdout"] == "up\n"


def test_a_timeout_extended_after_the_sweep_selected_it_wins(owner: Actor, base_version, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    # given two sandboxes past their deadlines (kill and pause), as the deadline sweep selects them
    killed, paused = _create(owner), _create(owner, lifecycle={"on_timeout": "pause"})
    selected_at = timezone.now()
    both = Sandbox.objects.filter(pk__in=[killed.pk, paused.pk])
    both.update(deadline_at=selected_at - timedelta(seconds=1))
    paused.refresh_from_db()

    # when both timeouts are extended before the sweep's transitions run
    for sandbox in (killed, paused):
        extended = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/timeout", {"timeout": 300}, format="json")
        assert extended.status_code in (200, 204), extended.content
    expired = services.sandboxes_expire(ids=[killed.pk], now=selected_at)
    with pytest.raises(errors.Conflict):
        services.sandbox_pause(sandbox=paused, reason="timeout", due_by=selected_at)

    # then neither was touched: both ready, both VMs running
    assert expired == []
    assert set(both.values_list("state", flat=True)) == {S.READY}
    assert vm_cleanup.domain_status(killed.vm_name) == vm_cleanup.domain_status(paused.vm_name) == "running"


def test_the_stuck_sweep_leaves_a_row_that_moved_since_it_was_listed(
    owner: Actor, base_version, vm_cleanup
) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox the stuck sweep listed while it was `creating`; its create then finished
    sandbox = _create(owner)
    listed = Sandbox.objects.get(pk=sandbox.pk)
    listed.state = S.CREATING
    since = timezone.now() - timedelta(seconds=300)

    # when the sweep recovers what it listed
    outcome = sweeps._recover(listed, vm.status(listed), since)

    # then its claim lost, and the ready sandbox keeps its VM
    assert outcome == "unchanged"
    assert Sandbox.objects.get(pk=sandbox.pk).state == S.READY
    assert vm_cleanup.domain_status(sandbox.vm_name) == "running"
    assert vm.agent_client(Sandbox.objects.get(pk=sandbox.pk)).exec("echo alive")["stdout"] == "alive\n"

"""Suspension end to end with real VMs, the real SDK (in this process) through the real edge,
and a real top-up through localstripe that lifts it."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from billing import services
from billing.models import Account, IntervalKind, UsageInterval
from sandboxes.models import Sandbox, SandboxEvent, SandboxState
from sandboxes.sessions import session_mint
from tests.billing_support import paid_top_up, stripe_point
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.sdk import run_scenario

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]
S = SandboxState


def test_a_suspended_team_is_paused_and_refused_until_a_top_up(
    edge, owner: Actor, base_version, vm_cleanup, settings, localstripe: str
) -> None:
    settings.BILLING_ENFORCE, settings.BILLING_GRACE_SECONDS = True, 0
    stripe_point(settings, localstripe, edge.url)
    team = owner.personal_team
    services.credit_grant(team=team, amount=Decimal("1"), reason="trial", by=None)

    def sdk(*args: str) -> str:
        return run_scenario("billing", api_url=f"{edge.url}/v1", api_key=owner.write_key, args=args).strip()

    # given a running sandbox with a file in it
    sandbox_id = sdk("start")

    # when the balance runs out (an operator's correction) and the sweep follows it
    services.credit_grant(team=team, amount=Decimal("-1.5"), reason="correction", by=None)
    assert services.accounts_enforce(now=timezone.now())["suspended"] == 1

    # then the edge refuses the data plane at once (the cache entry is dropped on
    # suspension), for a session minted before, in front of the real agent
    session = session_mint(sandbox=Sandbox.objects.get(pk=int(sandbox_id)))
    answer = httpx.get(
        f"{session.data_plane_url}/runtime/v1/files",
        params={"path": "/root/kept.txt"},
        headers={"Authorization": f"Bearer {session.token}"},
        timeout=30,
    )
    assert (answer.status_code, answer.json()["error"]) == (402, "team_suspended")
    # and the SDK cannot connect again
    assert sdk("suspended", sandbox_id) == "refused"

    # and the sweep pauses it, keeping its disk and memory
    assert services.suspended_sandboxes_pause() == (1, False)
    row = Sandbox.objects.get(pk=int(sandbox_id))
    assert row.state == S.STOPPED
    assert vm_cleanup.domain_status(row.vm_name) == "saved"

    # and a create and a resume are refused (402), reads work
    assert sdk("paused", sandbox_id) == "stopped"
    assert Sandbox.objects.filter(team=team).count() == 1

    # when the team tops up 10 € (paid at localstripe, credited by its webhook)
    paid_top_up(owner, localstripe, "10.00")

    # then the suspension is lifted at once: the paused sandbox resumes with its file, and
    # a new sandbox starts
    assert Account.objects.get(team=team).suspended_at is None
    assert sdk("lifted", sandbox_id) == "ok"

    # and the runtime it was billed for is exactly its recorded lifecycle: running from
    # its creation to its pause, and from its resume to its destroy
    events = list(SandboxEvent.objects.filter(sandbox_id=row.pk).values_list("to_state", "at"))
    boundaries = [
        at.replace(microsecond=0)
        for state, at in events
        if state in ("creating", "stopped", "restoring", "destroyed")
    ]
    intervals = UsageInterval.objects.filter(kind=IntervalKind.RUNTIME, subject_id=row.pk).order_by(
        "started_at"
    )
    assert [
        value for interval in intervals for value in (interval.started_at, interval.ended_at)
    ] == boundaries
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []

"""Helpers of the billing tests: a controlled clock and sandboxes moved through the services."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import stripe
from django.utils import timezone

from billing.models import TopUp, TopUpStatus
from sandboxes import services
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.driver import free_tcp_port
from sandboxes.runtime.lifecycle import sandbox_spec
from sandboxes.specs import CreateSpec, Lifecycle
from teams.models import Team, User
from templates_app.models import TemplateVersion
from tests.conftest import Actor
from tests.fake_driver import FakeDriver
from tests.waiting import wait_until

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


def a_metered_day(team: Team, clock: Clock) -> Clock:
    """`team`'s usage on DAY (2026-11-02), metered the next morning (the clock is left at
    2026-11-03 01:00), after 1 € of credit: sandbox 7 (2 vCPU, 1 GiB) 00:00-02:00, sandbox 8
    (1 vCPU, 512 MiB) 01:00-01:30 and a 1 GiB volume all day. Its day costs 0.181533:
    vCPU 0.162000, memory 0.016200, volume 0.003333 (runtime windows of 600 s)."""
    from billing import metering
    from billing import services as billing_services
    from billing.models import IntervalKind

    billing_services.credit_grant(team=team, amount=Decimal("1"), reason="trial", by=None)
    rows = [
        (IntervalKind.RUNTIME, 7, {"cpu": 2, "memory_mb": 1024}, "00:00:00", timedelta(hours=2)),
        (IntervalKind.RUNTIME, 8, {"cpu": 1, "memory_mb": 512}, "01:00:00", timedelta(hours=1, minutes=30)),
        (IntervalKind.VOLUME, 9, {"size": 2**30}, "00:00:00", timedelta(days=1)),
    ]
    for kind, subject, shape, begin, end in rows:
        metering.interval_open(team_id=team.pk, kind=kind, subject_id=subject, at=clock.at(begin), **shape)
        metering.intervals_close(kind=kind, subject_ids=[subject], at=DAY + end)
    clock.now = DAY + timedelta(days=1, hours=1)
    metering.meter_run(now=clock.now, max_windows=1000)
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


# --- Stripe: localstripe on 127.0.0.1 ---------------------------------------------------------

SECRET_KEY = "sk_test_watasu"
WEBHOOK_SECRET = "whsec_watasu_tests"


@contextlib.contextmanager
def localstripe_running() -> Iterator[str]:
    """localstripe on a free port (the `localstripe` fixture); its base URL."""
    port = free_tcp_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "localstripe", "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/js.stripe.com/v3/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="localstripe to answer")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def stripe_point(settings, base: str, server_url: str) -> None:  # type: ignore[no-untyped-def]
    """Our settings at localstripe, and localstripe's webhooks at the server under test."""
    settings.STRIPE_SECRET_KEY = SECRET_KEY
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_watasu"
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = base
    hook = httpx.post(
        f"{base}/_config/webhooks/watasu",
        data={"url": f"{server_url}/v1/billing/stripe/webhook", "secret": WEBHOOK_SECRET},
        timeout=10,
    )
    assert hook.status_code == 200, hook.text


def stripe_client(base: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        SECRET_KEY, base_addresses={"api": base}, http_client=stripe.HTTPXClient(allow_sync_methods=True)
    )


def paid_top_up(owner: Actor, base: str, amount: str = "10.00") -> TopUp:
    """A top-up through the API, paid with a test card, credited by localstripe's webhook."""
    response = owner.client().post("/v1/billing/top_ups", {"amount": amount}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["client_secret"].startswith(body["top_up"]["payment_intent_id"])
    assert body["publishable_key"] == "pk_test_watasu"
    # what Stripe's Payment Element does in the browser: attach a card, confirm
    client, intent_id = stripe_client(base), body["top_up"]["payment_intent_id"]
    client.v1.payment_intents.update(intent_id, params={"payment_method": "pm_card_visa"})
    intent = client.v1.payment_intents.confirm(intent_id)
    assert intent.status == "succeeded"
    top_up = TopUp.objects.get(pk=body["top_up"]["id"])
    wait_until(
        lambda: TopUp.objects.get(pk=top_up.pk).status == TopUpStatus.SUCCEEDED,
        timeout=60,
        what="localstripe's payment_intent.succeeded webhook to credit the top-up",
    )
    return TopUp.objects.get(pk=top_up.pk)

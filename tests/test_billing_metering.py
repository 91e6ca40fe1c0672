"""Metering on a controlled clock: the ledger against a hand-written table of the prices.

The expected figures below are worked out by hand from the documented prices (not by the
metering code): €0.000010 per vCPU-second = 10 µ€, €0.000002 per GiB-second = 2 µ€ (1 µ€
for 512 MiB), storage €0.10 per GiB-month of 30 days. Rounding: each uninterrupted period
of a subject is its exact price rounded half up to the micro-euro.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.db.models import Sum

from billing import metering, services
from billing.models import (
    Account,
    EntryKind,
    IntervalKind,
    LedgerEntry,
    MeterCursor,
    Statement,
    UsageInterval,
    UsageRecord,
)
from billing.selectors import statement_compute
from sandboxes import checkpoints, sweeps
from sandboxes import services as sandbox_services
from sandboxes.models import Checkpoint, Sandbox, SandboxState
from templates_app.models import Template, TemplateVersion, VersionStatus
from templates_app.services import template_version_delete
from tests.billing_support import DAY, clock_install, resume, start
from tests.conftest import Actor, helper_process_env
from tests.fake_driver import FakeDriver
from volumes.services import volume_create, volume_delete

pytestmark = pytest.mark.django_db
S = SandboxState
MIB = 2**20
GIB = 2**30


def storage_micros(size_bytes: int, seconds: int) -> int:
    """€0.10 per GiB-month of 30 days, in µ€, rounded half up (worked out independently)."""
    exact = Decimal(size_bytes) * seconds * Decimal("0.10") * 1_000_000 / (GIB * 30 * 86400)
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _started(owner: Actor, version, driver, clock, *, team=None, **shape):  # type: ignore[no-untyped-def]
    """A sandbox of the owner's personal team (or `team`) started on the fake runtime."""
    return start(
        team=team or owner.personal_team,
        user=owner.user,
        version=version,
        driver=driver,
        clock=clock,
        **shape,
    )


def _ledger_total(team) -> int:  # type: ignore[no-untyped-def]
    return sum(LedgerEntry.objects.filter(team=team).values_list("amount_micros", flat=True))


@pytest.fixture
def day(monkeypatch, settings, fake_driver):  # type: ignore[no-untyped-def]
    settings.BILLING_RUNTIME_WINDOW_SECONDS = 300
    settings.BILLING_STORAGE_WINDOW_SECONDS = 3600
    settings.SANDBOX_DISK_RETENTION_SECONDS = 12 * 3600
    settings.VOLUME_SIZE_GIB = 1
    return clock_install(monkeypatch)


def test_a_512_mib_one_vcpu_sandbox_for_one_second_costs_11_micro_euros(
    owner: Actor, base_version_row, fake_driver: FakeDriver, day
) -> None:
    # given a 1 vCPU / 512 MiB sandbox running exactly one second (created and ready at once)
    day.at("00:00:10")
    sandbox = _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512, ready_after=0)
    day.at("00:00:11")
    sandbox_services.sandbox_destroy(sandbox=sandbox)

    # when the meter runs after the window settled
    metering.meter_run(now=DAY + timedelta(hours=2))

    # then vCPU 10 µ€ + memory 0.5 GiB x 2 µ€ = 1 µ€, one debit of 11 µ€
    records = dict(UsageRecord.objects.values_list("line_item", "amount_micros"))
    assert records == {"vcpu": 10, "memory": 1}
    assert list(LedgerEntry.objects.filter(kind=EntryKind.USAGE).values_list("amount_micros", flat=True)) == [
        -11
    ]
    assert Account.objects.get(team=owner.personal_team).balance_micros == -11


def test_a_scripted_day_bills_exactly_the_hand_written_table(
    owner: Actor, base_version_row, local_host, fake_driver: FakeDriver, day, settings
) -> None:
    team, user = owner.personal_team, owner.user
    kwargs = {"team": team, "user": user, "version": base_version_row, "driver": fake_driver, "clock": day}

    # S1: 1 vCPU / 512 MiB, created 00:00:10, ready 00:00:11, paused 01:00:00 (stopped 01:00:02)
    # with a 64 MiB disk, resumed 03:00:00 (ready 03:00:01), destroyed 05:00:00
    day.at("00:00:10")
    s1 = start(cpu=1, memory_mb=512, **kwargs)
    day.at("01:00:00")
    disk1 = fake_driver.state_dir / f"{s1.vm_name}.qcow2"
    disk1.write_bytes(os.urandom(64 * MIB))
    disk1_bytes = disk1.stat().st_blocks * 512  # what the host's disk holds for it
    with _clock_moves_during(fake_driver, "pause", day, 2):
        sandbox_services.sandbox_pause(sandbox=s1)
    day.at("03:00:00")
    resume(s1, fake_driver, day)
    day.at("05:00:00")
    sandbox_services.sandbox_destroy(sandbox=s1)

    # S2: 2 vCPU / 1 GiB, created 02:00:00, ready 02:00:01, a 30-minute timeout (kill):
    # the deadline sweep at 02:30:06 expires it (its disk goes at once)
    day.at("02:00:00")
    s2 = start(cpu=2, memory_mb=1024, timeout=1800, **kwargs)
    day.at("02:30:06")
    sweeps.deadline_sweep(now=day.now)

    # S3: 1 vCPU / 512 MiB, created 06:00:00, ready 06:00:01; a 32 MiB checkpoint ready at
    # 07:00:00; its VM vanishes and the reconcile sweep at 08:00:00 marks it lost (a 16 MiB
    # disk kept); the retention sweep purges that disk at 20:00:01; the checkpoint is
    # deleted at 22:00:00
    day.at("06:00:00")
    s3 = start(cpu=1, memory_mb=512, **kwargs)
    day.at("07:00:00")
    checkpoint = Checkpoint.objects.create(
        team=team, sandbox=s3, template_version=base_version_row, host=local_host, cpu_count=1, memory_mb=512
    )
    assert checkpoints._mark_ready(checkpoint, 32 * MIB)
    day.at("08:00:00")
    disk3 = fake_driver.state_dir / f"{s3.vm_name}.qcow2"
    disk3.write_bytes(os.urandom(16 * MIB))
    kept3 = disk3.stat().st_blocks * 512  # what the host's disk holds for it
    fake_driver.domains.pop(s3.vm_name)
    sweeps.reconcile_sweep(now=day.now)
    assert Sandbox.objects.get(pk=s3.pk).state == S.LOST
    day.at("20:00:01")  # retention: kept more than 12 h
    sweeps.retention_sweep(now=day.now)
    assert Sandbox.objects.get(pk=s3.pk).purged_at is not None
    day.at("22:00:00")
    assert checkpoints.checkpoint_delete(checkpoint=checkpoint)

    # a volume (1 GiB) from 04:00:00 to 23:00:00
    day.at("04:00:00")
    volume = volume_create(user=user, name="data")
    day.at("23:00:00")
    volume_delete(volume=volume)

    # a 256 MiB template version of the team, ready 09:00:00, retired 12:00:00
    template = Template.objects.create(team=team, slug="mine", name="Mine")
    version = TemplateVersion.objects.create(
        template=template,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=local_host,
        artifact_dir="/nonexistent",
        size_bytes=256 * MIB,
    )
    day.at("09:00:00")
    metering.template_versions_ready(versions=[(version.pk, team.pk, 256 * MIB)], at=day.now)
    day.at("12:00:00")
    template_version_delete(user=user, version=version)

    # when the meter runs an hour after the day ended (every window settled)
    result = metering.meter_run(now=DAY + timedelta(hours=25), max_windows=1000)
    assert result["more"] is False

    # then the usage is the hand-written table, line by line, to the micro-euro
    disk1_bytes = (
        Sandbox.objects.get(pk=s1.pk)
        and UsageInterval.objects.get(kind=IntervalKind.STOPPED_DISK, subject_id=s1.pk).size_bytes
    )
    assert disk1_bytes == os.stat(disk1).st_blocks * 512 if disk1.exists() else disk1_bytes > 64 * MIB - 1
    s1_runtime = (3602 - 10) + (5 * 3600 - 3 * 3600)  # created..stopped, restoring..destroyed
    s2_runtime = 1806  # 02:00:00..02:30:06
    s3_runtime = 2 * 3600  # 06:00:00..08:00:00 (checkpointing is running time)
    table = {
        "vcpu": 10 * (s1_runtime + 2 * s2_runtime + s3_runtime),
        "memory": 1 * s1_runtime + 2 * s2_runtime + 1 * s3_runtime,
        # stopped disks: S1 paused 01:00:02..03:00:00; S3 lost 08:00:00..20:00:01; S2 none
        "stopped_disk": storage_micros(disk1_bytes, 7198) + storage_micros(kept3, 12 * 3600 + 1),
        "checkpoint": storage_micros(32 * MIB, 15 * 3600),
        "volume": storage_micros(GIB, 19 * 3600),
        "template": storage_micros(256 * MIB, 3 * 3600),
    }
    billed: dict[str, int] = {}
    for item, amount in UsageRecord.objects.values_list("line_item", "amount_micros"):
        billed[item] = billed.get(item, 0) + amount
    assert billed == table
    total = sum(table.values())
    assert _ledger_total(team) == -total
    assert Account.objects.get(team=team).balance_micros == -total
    # and the November statement adds up to the ledger
    statement = statement_compute(team=team, period_start=DAY.date().replace(day=1))
    assert statement["opening_micros"] == 0 and statement["credits_micros"] == 0
    assert statement["usage_micros"] == total and statement["closing_micros"] == -total
    assert {line["line_item"]: line["amount_micros"] for line in statement["lines"]} == table
    del s2


class _clock_moves_during:
    """Advance the clock by `seconds` while the fake driver does `operation` (a pause that
    takes two seconds), so the transitions around it land where the table says."""

    def __init__(self, driver: FakeDriver, operation: str, clock, seconds: float) -> None:  # type: ignore[no-untyped-def]
        self.driver, self.operation, self.clock, self.seconds = driver, operation, clock, seconds

    def __enter__(self) -> None:
        original = getattr(self.driver, self.operation)

        def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(*args, **kwargs)
            self.clock.after(self.seconds)
            return result

        setattr(self.driver, self.operation, slow)
        self.original = original

    def __exit__(self, *exc: object) -> None:
        setattr(self.driver, self.operation, self.original)


def test_storage_over_many_windows_rounds_once_per_period(owner: Actor, day) -> None:
    # given a 10 MiB volume for 30 hours (30 storage windows of an hour, each worth 1.36 µ€:
    # rounding each window on its own would bill 30 µ€ for 40.7 µ€ of storage)
    team = owner.personal_team
    day.at("00:00:00")
    with transaction.atomic():
        metering.interval_open(
            team_id=team.pk, kind=IntervalKind.VOLUME, subject_id=4242, at=day.now, size=10 * MIB
        )
    day.at("06:00:00")
    with transaction.atomic():
        metering.interval_close(kind=IntervalKind.VOLUME, subject_id=4242, at=DAY + timedelta(hours=30))

    # when it is metered
    metering.meter_run(now=DAY + timedelta(hours=32), max_windows=100)

    # then the period's total is its exact price rounded once
    amounts = list(UsageRecord.objects.order_by("window_start").values_list("amount_micros", flat=True))
    assert len(amounts) == 30
    assert sum(amounts) == storage_micros(10 * MIB, 30 * 3600) == 41
    assert set(amounts) == {1, 2}


def test_running_the_meter_again_bills_nothing_twice(
    owner: Actor, base_version_row, fake_driver, day
) -> None:
    day.at("00:00:00")
    _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512)
    first = metering.meter_run(now=DAY + timedelta(hours=1))
    again = metering.meter_run(now=DAY + timedelta(hours=1))

    assert first["windows"] > 0 and again["windows"] == 0
    # every second from 00:00:00 to the settled edge (00:59:30, whole windows of 5 minutes)
    billed = sum(UsageRecord.objects.filter(line_item="vcpu").values_list("quantity", flat=True))
    assert billed == 55 * 60  # 00:00:00..00:55:00: the 00:55 window ends 00:60, not yet settled


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_workers_metering_at_once_bill_each_second_once(
    owner: Actor, base_version_row, fake_driver, day, require_postgres
) -> None:
    # given a sandbox running for two hours
    day.at("00:00:00")
    _started(owner, base_version_row, fake_driver, day, cpu=2, memory_mb=1024)
    results: list[dict] = []

    def run() -> None:
        try:
            results.append(metering.meter_run(now=DAY + timedelta(hours=2, minutes=1), max_windows=1000))
        finally:
            connection.close()

    # when two workers run the meter at the same moment
    workers = [threading.Thread(target=run) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    # then the windows were shared out, none billed twice: 2 h of 2 vCPU + 1 GiB
    assert sum(result["windows"] for result in results) == 24
    assert sum(UsageRecord.objects.filter(line_item="vcpu").values_list("quantity", flat=True)) == 2 * 7200
    assert _ledger_total(owner.personal_team) == -(20 + 2) * 7200


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_window_leaves_nothing_and_the_next_pass_bills_it_once(
    owner: Actor, base_version_row, fake_driver, day, require_postgres, settings
) -> None:
    # given a running sandbox and a window whose debit will wait on a balance row we lock
    day.at("00:00:00")
    _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512)
    services.accounts_ensure(team_ids=[owner.personal_team.pk])
    MeterCursor.objects.create(meter="storage", metered_until=DAY + timedelta(days=1))
    env = helper_process_env(WATASU_BILLING_RUNTIME_WINDOW_SECONDS="300", WATASU_BILLING_SETTLE_SECONDS="30")
    script = (
        "import django; django.setup();"
        "from datetime import datetime, UTC;"
        "from billing import metering;"
        f"metering.meter_run(now=datetime.fromisoformat('{(DAY + timedelta(minutes=11)).isoformat()}'))"
    )
    with transaction.atomic():
        Account.objects.select_for_update().get(team=owner.personal_team)
        worker = subprocess.Popen(
            [sys.executable, "-c", script], env=env, cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE
        )
        # when the worker has written the window's records and waits for the balance row
        _wait_for_lock_waiter(worker)
        # and is killed there
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    # then nothing of its window is left
    assert not UsageRecord.objects.exists() and not LedgerEntry.objects.filter(kind=EntryKind.USAGE).exists()

    # when the next pass runs
    metering.meter_run(now=DAY + timedelta(minutes=11))

    # then both settled windows (00:00 and 00:05) are billed once
    assert sum(UsageRecord.objects.filter(line_item="vcpu").values_list("quantity", flat=True)) == 600
    assert _ledger_total(owner.personal_team) == -11 * 600


def _wait_for_lock_waiter(worker: subprocess.Popen[bytes]) -> None:
    """Until another backend waits on a lock (the worker, blocked on the locked row)."""
    from tests.waiting import wait_until

    def waiting() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"the worker ended: {worker.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        with connection.cursor() as cursor:
            # pg_locks, not pg_stat_activity: that one is a snapshot per transaction
            cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
            return cursor.fetchone()[0] > 0

    wait_until(waiting, timeout=60, what="the meter worker to wait on the balance row")


def test_statements_close_once_per_month_and_add_up(owner: Actor, base_version_row, fake_driver, day) -> None:
    # given usage on the last day of November and a credit
    team = owner.personal_team
    day.at("10:00:00")
    day.now += timedelta(days=28)  # 2026-11-30
    sandbox = _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512, team=team)
    services.credit_grant(team=team, amount=Decimal("2.50"), reason="welcome", by=None)
    day.after(3599)
    sandbox_services.sandbox_destroy(sandbox=sandbox)

    # when December is metered and the sweep closes statements (twice)
    end = DAY.replace(month=12, day=1) + timedelta(hours=2)
    metering.meter_run(now=end, max_windows=10000)
    assert services.statements_close(now=end) == 1
    assert services.statements_close(now=end) == 0

    # then November's statement: 3600 s x 11 µ€ against 2.5 € of credit
    statement = Statement.objects.get(team=team)
    assert (statement.opening_micros, statement.credits_micros, statement.usage_micros) == (
        0,
        2_500_000,
        39_600,
    )
    assert statement.closing_micros == 2_500_000 - 39_600 == _ledger_total(team)


def test_below_the_negative_floor_usage_is_waived_not_charged(
    owner: Actor, base_version_row, fake_driver, day, settings
) -> None:
    # given enforcement with a floor of -0.01 € and a sandbox running for an hour
    settings.BILLING_ENFORCE = True
    settings.BILLING_NEGATIVE_FLOOR = Decimal("-0.01")
    team = owner.personal_team
    day.at("00:00:00")
    _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512, team=team)

    # when an hour is metered (39,600 µ€ of usage)
    metering.meter_run(now=DAY + timedelta(hours=1, minutes=1), max_windows=100)

    # then the balance stops at the floor, the usage stays visible, the rest is waived
    usage = -sum(LedgerEntry.objects.filter(kind=EntryKind.USAGE).values_list("amount_micros", flat=True))
    waived = sum(LedgerEntry.objects.filter(kind=EntryKind.WAIVER).values_list("amount_micros", flat=True))
    assert usage == 11 * 3600
    assert waived == usage - 10_000
    assert Account.objects.get(team=team).balance_micros == -10_000 == _ledger_total(team)


def test_suspension_after_the_grace_refuses_creates_pauses_sandboxes_and_a_credit_lifts_it(
    owner: Actor, base_version_row, fake_driver, day, settings, mailoutbox
) -> None:
    # given enforcement, a 60 s grace and a team with 0.01 € running a sandbox
    settings.BILLING_ENFORCE, settings.BILLING_GRACE_SECONDS = True, 60
    team = owner.personal_team
    services.credit_grant(team=team, amount=Decimal("0.01"), reason="trial", by=None)
    day.at("00:00:00")
    sandbox = _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512, team=team)

    # when the balance runs out (20 minutes x 11 µ€ a second > 10,000 µ€) and the sweep runs
    services.billing_sweep(now=DAY + timedelta(minutes=21))
    account = Account.objects.get(team=team)
    assert account.balance_micros < 0 and account.exhausted_at is not None and account.suspended_at is None
    # then within the grace nothing is refused yet; after it the team is suspended
    services.billing_sweep(now=DAY + timedelta(minutes=21, seconds=59))
    assert Account.objects.get(team=team).suspended_at is None
    services.billing_sweep(now=DAY + timedelta(minutes=22, seconds=1))
    account.refresh_from_db()
    assert account.suspended_at is not None
    sandbox.refresh_from_db()
    assert sandbox.state == S.STOPPED  # paused by the sweep: disk and memory kept
    assert any("suspended" in mail.subject for mail in mailoutbox)
    # a create is refused with 402 and says how to get going again
    response = owner.client().post("/v1/sandboxes", {"template": "base"}, format="json")
    assert response.status_code == 402, response.content
    assert response.json()["error"] == "team_suspended"
    assert "Ask your operator to credit team" in response.json()["message"]
    # resume is refused; reads and destroy still work
    assert owner.client().post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json").status_code == 402
    assert owner.client().get(f"/v1/sandboxes/{sandbox.pk}").status_code == 200
    assert owner.client().get("/v1/billing/balance").json()["balance"]["suspended"] is True

    # when an operator credits the team
    services.credit_grant(team=team, amount=Decimal("5"), reason="paid by invoice", by=None)

    # then the suspension is lifted at once
    account.refresh_from_db()
    assert account.suspended_at is None and account.exhausted_at is None
    assert owner.client().get("/v1/billing/balance").json()["balance"]["suspended"] is False
    assert owner.client().delete(f"/v1/sandboxes/{sandbox.pk}").status_code in (200, 204)


def test_the_floor_waives_usage_never_a_debt_from_refunds(
    owner: Actor, base_version_row, fake_driver, day, settings
) -> None:
    # given enforcement (floor -5 €) and a team 9.995 € in debt from a correction (as a
    # refund or a chargeback would leave it)
    settings.BILLING_ENFORCE = True
    team = owner.personal_team
    services.credit_grant(team=team, amount=Decimal("-9.995"), reason="chargeback", by=None)
    day.at("00:00:00")
    _started(owner, base_version_row, fake_driver, day, cpu=1, memory_mb=512, team=team)

    # when an hour of usage is metered below the floor
    metering.meter_run(now=DAY + timedelta(hours=1, minutes=1), max_windows=100)

    # then exactly that usage is waived, and the debt stands
    usage = -sum(LedgerEntry.objects.filter(kind=EntryKind.USAGE).values_list("amount_micros", flat=True))
    waived = sum(LedgerEntry.objects.filter(kind=EntryKind.WAIVER).values_list("amount_micros", flat=True))
    assert usage == waived == 11 * 3600
    assert Account.objects.get(team=team).balance_micros == -9_995_000 == _ledger_total(team)


def test_a_team_template_build_is_billed_for_its_vm(owner: Actor, local_host, day) -> None:
    from templates_app.builds import worker

    # given a draft version (2 vCPU, 1 GiB) of a team template
    template = Template.objects.create(team=owner.personal_team, slug="built", name="Built")
    version = TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.DRAFT, cpu=2, memory_mb=1024, host=local_host
    )

    # when its build runs from 00:10:00 and fails at 00:40:00
    day.at("00:10:00")
    assert worker.claim(version.pk) is not None
    day.at("00:40:00")
    assert worker.fail(version.pk, "step 3 failed") == 1
    metering.meter_run(now=DAY + timedelta(hours=1), max_windows=100)

    # then the build VM's 30 minutes are billed at the runtime prices
    billed = dict(
        UsageRecord.objects.values("line_item")
        .annotate(total=Sum("amount_micros"))
        .values_list("line_item", "total")
    )
    assert billed == {"build_vcpu": 2 * 10 * 1800, "build_memory": 2 * 1800}


def test_a_build_queued_before_a_suspension_does_not_run(owner: Actor, local_host) -> None:
    from templates_app.builds import worker

    template = Template.objects.create(team=owner.personal_team, slug="queued", name="Queued")
    version = TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.DRAFT, cpu=1, memory_mb=512, host=local_host
    )
    services.accounts_ensure(team_ids=[owner.personal_team.pk])
    Account.objects.filter(team=owner.personal_team).update(suspended_at=DAY)

    assert worker.claim(version.pk) is None
    version.refresh_from_db()
    assert version.status == VersionStatus.FAILED and "is suspended" in version.last_error_message
    assert not UsageInterval.objects.exists()

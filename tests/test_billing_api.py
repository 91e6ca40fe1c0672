"""The billing API: balance, usage, ledger, statements, spend alert; who may read what; and
the operator's credit in the admin."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.admin.models import LogEntry
from rest_framework.test import APIClient

from billing import metering, services
from billing.models import Account, EntryKind, IntervalKind, LedgerEntry
from tests.billing_support import DAY, clock_install
from tests.conftest import Actor, make_actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def metered(owner: Actor, acme, monkeypatch, settings):  # type: ignore[no-untyped-def]
    """acme's usage on DAY: sandbox 7 (2 vCPU, 1 GiB) 00:00-02:00, sandbox 8 (1 vCPU, 512 MiB)
    01:00-01:30, a 1 GiB volume all day; metered the next morning."""
    settings.BILLING_RUNTIME_WINDOW_SECONDS = 600
    clock = clock_install(monkeypatch)
    services.credit_grant(team=acme, amount=Decimal("1"), reason="trial", by=None)
    rows = [
        (IntervalKind.RUNTIME, 7, {"cpu": 2, "memory_mb": 1024}, "00:00:00", "02:00:00"),
        (IntervalKind.RUNTIME, 8, {"cpu": 1, "memory_mb": 512}, "01:00:00", "01:30:00"),
        (IntervalKind.VOLUME, 9, {"size": 2**30}, "00:00:00", "24:00:00"),
    ]
    for kind, subject, shape, begin, end in rows:
        metering.interval_open(team_id=acme.pk, kind=kind, subject_id=subject, at=clock.at(begin), **shape)
        metering.intervals_close(kind=kind, subject_ids=[subject], at=DAY + _span(end))
    clock.now = DAY + timedelta(days=1, hours=1)
    metering.meter_run(now=clock.now, max_windows=1000)
    return clock


def _span(hms: str) -> timedelta:
    hours, minutes, seconds = (int(part) for part in hms.split(":"))
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def test_usage_by_line_item_day_and_sandbox(owner: Actor, metered) -> None:
    client = owner.client("read")  # read keys may read billing
    span = "team=acme&from=2026-11-02&to=2026-11-03"

    by_item = client.get(f"/v1/billing/usage?{span}&group_by=line_item").json()
    assert {row["line_item"]: row["amount_micros"] for row in by_item["usage"]} == {
        "memory": 2 * 7200 + 1 * 1800,
        "vcpu": 20 * 7200 + 10 * 1800,
        "volume": 3333,  # 1 GiB for a day at 0.10 €/GiB-month: 3,333.3 µ€
    }
    assert by_item["total"]["amount_micros"] == 14400 + 1800 + 144000 + 18000 + 3333
    assert by_item["total"]["currency"] == "EUR"

    by_day = client.get(f"/v1/billing/usage?{span}&group_by=day").json()["usage"]
    assert by_day == [{"day": "2026-11-02", "amount": "0.181533", "amount_micros": 181533}]

    first = client.get(f"/v1/billing/usage?{span}&group_by=sandbox&limit=1").json()
    assert [row["sandbox_id"] for row in first["usage"]] == ["7"]
    assert first["usage"][0]["line_items"]["vcpu"]["quantity"] == 2 * 7200
    rest = client.get(
        f"/v1/billing/usage?{span}&group_by=sandbox&limit=1&next_token={first['next_token']}"
    ).json()
    assert [row["sandbox_id"] for row in rest["usage"]] == ["8"] and rest["next_token"] is None


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("group_by=week", "group_by must be one of"),
        ("from=yesterday", "from must be a date"),
        ("from=2026-11-02T00:00:00", "with a zone"),
        ("from=2026-11-03&to=2026-11-02", "to must be after from"),
        ("limit=0", "limit must be a positive integer"),
        ("group_by=sandbox&next_token=abc", "next_token"),
    ],
)
def test_bad_usage_queries_are_422(owner: Actor, query: str, words: str) -> None:
    answer = owner.client().get(f"/v1/billing/usage?{query}")
    assert answer.status_code == 422, answer.content
    assert words in answer.json()["message"]


def test_another_teams_billing_is_a_404_and_no_key_a_401(outsider: Actor, owner: Actor, acme) -> None:
    for path in ("balance", "usage", "ledger", "top_ups", "statements"):
        assert outsider.client().get(f"/v1/billing/{path}?team=acme").status_code == 404, path
        assert APIClient().get(f"/v1/billing/{path}").status_code == 401, path
        assert owner.client("read").get(f"/v1/billing/{path}").status_code == 200, path


def test_ledger_and_statements(owner: Actor, metered) -> None:
    client = owner.client()
    entries = client.get("/v1/billing/ledger?team=acme&limit=500").json()["entries"]
    assert entries[-1]["kind"] == "grant" and entries[-1]["amount"] == "1.000000"
    assert sum(entry["amount_micros"] for entry in entries) == 1_000_000 - 181533
    assert client.get("/v1/billing/balance?team=acme").json()["balance"]["balance"] == "0.818467"

    # November is closed once December's first hour is metered; the current month is open
    services.statements_close(now=metered.now)
    statements = client.get("/v1/billing/statements?team=acme").json()["statements"]
    november = client.get("/v1/billing/statements/2026-11?team=acme").json()["statement"]
    assert november["status"] == "closed" if statements[0]["period_start"] != "2026-11-01" else True
    assert november["usage"] == "0.181533" and november["credits"] == "1.000000"
    assert november["closing"] == "0.818467" and november["currency"] == "EUR"
    assert november["tax_name"] == "VAT" and november["tax_included"] == "0.000000"
    assert client.get("/v1/billing/statements/2026-13?team=acme").status_code == 404
    assert client.get("/v1/billing/statements/1999-01?team=acme").status_code == 404


def test_tax_included_in_statements(owner: Actor, metered, settings) -> None:
    settings.BILLING_TAX_RATE = Decimal("0.21")
    november = owner.client().get("/v1/billing/statements/2026-11?team=acme").json()["statement"]
    # 181,533 µ€ including 21 %: 181,533 x 0.21 / 1.21 = 31,505.6 µ€
    assert november["tax_included"] == "0.031506" and november["tax_rate"] == "0.21"


def test_spend_alert_is_the_teams_own_and_mails_once_a_month(
    owner: Actor, member: Actor, acme, metered, mailoutbox
) -> None:
    # a member or a read key may not set it; an owner may
    body = {"spend_alert": "0.10", "team": "acme"}
    assert member.client().put("/v1/billing/spend_alert", body, format="json").status_code == 403
    assert owner.client("read").put("/v1/billing/spend_alert", body, format="json").status_code == 403
    answer = owner.client().put(
        "/v1/billing/spend_alert", {"spend_alert": "0.10", "team": "acme"}, format="json"
    )
    assert answer.status_code == 200 and answer.json()["balance"]["spend_alert"] == "0.100000"
    assert (
        owner.client().put("/v1/billing/spend_alert", {"spend_alert": "-1"}, format="json").status_code == 422
    )

    # when the sweep follows the balances (twice) while November's usage (0.18 €) is past it
    services.accounts_enforce(now=metered.now)
    services.accounts_enforce(now=metered.now + timedelta(minutes=5))

    # then owners and admins get one mail
    alerts = [m for m in mailoutbox if "spend alert" in m.subject]
    assert len(alerts) == 1 and alerts[0].to == [owner.user.email]


def test_low_balance_mail_once_until_topped_up(owner: Actor, acme, metered, mailoutbox, settings) -> None:
    # (only where the balance is enforced: elsewhere a low balance suspends nothing)
    settings.BILLING_ENFORCE, settings.BILLING_LOW_BALANCE = True, Decimal("0.90")  # acme has 0.818467
    services.accounts_enforce(now=metered.now)
    services.accounts_enforce(now=metered.now)
    assert len([m for m in mailoutbox if m.subject == "Team acme: low balance"]) == 1
    assert owner.client().get("/v1/billing/balance?team=acme").json()["balance"]["low_balance"] is True
    services.credit_grant(team=acme, amount=Decimal("5"), reason="top", by=None)
    assert Account.objects.get(team=acme).low_balance_notified_at is None


def test_an_operator_grants_credit_in_the_admin_with_a_reason(acme, admin_client, admin_user) -> None:
    # a grant without a reason is refused by the form
    refused = admin_client.post(
        "/admin/billing/ledgerentry/add/", {"team": acme.pk, "amount": "5", "reason": ""}
    )
    assert refused.status_code == 200 and not LedgerEntry.objects.exists()

    # a grant with one is a ledger entry by the operator, in the admin log, on the balance
    granted = admin_client.post(
        "/admin/billing/ledgerentry/add/",
        {"team": acme.pk, "amount": "12.5", "reason": "support"},
        follow=True,
    )
    entry = LedgerEntry.objects.get(team=acme)
    assert f"grant 12500000 µ€ for {acme.pk}" in granted.content.decode()  # the message names it
    assert (entry.kind, entry.amount_micros, entry.reason, entry.created_by) == (
        EntryKind.GRANT,
        12_500_000,
        "support",
        admin_user,
    )
    assert Account.objects.get(team=acme).balance_micros == 12_500_000
    assert LogEntry.objects.filter(object_id=str(entry.pk)).exists()
    # and the ledger cannot be edited or deleted there
    assert (
        admin_client.post(f"/admin/billing/ledgerentry/{entry.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert admin_client.get("/admin/billing/account/?suspended=no").status_code == 200


def test_sandbox_limits_show_every_price(owner: Actor) -> None:
    prices = owner.client().get("/v1/sandbox_limits").json()["prices"]
    assert prices["vcpu_second"] == "0.000010" and prices["memory_gib_second"] == "0.000002"
    assert prices["checkpoint_gib_month"] == "0.10" and prices["volume_gib_month"] == "0.10"


def test_a_new_users_personal_team_gets_the_starting_credit_once(owner: Actor, settings) -> None:
    # given a starting credit of 3 €
    settings.BILLING_STARTING_CREDIT = Decimal("3.00")

    # when a new user appears (with a personal team) and creates a team
    newcomer = make_actor("newcomer@example.test")
    answer = newcomer.client().post("/v1/teams", {"slug": "fresh", "name": "Fresh"}, format="json")
    assert answer.status_code == 201

    # then the personal team has it, once; the other team starts at zero (or users would
    # farm credit by creating teams)
    personal = newcomer.client().get("/v1/billing/balance").json()["balance"]
    assert personal["balance"] == "3.000000" and personal["enforced"] is False
    assert newcomer.client().get("/v1/billing/balance?team=fresh").json()["balance"]["balance"] == "0.000000"
    assert list(LedgerEntry.objects.values_list("team__slug", "reason")) == [
        (personal["team"], "starting credit")
    ]


@pytest.mark.parametrize(
    "query",
    ["to=9999-12-31T23:59:59-23:59", "from=0001-01-01T00:00:00%2B01:00", "from=1969-12-31", "to=10000-01-01"],
)
def test_dates_out_of_range_are_422(owner: Actor, query: str) -> None:
    answer = owner.client().get(f"/v1/billing/usage?{query}")
    assert answer.status_code == 422, answer.content
    assert "between 1970 and 9998" in answer.json()["message"]


def test_a_suspended_team_reads_its_volumes_but_creates_and_writes_none(owner: Actor, acme, settings) -> None:
    from billing.models import Account
    from volumes.services import volume_create

    settings.VOLUME_SIZE_GIB = 1
    volume = volume_create(user=owner.user, name="data", team="acme")
    client = owner.client()
    assert (
        client.put(
            f"/v1/volumes/{volume.pk}/files", {"path": "/a.txt", "content_b64": "aGk="}, format="json"
        ).status_code
        == 200
    )
    Account.objects.update_or_create(team=acme, defaults={"suspended_at": DAY, "balance_micros": -1})

    refused = client.post("/v1/volumes", {"name": "more", "team": "acme"}, format="json")
    assert (refused.status_code, refused.json()["error"]) == (402, "team_suspended")
    written = client.put(
        f"/v1/volumes/{volume.pk}/files", {"path": "/b.txt", "content_b64": "aGk="}, format="json"
    )
    assert written.status_code == 402
    assert "a balance above zero lifts it, so at least 5.00 (top-ups add up)" in written.json()["message"]
    assert client.get(f"/v1/volumes/{volume.pk}/files?path=/a.txt").json()["file"]["content_b64"] == "aGk="
    assert client.delete(f"/v1/volumes/{volume.pk}").status_code in (200, 204)

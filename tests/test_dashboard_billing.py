"""The dashboard's usage & billing pages: balance, usage by day and line item on a fixed
clock, statements, ledger, top-ups (paid through localstripe), who may top up, banners."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing import metering, services
from billing.models import (
    Account,
    EntryKind,
    LedgerEntry,
    LineItem,
    Statement,
    TopUp,
    TopUpStatus,
    UsageRecord,
)
from teams.models import AuditEvent, Team
from tests.billing_support import DAY, Clock, a_metered_day, clock_install, stripe_client, stripe_point
from tests.conftest import Actor
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db

USAGE = "/dashboard/t/acme/usage"


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, and the text of <script> tags by id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: dict[str, str] = {}
        self._script: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        self.tags.append((tag, found))
        self._script = found.get("id") if tag == "script" else None

    def handle_data(self, data: str) -> None:
        if self._script:
            self.scripts[self._script] = self.scripts.get(self._script, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._script = None

    def find(self, tag: str | None = None, **wanted: str) -> list[dict[str, str]]:
        """Attributes of the tags having every `wanted` attribute (data_day= for data-day=)."""
        names = {key.replace("_", "-"): value for key, value in wanted.items()}
        return [
            attrs
            for name, attrs in self.tags
            if (tag is None or name == tag) and all(attrs.get(k) == v for k, v in names.items())
        ]


def page(client: Client, url: str) -> Elements:
    response = client.get(url)
    assert response.status_code == 200, response.content[:800]
    return Elements(response.content.decode())


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


@pytest.fixture
def metered(acme: Team, monkeypatch, settings) -> Clock:  # type: ignore[no-untyped-def]
    """acme's usage on DAY (2026-11-02): sandbox 7 (2 vCPU, 1 GiB) 00:00-02:00, sandbox 8
    (1 vCPU, 512 MiB) 01:00-01:30, a 1 GiB volume all day; metered the next morning, 1 € of
    credit granted before. The clock stays at 2026-11-03 01:00."""
    settings.BILLING_RUNTIME_WINDOW_SECONDS = 600
    return a_metered_day(acme, clock_install(monkeypatch))


# --- usage on a fixed clock --------------------------------------------------------------------


def test_the_usage_page_shows_each_days_exact_amount_by_line_item(owner: Actor, metered: Clock) -> None:
    # given acme's metered usage on 2026-11-02 (the clock at 2026-11-03 01:00)
    # when the owner opens the usage page (default range: this month so far)
    html = page(signed_in(owner), USAGE)

    # then the day's row has the exact amounts, per line item and in total
    day = {cell["data-line-item"]: cell["data-amount"] for cell in html.find("td", data_day="2026-11-02")}
    assert day == {
        "memory": "0.016200",  # (2 x 7200 + 1 x 1800) MiB-s at the memory price
        "vcpu": "0.162000",
        "volume": "0.003333",
        "total": "0.181533",
    }
    # the by-line-item table says the same, and so does the total
    items = {
        attrs["data-line-item"]: attrs["data-amount"]
        for attrs in html.find("td")
        if "data-amount" in attrs and "data-day" not in attrs
    }
    assert items == {"memory": "0.016200", "vcpu": "0.162000", "volume": "0.003333"}
    assert html.find(data_usage_total="0.181533")
    # the balance, what this month used, and the chart's data for the day
    assert html.find(data_balance="0.818467") and html.find(data_month_to_date="0.181533")
    chart = json.loads(html.scripts["usage-chart-data"])
    assert chart["days"][0] == "2026-11-01" and chart["days"][-1] == "2026-11-03"
    amounts = {series["line_item"]: series["amounts"][1] for series in chart["series"]}
    assert amounts == {"memory": 0.0162, "vcpu": 0.162, "volume": 0.003333}
    assert html.find("canvas", id="usage-by-day") and html.find("canvas", id="usage-by-item")
    assert html.find("script", src="/static/dashboard/billing.js")


def test_a_chosen_range_shows_only_its_days(owner: Actor, metered: Clock) -> None:
    client = signed_in(owner)
    # when the range is the day after the usage
    after = page(client, f"{USAGE}?start=2026-11-03&end=2026-11-03")
    # then there is no usage and no chart
    assert after.find(data_usage="none") and not after.find("canvas")
    assert not after.find("td", data_day="2026-11-02")

    # when the range is October to the usage day, it shows the day
    span = page(client, f"{USAGE}?start=2026-10-01&end=2026-11-02")
    assert [c["data-amount"] for c in span.find("td", data_day="2026-11-02", data_line_item="total")] == [
        "0.181533"
    ]


def test_a_bad_range_is_explained_never_a_500(owner: Actor, metered: Clock) -> None:
    client = signed_in(owner)
    backwards = client.get(f"{USAGE}?start=2026-11-03&end=2026-11-01")
    assert backwards.status_code == 200 and b"The range ends before it starts." in backwards.content
    garbage = client.get(f"{USAGE}?start=yesterday&end=%C2%B2")
    assert garbage.status_code == 200 and b"Enter a valid date." in garbage.content
    too_long = client.get(f"{USAGE}?start=2020-01-01&end=2026-11-02")
    assert too_long.status_code == 200 and b"Ranges are at most 366 days." in too_long.content


def _usage_on_days(team: Team, days: int) -> None:
    UsageRecord.objects.bulk_create(
        UsageRecord(
            team=team,
            line_item=item,
            subject_id=1,
            window_start=DAY - timedelta(days=n),
            window_end=DAY - timedelta(days=n) + timedelta(minutes=10),
            quantity=600,
            cumulative=600,
            amount_micros=1000 + n,
        )
        for n in range(days)
        for item in (LineItem.VCPU, LineItem.MEMORY)
    )
    LedgerEntry.objects.bulk_create(
        LedgerEntry(team=team, kind=EntryKind.GRANT, amount_micros=1, at=DAY, reason=f"g{n}")
        for n in range(days)
    )


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_the_usage_page_costs_the_same_queries_for_3_or_30_days(
    owner: Actor, acme: Team, monkeypatch
) -> None:
    clock_install(monkeypatch).now = DAY + timedelta(days=1)
    client = signed_in(owner)
    url = f"{USAGE}?start=2026-09-01&end=2026-11-02"
    _usage_on_days(acme, 3)
    _queries(client, url)  # (the first visit creates the team's billing account)
    few = _queries(client, url)
    UsageRecord.objects.all().delete()
    _usage_on_days(acme, 30)
    many = _queries(client, url)
    assert few == many
    assert len({c["data-day"] for c in page(client, url).find("td") if "data-day" in c}) == 30


# --- top-ups: who, when payments are off, and through localstripe ------------------------------


def test_payments_not_configured_explains_and_shows_no_form(owner: Actor, settings) -> None:
    settings.STRIPE_SECRET_KEY = ""
    client = signed_in(owner)
    html = page(client, USAGE)
    assert html.find(data_payments="off")
    assert not html.find("form", action="/dashboard/t/acme/usage/top-ups/new")
    assert b"operators" in client.get(USAGE).content

    # a POST anyway is refused with the service's message, and creates nothing
    response = client.post("/dashboard/t/acme/usage/top-ups/new", {"amount": "10.00"}, follow=True)
    assert response.status_code == 200
    assert b"Payments are not configured on this installation" in response.content
    assert not TopUp.objects.exists()


@pytest.mark.parametrize("who", ["member", "viewer"])
def test_only_owners_and_admins_may_top_up(who: str, request, settings) -> None:  # type: ignore[no-untyped-def]
    settings.STRIPE_SECRET_KEY = "sk_test_not_used"
    actor: Actor = request.getfixturevalue(who)
    client = signed_in(actor)
    # the form is there, disabled, saying why
    html = page(client, USAGE)
    submit = [
        attrs
        for attrs in html.find("button", type="submit", disabled="")
        if "top up" in attrs.get("title", "")
    ]
    assert submit and "owners and admins" in submit[0]["title"]
    # and the server refuses
    assert client.post("/dashboard/t/acme/usage/top-ups/new", {"amount": "10.00"}).status_code == 403
    assert client.post("/dashboard/t/acme/usage/spend-alert", {"spend_alert": "1"}).status_code == 403
    assert not TopUp.objects.exists()


def test_an_outsider_gets_404_on_every_billing_page(outsider: Actor, owner: Actor, acme: Team) -> None:
    top_up = _top_up(acme, 1, TopUpStatus.SUCCEEDED)
    client = signed_in(outsider)
    for url in [
        USAGE,
        "/dashboard/t/acme/usage/ledger",
        "/dashboard/t/acme/usage/top-ups",
        f"/dashboard/t/acme/usage/top-ups/{top_up.pk}",
        f"/dashboard/t/acme/usage/top-ups/{top_up.pk}/status",
        "/dashboard/t/acme/statements",
        "/dashboard/t/acme/statements/2026-11",
    ]:
        assert client.get(url).status_code == 404, url
    assert client.post("/dashboard/t/acme/usage/top-ups/new", {"amount": "10"}).status_code == 404


def test_another_teams_top_up_is_a_404(owner: Actor, acme: Team) -> None:
    other = Team.objects.create(slug="other", name="Other")
    theirs = _top_up(other, 1, TopUpStatus.SUCCEEDED)
    client = signed_in(owner)
    assert client.get(f"/dashboard/t/acme/usage/top-ups/{theirs.pk}").status_code == 404
    assert client.get(f"/dashboard/t/acme/usage/top-ups/{theirs.pk}/status").status_code == 404


def test_an_amount_out_of_range_is_a_message(owner: Actor, settings) -> None:
    settings.STRIPE_SECRET_KEY = "sk_test_not_used"
    response = signed_in(owner).post("/dashboard/t/acme/usage/top-ups/new", {"amount": "1.00"}, follow=True)
    assert response.status_code == 200
    assert b"A top-up is between 5.00 and 10000.00 EUR." in response.content
    assert not TopUp.objects.exists()


@pytest.fixture
def stripe_at(settings, localstripe: str) -> str:  # type: ignore[no-untyped-def]
    settings.STRIPE_SECRET_KEY = "sk_test_watasu"
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_watasu"
    settings.STRIPE_API_BASE = localstripe
    settings.STRIPE_JS_URL = f"{localstripe}/js.stripe.com/v3/"
    return localstripe


def test_a_top_up_renders_the_payment_form_with_its_client_secret(
    owner: Actor, acme: Team, stripe_at: str, settings
) -> None:
    client = signed_in(owner)
    # the form is enabled for an owner
    assert page(client, USAGE).find("form", action="/dashboard/t/acme/usage/top-ups/new")

    # when the owner asks for 12.50 €
    response = client.post("/dashboard/t/acme/usage/top-ups/new", {"amount": "12.50"})

    # then a pending top-up exists, and the page holds its client secret and the publishable key
    assert response.status_code == 200
    top_up = TopUp.objects.get(team=acme)
    assert (top_up.status, top_up.amount_micros, top_up.created_by) == ("pending", 12_500_000, owner.user)
    body = response.content.decode()
    html = Elements(body)
    [pay] = html.find(id="top-up-pay")
    assert pay["data-client-secret"].startswith(top_up.payment_intent_id + "_secret_")
    assert pay["data-publishable-key"] == "pk_test_watasu"
    assert pay["data-status-url"] == f"/dashboard/t/acme/usage/top-ups/{top_up.pk}/status"
    # Stripe.js from the configured URL, then our script; never the secret key
    scripts = [attrs["src"] for attrs in html.find("script") if "src" in attrs]
    assert scripts[-2:] == [settings.STRIPE_JS_URL, "/static/dashboard/topup.js"]
    assert "sk_test_watasu" not in body
    assert AuditEvent.objects.filter(team=acme, action="billing.top_up", source="dashboard").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_payment_page_polls_until_the_webhook_credits_the_top_up(
    owner: Actor, acme: Team, stripe_at: str, settings, live_server
) -> None:
    stripe_point(settings, stripe_at, live_server.url)
    client = signed_in(owner)
    client.post("/dashboard/t/acme/usage/top-ups/new", {"amount": "10.00"})
    top_up = TopUp.objects.get(team=acme)
    status_url = f"/dashboard/t/acme/usage/top-ups/{top_up.pk}/status"

    # while pending, the fragment asks again (htmx), counting its polls
    first = page(client, status_url)
    assert first.find(id="top-up-status", data_top_up_status="pending")
    [poll] = first.find(data_poll="")
    assert poll["hx-get"] == f"{status_url}?n=1" and poll["hx-trigger"] == "load delay:2s"
    assert poll["hx-target"] == "#top-up-status" and poll["hx-swap"] == "outerHTML"
    [later] = page(client, f"{status_url}?n=7").find(data_poll="")
    assert later["hx-get"] == f"{status_url}?n=8"
    # and gives up after a while (saying so)
    tired = client.get(f"{status_url}?n=90").content.decode()
    assert "data-poll" not in tired and "Still waiting" in tired

    # when the card is confirmed (what Stripe.js does) and localstripe's webhook arrives
    stripe = stripe_client(stripe_at)
    stripe.v1.payment_intents.update(top_up.payment_intent_id, params={"payment_method": "pm_card_visa"})
    stripe.v1.payment_intents.confirm(top_up.payment_intent_id)
    wait_until(
        lambda: TopUp.objects.get(pk=top_up.pk).status == TopUpStatus.SUCCEEDED,
        timeout=60,
        what="the webhook to credit the top-up",
    )

    # then the fragment shows the new balance and stops asking
    html = page(client, f"{status_url}?n=3")
    assert html.find(id="top-up-status", data_top_up_status="succeeded") and not html.find(data_poll="")
    assert html.find(data_new_balance="10.000000")
    # and the receipt is listed
    paid = TopUp.objects.get(pk=top_up.pk)
    listed = page(client, "/dashboard/t/acme/usage/top-ups")
    assert listed.find("a", data_receipt=paid.receipt_number)


def _top_up(team: Team, n: int, status: str) -> TopUp:
    paid = status == TopUpStatus.SUCCEEDED
    return TopUp.objects.create(
        team=team,
        amount_micros=5_000_000 + n,
        currency="EUR",
        status=status,
        payment_intent_id=f"pi_{team.slug}_{n}",
        customer_id="cus_x",
        succeeded_at=DAY if paid else None,
    )


def test_top_ups_and_receipts(owner: Actor, member: Actor, acme: Team, settings) -> None:
    settings.BILLING_TAX_RATE = Decimal("0.21")
    paid = _top_up(acme, 1, TopUpStatus.SUCCEEDED)
    _top_up(acme, 2, TopUpStatus.PENDING)
    # members read the list and the receipt
    client = signed_in(member)
    html = page(client, "/dashboard/t/acme/usage/top-ups")
    rows = {row["data-top-up"]: row["data-status"] for row in html.find("tr") if "data-top-up" in row}
    assert rows == {str(paid.pk): "succeeded", str(paid.pk + 1): "pending"}
    receipt = client.get(f"/dashboard/t/acme/usage/top-ups/{paid.pk}").content.decode()
    assert f"Receipt {paid.receipt_number}" in receipt
    assert "0.867769 EUR (0.21)" in receipt  # 5.000001 x 0.21 / 1.21 = 0.8677687
    assert "Prepaid credit for team acme" in receipt


def test_the_lists_cost_the_same_queries_for_3_or_30_rows(owner: Actor, acme: Team) -> None:
    client = signed_in(owner)
    urls = [
        "/dashboard/t/acme/usage/top-ups",
        "/dashboard/t/acme/usage/ledger",
        "/dashboard/t/acme/statements",
    ]

    def rows(count: int) -> None:
        start = TopUp.objects.count()
        for n in range(start, count):
            _top_up(acme, n, TopUpStatus.SUCCEEDED)
            LedgerEntry.objects.create(
                team=acme, kind=EntryKind.GRANT, amount_micros=n + 1, at=DAY, reason="g"
            )
            first = date(2020, 1, 1) + timedelta(days=31 * n)
            Statement.objects.create(
                team=acme,
                period_start=first.replace(day=1),
                period_end=first.replace(day=1) + timedelta(days=31),
                currency="EUR",
                opening_micros=0,
                credits_micros=n,
                adjustments_micros=0,
                usage_micros=0,
                waived_micros=0,
                closing_micros=n,
                lines=[],
                tax_name="VAT",
                tax_rate=Decimal(0),
                tax_included_micros=0,
            )

    rows(3)
    for url in urls:
        _queries(client, url)  # (the first visit creates the team's billing account)
    few = [_queries(client, url) for url in urls]
    rows(30)
    many = [_queries(client, url) for url in urls]
    assert few == many
    assert len(page(client, "/dashboard/t/acme/statements").find("tr", data_status="closed")) == 30


# --- statements and ledger ----------------------------------------------------------------------


def test_statements_list_and_detail(owner: Actor, viewer: Actor, metered: Clock) -> None:
    # given November is closed (both meters past December 1st)
    metering.meter_run(now=datetime(2026, 12, 1, 2, tzinfo=UTC), max_windows=100_000)
    metered.now = datetime(2026, 12, 1, 2, tzinfo=UTC)
    assert services.statements_close(now=metered.now) == 1

    client = signed_in(viewer)
    html = page(client, "/dashboard/t/acme/statements")
    periods = [(row["data-period"], row["data-status"]) for row in html.find("tr") if "data-period" in row]
    assert periods == [("2026-12", "open"), ("2026-11", "closed")]
    november = page(client, "/dashboard/t/acme/statements/2026-11")
    assert november.find(data_usage="0.181533") and november.find(data_closing="0.818467")
    assert november.find(data_credits="1.000000")
    lines = {c["data-line-item"]: c["data-amount"] for c in november.find("td") if "data-amount" in c}
    assert lines["vcpu"] == "0.162000" and lines["volume"] == "0.003333"
    for missing in ("2026-13", "1999-01", "nonsense"):
        assert client.get(f"/dashboard/t/acme/statements/{missing}").status_code == 404, missing


def test_the_ledger_pages_newest_first(owner: Actor, acme: Team) -> None:
    LedgerEntry.objects.bulk_create(
        LedgerEntry(team=acme, kind=EntryKind.GRANT, amount_micros=n, at=DAY, reason=f"grant {n}")
        for n in range(1, 61)
    )
    client = signed_in(owner)
    first = page(client, "/dashboard/t/acme/usage/ledger")
    amounts = [row["data-amount"] for row in first.find("td") if "data-amount" in row]
    assert len(amounts) == 50 and amounts[0] == "0.000060"
    [older] = first.find("a", rel="next")
    rest = page(client, f"/dashboard/t/acme/usage/ledger{older['href']}")
    assert [row["data-amount"] for row in rest.find("td") if "data-amount" in row][-1] == "0.000001"
    assert not rest.find("a", rel="next")


# --- spend alert and banners --------------------------------------------------------------------


def test_an_owner_sets_and_clears_the_spend_alert(owner: Actor, acme: Team) -> None:
    client = signed_in(owner)
    client.post("/dashboard/t/acme/usage/spend-alert", {"spend_alert": "25.50"})
    assert Account.objects.get(team=acme).spend_alert_micros == 25_500_000
    assert page(client, USAGE).find(data_spend_alert="25.500000")
    bad = client.post("/dashboard/t/acme/usage/spend-alert", {"spend_alert": "-3"}, follow=True)
    assert b"at least 0.01" in bad.content
    client.post("/dashboard/t/acme/usage/spend-alert", {"spend_alert": ""})
    assert Account.objects.get(team=acme).spend_alert_micros is None
    assert AuditEvent.objects.filter(team=acme, action="billing.spend_alert").count() == 2


def test_a_suspended_team_sees_the_banner_with_a_top_up_link_for_managers(
    owner: Actor, viewer: Actor, acme: Team
) -> None:
    services.account_of(acme)
    Account.objects.filter(team=acme).update(balance_micros=-2_000_000, suspended_at=DAY)
    [banner] = page(signed_in(owner), USAGE).find(data_banner="suspended")
    assert banner["role"] == "alert"
    owners = signed_in(owner).get("/dashboard/t/acme/statements").content.decode()
    assert "This team is suspended: its balance is -2.000000 EUR." in owners
    assert 'href="/dashboard/t/acme/usage#top-up">Top up to lift it' in owners
    viewers = signed_in(viewer).get("/dashboard/t/acme/statements").content.decode()
    assert 'data-banner="suspended"' in viewers and "Top up to lift it" not in viewers


def test_a_low_balance_banner_shows_only_where_billing_is_enforced(
    owner: Actor, acme: Team, settings
) -> None:
    services.account_of(acme)
    Account.objects.filter(team=acme).update(balance_micros=500_000, exhausted_at=None)
    settings.BILLING_ENFORCE = False
    assert not page(signed_in(owner), USAGE).find(data_banner="low-balance")
    settings.BILLING_ENFORCE = True
    html = signed_in(owner).get(USAGE).content.decode()
    assert 'data-banner="low-balance"' in html and "Low balance: 0.500000 EUR left" in html
    Account.objects.filter(team=acme).update(balance_micros=5_000_000)
    assert 'data-banner="low-balance"' not in signed_in(owner).get(USAGE).content.decode()


def test_a_team_without_any_billing_history_sees_empty_pages(owner: Actor) -> None:
    # a team without usage, ledger, top-ups or statements: every page renders, empty
    client = signed_in(owner)
    assert page(client, USAGE).find(data_usage="none")
    assert b"No entries" in client.get("/dashboard/t/acme/usage/ledger").content
    assert b"No top-ups yet." in client.get("/dashboard/t/acme/usage/top-ups").content
    assert page(client, "/dashboard/t/acme/statements").find("tr", data_status="open")


@pytest.mark.parametrize(
    ("day", "message"),
    [
        ("9999-12-31", b"Pick a day between"),
        ("0001-01-01", b"Pick a day between"),
        ("2026-13-40", b"valid date"),
    ],
)
def test_a_range_outside_the_calendar_is_a_message_not_a_crash(
    owner: Actor, acme: Team, day: str, message: bytes
) -> None:
    response = signed_in(owner).get(USAGE, {"start": day, "end": day})
    assert response.status_code == 200
    assert message in response.content

"""Top-ups against a real, stateful Stripe stand-in (`localstripe` on 127.0.0.1), with the
real `stripe` library on both sides: our gateway creates customers, PaymentIntents and
refunds; the test confirms the payment as Stripe.js would; localstripe signs and delivers
`payment_intent.succeeded` to the live server. Disputes and dashboard refunds, which
localstripe does not emit, are events signed here with the same webhook secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing import services
from billing.models import Account, EntryKind, LedgerEntry, StripeEvent, TopUp, TopUpStatus
from tests.billing_support import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    paid_top_up,
    stripe_point,
)
from tests.conftest import Actor, concurrently


@pytest.fixture
def stripe_on(settings, localstripe: str, live_server) -> str:  # type: ignore[no-untyped-def]
    """Our settings pointed at localstripe, and localstripe's webhooks at the live server."""
    stripe_point(settings, localstripe, live_server.url)
    return localstripe


def _signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[bytes, str]:
    payload = json.dumps(event).encode()
    stamp = int(time.time())
    signature = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={stamp},v1={signature}"


def _deliver(client, event: dict[str, Any], secret: str = WEBHOOK_SECRET):  # type: ignore[no-untyped-def]
    payload, header = _signed(event, secret)
    return client.post(
        "/v1/billing/stripe/webhook", payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )


def _credits(team) -> list[int]:  # type: ignore[no-untyped-def]
    return list(
        LedgerEntry.objects.filter(team=team, kind=EntryKind.TOP_UP).values_list("amount_micros", flat=True)
    )


def _event_of(base: str, kind: str, intent_id: str) -> dict[str, Any]:
    events = httpx.get(f"{base}/v1/events", auth=(SECRET_KEY, ""), params={"limit": 100}, timeout=10).json()
    return next(e for e in events["data"] if e["type"] == kind and e["data"]["object"]["id"] == intent_id)


@pytest.mark.django_db(transaction=True)
def test_a_top_up_is_credited_once_however_often_its_webhook_comes(owner: Actor, stripe_on: str) -> None:
    team = owner.personal_team
    # given a top-up of 10 € paid with a test card; localstripe delivers the signed event
    top_up = paid_top_up(owner, stripe_on)

    # then the balance is credited 10 € once, with a receipt
    assert _credits(team) == [10_000_000]
    balance = owner.client().get("/v1/billing/balance").json()["balance"]
    assert balance["balance"] == "10.000000" and balance["payments"]["stripe"] is True
    receipt = owner.client().get(f"/v1/billing/top_ups/{top_up.pk}").json()["top_up"]["receipt"]
    assert receipt["number"] == top_up.receipt_number and receipt["amount"] == "10.000000"
    assert receipt["currency"] == "EUR" and receipt["tax_name"] == "VAT"

    # when the very same event is delivered 5 more times
    event = _event_of(stripe_on, "payment_intent.succeeded", top_up.payment_intent_id)
    answers = [_deliver(owner.client(), event) for _ in range(5)]

    # then each is acknowledged and nothing more is credited
    assert [answer.status_code for answer in answers] == [200] * 5
    assert {answer.json()["outcome"] for answer in answers} == {"duplicate"}
    assert _credits(team) == [10_000_000]
    # and another event id for the same payment is not credited again
    again = _deliver(owner.client(), {**event, "id": "evt_replayed_under_another_id"})
    assert again.json()["outcome"] == "already credited"
    assert _credits(team) == [10_000_000]
    assert StripeEvent.objects.filter(event_id=event["id"]).count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_of_new_events_for_one_payment_credit_it_once(
    owner: Actor, stripe_on: str, require_postgres
) -> None:
    # given a paid top-up whose own delivery is taken back (as if it never arrived)
    top_up = paid_top_up(owner, stripe_on)
    event = _event_of(stripe_on, "payment_intent.succeeded", top_up.payment_intent_id)
    LedgerEntry.objects.filter(top_up=top_up).delete()
    StripeEvent.objects.all().delete()
    TopUp.objects.filter(pk=top_up.pk).update(status=TopUpStatus.PENDING, succeeded_at=None)
    Account.objects.filter(team=owner.personal_team).update(balance_micros=0)

    # when 5 deliveries arrive at once, the same event and 4 redeliveries under new ids
    ids = [event["id"], "evt_a", "evt_b", "evt_c", "evt_d"]
    pending = iter(ids)
    answers = concurrently(5, lambda: _deliver(owner.client(), {**event, "id": next(pending)}))

    # then all are acknowledged and the payment is credited exactly once
    assert sorted(answer.status_code for answer in answers) == [200] * 5
    outcomes = sorted(answer.json()["outcome"] for answer in answers)
    assert outcomes == ["already credited"] * 4 + ["credited"]
    assert _credits(owner.personal_team) == [10_000_000]
    assert Account.objects.get(team=owner.personal_team).balance_micros == 10_000_000


@pytest.mark.django_db(transaction=True)
def test_a_bad_signature_is_a_400_and_credits_nothing(owner: Actor, stripe_on: str) -> None:
    # given a pending top-up (created, never paid)
    created = owner.client().post("/v1/billing/top_ups", {"amount": "20.00"}, format="json").json()
    intent = created["top_up"]["payment_intent_id"]
    forged = {
        "id": "evt_forged",
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": intent, "amount": 2000, "currency": "eur", "status": "succeeded"}},
    }
    client = owner.client()

    # when it is "succeeded" by an event signed with another secret, or not signed at all
    wrong = _deliver(client, forged, secret="whsec_attacker")
    unsigned = client.post("/v1/billing/stripe/webhook", json.dumps(forged), content_type="application/json")

    # then both are 400 and nothing is recorded or credited
    assert (wrong.status_code, wrong.json()["error"]) == (400, "bad_signature")
    assert (unsigned.status_code, unsigned.json()["error"]) == (400, "bad_signature")
    assert not StripeEvent.objects.exists()
    assert _credits(owner.personal_team) == []


@pytest.mark.django_db(transaction=True)
def test_an_event_that_does_not_match_our_intent_is_refused(owner: Actor, stripe_on: str) -> None:
    # given a pending 20 € top-up
    created = owner.client().post("/v1/billing/top_ups", {"amount": "20.00"}, format="json").json()
    top_up = TopUp.objects.get(pk=created["top_up"]["id"])
    event = {
        "id": "evt_mismatch",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": top_up.payment_intent_id,
                "amount": 200000,  # 2000 €: not what we asked for
                "currency": "eur",
                "customer": "cus_someone_else",
                "status": "succeeded",
            }
        },
    }

    # when a correctly signed event names our intent with another amount and customer
    answer = _deliver(owner.client(), event)

    # then it is recorded, refused, and nothing is credited
    assert answer.status_code == 200
    assert answer.json()["outcome"] == "refused: amount, customer do not match"
    assert _credits(owner.personal_team) == []
    assert TopUp.objects.get(pk=top_up.pk).status == TopUpStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_refunds_and_disputes_are_debits_each_once(owner: Actor, stripe_on: str) -> None:
    team = owner.personal_team
    top_up = paid_top_up(owner, stripe_on, "30.00")

    # when an operator refunds 4 € (a real refund at localstripe)
    entry = services.top_up_refund(top_up=top_up, amount=Decimal("4.00"), by=None)

    # then 4 € are debited, and Stripe's charge.refunded for that refund changes nothing
    assert entry is not None and entry.amount_micros == -4_000_000
    refunds = httpx.get(
        f"{stripe_on}/v1/refunds", auth=(SECRET_KEY, ""), params={"payment_intent": top_up.payment_intent_id}
    ).json()["data"]
    assert [r["amount"] for r in refunds] == [400]
    # (as Stripe sends it today: the charge with what is refunded in all, no list of refunds)
    charge = {"id": refunds[0]["charge"], "payment_intent": top_up.payment_intent_id, "amount_refunded": 400}
    client = owner.client()
    refunded = _deliver(client, {"id": "evt_r1", "type": "charge.refunded", "data": {"object": charge}})
    assert refunded.json()["outcome"] == "refund already debited"
    # a refund made in Stripe's dashboard arrives only as an event: debited once
    charge["amount_refunded"] = 500
    outcomes = [
        _deliver(client, {"id": event_id, "type": "charge.refunded", "data": {"object": charge}}).json()[
            "outcome"
        ]
        for event_id in ("evt_r2", "evt_r3")
    ]
    assert outcomes == ["refund debited", "refund already debited"]

    # when the card holder asks (an inquiry: nothing taken), the inquiry becomes a chargeback
    # of 2 € (funds withdrawn), and another dispute of 3 € is opened and then won
    inquiry = {"id": "dp_0", "amount": 200, "payment_intent": top_up.payment_intent_id}
    for event_id, kind, status in (
        ("evt_d0", "charge.dispute.created", "warning_needs_response"),
        ("evt_d1", "charge.dispute.updated", "warning_under_review"),
        ("evt_d2", "charge.dispute.funds_withdrawn", "needs_response"),
        ("evt_d3", "charge.dispute.updated", "needs_response"),
    ):
        _deliver(client, {"id": event_id, "type": kind, "data": {"object": {**inquiry, "status": status}}})
    dispute = {"id": "dp_1", "amount": 300, "payment_intent": top_up.payment_intent_id}
    _deliver(
        client,
        {
            "id": "evt_d4",
            "type": "charge.dispute.created",
            "data": {"object": {**dispute, "status": "needs_response"}},
        },
    )
    won = {**dispute, "status": "won", "amount": 500_000}  # a won event gives back what was taken
    _deliver(client, {"id": "evt_d5", "type": "charge.dispute.closed", "data": {"object": won}})
    _deliver(client, {"id": "evt_d6", "type": "charge.dispute.funds_reinstated", "data": {"object": won}})
    stranger = {**won, "id": "dp_never_opened"}
    _deliver(client, {"id": "evt_d7", "type": "charge.dispute.closed", "data": {"object": stranger}})
    # and a refund event claims far more than the top-up
    charge["amount_refunded"] = 999_999
    _deliver(client, {"id": "evt_r4", "type": "charge.refunded", "data": {"object": charge}})
    charge["amount_refunded"] = "5"  # signed, but not Stripe's shape: refused, nothing recorded
    malformed = _deliver(client, {"id": "evt_r5", "type": "charge.refunded", "data": {"object": charge}})
    assert (malformed.status_code, malformed.json()["error"]) == (400, "malformed_event")
    assert not StripeEvent.objects.filter(event_id="evt_r5").exists()

    # then the ledger says exactly that; refunds and chargebacks never take more than was paid
    kinds = list(LedgerEntry.objects.filter(team=team).order_by("pk").values_list("kind", "amount_micros"))
    assert kinds == [
        ("top_up", 30_000_000),
        ("refund", -4_000_000),
        ("refund", -1_000_000),
        ("dispute", -2_000_000),
        ("dispute", -3_000_000),
        ("dispute_won", 3_000_000),
        ("refund", -23_000_000),
    ]
    assert owner.client().get("/v1/billing/balance").json()["balance"]["balance_micros"] == 0
    assert TopUp.objects.get(pk=top_up.pk).refunded_micros == 28_000_000


@pytest.mark.django_db(transaction=True)
def test_a_refund_event_before_its_payment_is_retried_not_dropped(owner: Actor, stripe_on: str) -> None:
    # given a top-up whose payment Stripe reports after a refund of it (events are unordered)
    created = owner.client().post("/v1/billing/top_ups", {"amount": "10.00"}, format="json").json()
    intent = created["top_up"]["payment_intent_id"]
    charge = {"id": "ch_early", "payment_intent": intent, "amount_refunded": 100}
    early = {"id": "evt_early", "type": "charge.refunded", "data": {"object": charge}}

    # when the refund arrives first
    answer = _deliver(owner.client(), early)

    # then it is a 503 (Stripe delivers it again) and not recorded
    assert (answer.status_code, answer.json()["error"]) == (503, "event_out_of_order")
    assert not StripeEvent.objects.filter(event_id="evt_early").exists()
    # and once the payment is in, the redelivery debits it
    top_up = TopUp.objects.get(pk=created["top_up"]["id"])
    assert _deliver(owner.client(), _succeeded_event(top_up)).json()["outcome"] == "credited"
    assert _deliver(owner.client(), early).json()["outcome"] == "refund debited"
    assert _credits(owner.personal_team) == [10_000_000]
    assert LedgerEntry.objects.get(kind=EntryKind.REFUND).amount_micros == -1_000_000


def _succeeded_event(top_up: TopUp) -> dict[str, Any]:
    return {
        "id": f"evt_paid_{top_up.pk}",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": top_up.payment_intent_id,
                "amount": top_up.amount_micros // 10_000,
                "currency": top_up.currency.lower(),
                "customer": top_up.customer_id,
                "status": "succeeded",
            }
        },
    }


@pytest.mark.django_db(transaction=True)
def test_signed_but_malformed_events_are_400s_and_a_future_stamp_is_refused(
    owner: Actor, stripe_on: str
) -> None:
    client = owner.client()
    for event in (
        {"id": "evt_m1", "type": "charge.refunded", "data": []},
        {"id": "evt_m2", "type": "charge.refunded", "data": {"object": "x"}},
        {"id": 7, "type": "payment_intent.succeeded", "data": {"object": {}}},
    ):
        answer = _deliver(client, event)
        assert (answer.status_code, answer.json()["error"]) == (400, "malformed_event"), (
            event,
            answer.content,
        )
    deep = b"[" * 100_000 + b"]" * 100_000
    stamp = int(time.time())
    signature = hmac.new(WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + deep, hashlib.sha256).hexdigest()
    answer = client.post(
        "/v1/billing/stripe/webhook",
        deep,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=f"t={stamp},v1={signature}",
    )
    assert answer.status_code == 400
    future = int(time.time()) + 3600
    body = json.dumps({"id": "evt_future", "type": "ping", "data": {"object": {}}}).encode()
    signature = hmac.new(WEBHOOK_SECRET.encode(), f"{future}.".encode() + body, hashlib.sha256).hexdigest()
    answer = client.post(
        "/v1/billing/stripe/webhook",
        body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=f"t={future},v1={signature}",
    )
    assert (answer.status_code, answer.json()["error"]) == (400, "bad_signature")
    assert not StripeEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_who_may_top_up(owner: Actor, member: Actor, viewer: Actor, outsider: Actor, stripe_on: str) -> None:
    body = {"amount": "10.00", "team": "acme"}
    # a read key, a member and a viewer may not; another team does not exist for an outsider
    assert owner.client("read").post("/v1/billing/top_ups", body, format="json").status_code == 403
    assert member.client().post("/v1/billing/top_ups", body, format="json").status_code == 403
    assert viewer.client().post("/v1/billing/top_ups", body, format="json").status_code == 403
    assert outsider.client().post("/v1/billing/top_ups", body, format="json").status_code == 404
    # amounts out of range or with fractions of a cent are 422
    for amount in ("0.50", "10.001", "99999999", "-5", "ten"):
        answer = owner.client().post("/v1/billing/top_ups", {"amount": amount}, format="json")
        assert answer.status_code == 422, (amount, answer.content)
    assert not TopUp.objects.exists()
    # the owner may (member reads still work)
    assert owner.client().post("/v1/billing/top_ups", body, format="json").status_code == 201
    assert (
        member.client("read").get("/v1/billing/top_ups?team=acme").json()["top_ups"][0]["status"] == "pending"
    )


def test_without_stripe_keys_a_top_up_is_a_409_naming_the_operator(owner: Actor, settings) -> None:
    settings.STRIPE_SECRET_KEY = ""
    answer = owner.client().post("/v1/billing/top_ups", {"amount": "10.00"}, format="json")
    assert answer.status_code == 409
    assert answer.json()["error"] == "payments_not_configured"
    assert "operator" in answer.json()["message"]

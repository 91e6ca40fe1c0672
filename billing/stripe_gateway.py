"""The one module that talks to Stripe (and the only one importing `stripe`).

Thin on purpose: create a customer, a PaymentIntent and a refund, and verify a webhook's
signature. Every call has a timeout and an idempotency key where Stripe takes one;
failures become `errors.Unavailable` (502-ish for the caller: retry later).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any

import stripe
from django.conf import settings

from watasu import errors

# How old a signed webhook may be (Stripe's own default tolerance).
SIGNATURE_TOLERANCE_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class Intent:
    id: str
    client_secret: str


@dataclasses.dataclass(frozen=True)
class Refund:
    id: str
    charge: str
    # what Stripe has refunded of the charge in all, this refund included
    charge_refunded_minor: int


def configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def _client() -> stripe.StripeClient:
    base = settings.STRIPE_API_BASE or None
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        base_addresses={"api": base} if base else None,
        http_client=stripe.HTTPXClient(timeout=settings.STRIPE_TIMEOUT_SECONDS, allow_sync_methods=True),
        max_network_retries=2,
    )


def _call(what: str, request: Any) -> Any:
    try:
        return request()
    except stripe.StripeError as exc:
        message = getattr(exc, "user_message", None) or str(exc)
        raise errors.Unavailable(
            f"Stripe could not {what}: {message}", code="payment_provider_error"
        ) from exc


def customer_create(*, team_id: int, name: str) -> str:
    client = _client()
    customer = _call(
        "create the customer",
        lambda: client.v1.customers.create(
            params={"name": name[:200], "metadata": {"team_id": str(team_id)}},
            options={"idempotency_key": f"customer-team-{team_id}"},
        ),
    )
    return str(customer.id)


def payment_intent_create(
    *, amount_minor: int, currency: str, customer: str, metadata: dict[str, str]
) -> Intent:
    client = _client()
    intent = _call(
        "create the payment",
        lambda: client.v1.payment_intents.create(
            params={
                "amount": amount_minor,
                "currency": currency.lower(),
                "customer": customer,
                "metadata": metadata,
            },
            options={"idempotency_key": f"top-up-{secrets.token_hex(16)}"},
        ),
    )
    return Intent(id=str(intent.id), client_secret=str(intent.client_secret))


def refund_create(*, payment_intent: str, amount_minor: int) -> Refund:
    client = _client()
    refund = _call(
        "refund the payment",
        lambda: client.v1.refunds.create(params={"payment_intent": payment_intent, "amount": amount_minor}),
    )
    charge = _call("read the refunded charge", lambda: client.v1.charges.retrieve(str(refund.charge)))
    return Refund(id=str(refund.id), charge=str(charge.id), charge_refunded_minor=int(charge.amount_refunded))


def event_verify(*, payload: bytes, signature: str) -> dict[str, Any]:
    """The event of a webhook delivery whose `Stripe-Signature` is ours and recent, as a
    plain dict; anything else is a 400 (`errors.Invalid` with code `bad_signature`)."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise errors.Conflict("Stripe webhooks are not configured here.", code="payments_not_configured")
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8"), signature, settings.STRIPE_WEBHOOK_SECRET, SIGNATURE_TOLERANCE_SECONDS
        )
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
        raise errors.BadRequest("The webhook signature does not verify.", code="bad_signature") from exc
    if _stamp(signature) > time.time() + SIGNATURE_TOLERANCE_SECONDS:  # Stripe's check is one-sided
        raise errors.BadRequest("The webhook signature is dated in the future.", code="bad_signature")
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise errors.BadRequest("The webhook body is not JSON.", code="malformed_event") from exc
    if not isinstance(event, dict):
        raise errors.BadRequest("The webhook body is not an event.", code="malformed_event")
    return event


def _stamp(signature: str) -> int:
    """The `t=` of a verified `Stripe-Signature` header."""
    for part in signature.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            return int(value)
    return 0

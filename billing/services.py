"""Writes of billing: accounts, credits and debits, suspension, alerts, top-ups, Stripe events.

Every balance movement is a `LedgerEntry` plus an `F()` update of the cached balance in
the same transaction; after it, `_follow_balance` brings suspension in line at once (a
top-up lifts a suspension before its request returns).
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from billing import stripe_gateway
from billing.metering import micros
from billing.models import (
    Account,
    EntryKind,
    LedgerEntry,
    MeterCursor,
    Statement,
    StripeEvent,
    TopUp,
    TopUpStatus,
)
from teams.models import Membership, Role, Team, User
from watasu import errors

logger = logging.getLogger(__name__)

SUSPENDED_CACHE_KEY = "billing:suspended:{team_id}"


# --- accounts and the ledger ------------------------------------------------------------


def accounts_ensure(*, team_ids: list[int], starting_credit: bool = False) -> None:
    """Give these teams an account; with `starting_credit` (a new user's personal team, once
    per user: other teams would multiply it) a new one gets the starting credit (a grant)."""
    missing = set(team_ids) - set(
        Account.objects.filter(team_id__in=team_ids).values_list("team_id", flat=True)
    )
    if not missing:
        return
    credit = micros(settings.BILLING_STARTING_CREDIT) if starting_credit else 0
    for team_id in sorted(missing):
        try:
            with transaction.atomic():
                Account.objects.create(team_id=team_id, balance_micros=credit)
                if credit:
                    LedgerEntry.objects.create(
                        team_id=team_id,
                        kind=EntryKind.GRANT,
                        amount_micros=credit,
                        at=timezone.now(),
                        reason="starting credit",
                    )
        except IntegrityError:
            continue  # created meanwhile by another transaction, with its credit


def account_of(team: Team) -> Account:
    accounts_ensure(team_ids=[team.pk])
    return Account.objects.get(team=team)


def _post(*, team: Team, kind: str, amount: int, reason: str, **fields: Any) -> LedgerEntry:
    """One ledger entry and the balance it moves, then suspension follows the balance."""
    accounts_ensure(team_ids=[team.pk])
    entry = LedgerEntry.objects.create(
        team=team, kind=kind, amount_micros=amount, at=timezone.now(), reason=reason[:500], **fields
    )
    Account.objects.filter(team=team).update(balance_micros=F("balance_micros") + amount)
    _follow_balance(team.pk)
    return entry


def credit_grant(*, team: Team, amount: Decimal, reason: str, by: User | None) -> LedgerEntry:
    """An operator's credit (or, negative, a correction), with the reason it was given."""
    if not reason.strip():
        raise errors.Invalid("A grant needs a reason.", errors=["reason: required"])
    value = _euros_to_micros(amount)
    if value == 0:
        raise errors.Invalid("A grant of zero changes nothing.", errors=["amount: must not be zero"])
    with transaction.atomic():
        entry = _post(team=team, kind=EntryKind.GRANT, amount=value, reason=reason, created_by=by)
    logger.info("billing: %s granted %s to team %s (%s)", by, amount, team.slug, reason)
    return entry


def _euros_to_micros(amount: Decimal) -> int:
    value = amount * 1_000_000
    if value != value.to_integral_value():
        raise errors.Invalid("Amounts have at most 6 decimals.", errors=["amount: too many decimals"])
    return int(value)


# --- suspension ---------------------------------------------------------------------------


def _invalidate(team_id: int) -> None:
    transaction.on_commit(lambda: cache.delete(SUSPENDED_CACHE_KEY.format(team_id=team_id)))


def _follow_balance(team_id: int) -> None:
    """A positive balance ends exhaustion and suspension at once."""
    lifted = Account.objects.filter(team_id=team_id, balance_micros__gt=0).filter(
        Q(exhausted_at__isnull=False) | Q(suspended_at__isnull=False)
    )
    if lifted.update(exhausted_at=None, suspended_at=None):
        _invalidate(team_id)
    low = micros(settings.BILLING_LOW_BALANCE)
    Account.objects.filter(
        team_id=team_id, balance_micros__gte=low, low_balance_notified_at__isnull=False
    ).update(low_balance_notified_at=None)


def accounts_enforce(*, now: datetime) -> dict[str, int]:
    """Bring every account in line with its balance: exhaustion, suspension after the grace
    (or none, when enforcement is off), lifting, low-balance and spend alerts."""
    result = {"exhausted": 0, "suspended": 0, "lifted": 0, "low_balance_mails": 0, "spend_alert_mails": 0}
    result["exhausted"] = Account.objects.filter(balance_micros__lte=0, exhausted_at__isnull=True).update(
        exhausted_at=now
    )
    back = Account.objects.filter(balance_micros__gt=0).filter(
        Q(exhausted_at__isnull=False) | Q(suspended_at__isnull=False)
    )
    if not settings.BILLING_ENFORCE:
        back = Account.objects.filter(Q(pk__in=back) | Q(suspended_at__isnull=False))
    for team_id in list(back.values_list("team_id", flat=True)):
        lifted = Account.objects.filter(team_id=team_id, suspended_at__isnull=False).update(suspended_at=None)
        Account.objects.filter(team_id=team_id, balance_micros__gt=0).update(exhausted_at=None)
        if lifted:
            result["lifted"] += 1
            cache.delete(SUSPENDED_CACHE_KEY.format(team_id=team_id))
    if settings.BILLING_ENFORCE:
        grace_over = now - timedelta(seconds=settings.BILLING_GRACE_SECONDS)
        due = Account.objects.filter(
            balance_micros__lte=0, exhausted_at__lte=grace_over, suspended_at__isnull=True
        ).select_related("team")
        for account in list(due):
            if Account.objects.filter(pk=account.pk, suspended_at__isnull=True, balance_micros__lte=0).update(
                suspended_at=now
            ):
                result["suspended"] += 1
                cache.delete(SUSPENDED_CACHE_KEY.format(team_id=account.team_id))
                _mail_owners(account.team, *_suspended_mail(account))
    if settings.BILLING_ENFORCE:  # elsewhere a low balance suspends nothing: no mail
        result["low_balance_mails"] = _low_balance_alerts(now)
    result["spend_alert_mails"] = _spend_alerts(now)
    return result


def _top_up_hint(team: Team) -> str:
    if stripe_gateway.configured():
        return f"Top up with POST /v1/billing/top_ups (team '{team.slug}'), or ask your operator for credit."
    return f"Ask your operator to credit team '{team.slug}'."


def suspended_message(team: Team, balance_micros: int) -> str:
    cents = -balance_micros // 10_000 + 1  # the whole cents that make the balance positive
    needed = max(cents * 10_000, micros(settings.BILLING_TOP_UP_MIN))
    state = "has no prepaid credit" if balance_micros == 0 else "has used up its prepaid balance"
    return (
        f"Team '{team.slug}' is suspended: it {state} ({format_micros(balance_micros)} "
        f"{settings.PRICE_CURRENCY}); a balance above zero lifts it, so at least {needed / 1e6:.2f} "
        f"(top-ups add up). {_top_up_hint(team)} Pausing, destroying and reading still work; "
        "nothing is deleted."
    )


def _suspended_mail(account: Account) -> tuple[str, str]:
    return (
        f"Team {account.team.slug} is suspended",
        suspended_message(account.team, account.balance_micros)
        + "\nIts running sandboxes are being paused (disks and memory kept).",
    )


def _low_balance_alerts(now: datetime) -> int:
    low = micros(settings.BILLING_LOW_BALANCE)
    sent = 0
    for account in Account.objects.filter(
        balance_micros__lt=low, low_balance_notified_at__isnull=True
    ).select_related("team")[:500]:
        if Account.objects.filter(pk=account.pk, low_balance_notified_at__isnull=True).update(
            low_balance_notified_at=now
        ):
            balance = f"{format_micros(account.balance_micros)} {settings.PRICE_CURRENCY}"
            body = f"Team {account.team.slug}'s prepaid balance is {balance}. {_top_up_hint(account.team)}"
            _mail_owners(account.team, f"Team {account.team.slug}: low balance", body)
            sent += 1
    return sent


def month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _spend_alerts(now: datetime) -> int:
    this_month = month_start(now)
    sent = 0
    accounts = Account.objects.filter(spend_alert_micros__isnull=False).exclude(
        spend_alert_notified_for=this_month.date()
    )
    for account in accounts.select_related("team")[:500]:
        spent = -(
            LedgerEntry.objects.filter(
                team_id=account.team_id, kind=EntryKind.USAGE, window_start__gte=this_month
            ).aggregate(total=Sum("amount_micros"))["total"]
            or 0
        )
        if spent < (account.spend_alert_micros or 0):
            continue
        if (
            Account.objects.filter(pk=account.pk)
            .exclude(spend_alert_notified_for=this_month.date())
            .update(spend_alert_notified_for=this_month.date())
        ):
            body = (
                f"Team {account.team.slug} has used {format_micros(spent)} {settings.PRICE_CURRENCY} "
                f"since {this_month:%Y-%m-%d}, over its spend alert of "
                f"{format_micros(account.spend_alert_micros or 0)}."
            )
            _mail_owners(
                account.team, f"Team {account.team.slug}: spend alert", body, roles=(Role.OWNER, Role.ADMIN)
            )
            sent += 1
    return sent


def _mail_owners(team: Team, subject: str, body: str, roles: tuple[str, ...] = (Role.OWNER,)) -> None:
    if not LedgerEntry.objects.filter(team=team).exists():
        return  # a team that never had credit nor usage: nothing to tell (nor to nag about)
    recipients = list(
        Membership.objects.filter(team=team, role__in=roles)
        .values_list("user__email", flat=True)
        .order_by("pk")
    )
    if not recipients:
        return
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)
    except Exception:
        logger.exception("billing: could not mail %s about %s", recipients, subject)


def spend_alert_set(*, team: Team, amount: Decimal | None) -> Account:
    """The team's own monthly spend alert (None turns it off)."""
    account = account_of(team)
    value = None if amount is None else _euros_to_micros(amount)
    Account.objects.filter(pk=account.pk).update(spend_alert_micros=value, spend_alert_notified_for=None)
    account.refresh_from_db()
    return account


def format_micros(value: int) -> str:
    """Micro-euros as a decimal string with 6 places ("-0.000011")."""
    sign = "-" if value < 0 else ""
    whole, fraction = divmod(abs(value), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


# --- statements ---------------------------------------------------------------------------


def statements_close(*, now: datetime) -> int:
    """Write the statements of every month both meters have fully billed (once each)."""
    from billing.selectors import statement_compute

    cursors = dict(MeterCursor.objects.values_list("meter", "metered_until"))
    if len(cursors) < 2:
        return 0
    metered = min(cursors.values())
    last_closed = month_start(metered).date()  # months before this one are complete
    written = 0
    candidates = (
        LedgerEntry.objects.filter(at__lt=month_start(metered)).values_list("team_id", flat=True).distinct()
    )
    for team in Team.objects.filter(pk__in=candidates).order_by("pk")[:200]:
        first = LedgerEntry.objects.filter(team=team).order_by("at").values_list("at", flat=True).first()
        if first is None:
            continue
        period = month_start(first).date()
        done = set(Statement.objects.filter(team=team).values_list("period_start", flat=True))
        while period < last_closed:
            if period not in done:
                data = statement_compute(team=team, period_start=period)
                Statement.objects.get_or_create(team=team, period_start=period, defaults=data)
                written += 1
            period = _next_month(period)
    return written


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


# --- top-ups and Stripe -------------------------------------------------------------------


def _customer_for(team: Team) -> str:
    account = account_of(team)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    customer = stripe_gateway.customer_create(team_id=team.pk, name=team.name or team.slug)
    # Two concurrent first top-ups may both create one; the first stored wins.
    Account.objects.filter(pk=account.pk, stripe_customer_id="").update(stripe_customer_id=customer)
    return Account.objects.values_list("stripe_customer_id", flat=True).get(pk=account.pk)


# Currencies Stripe counts in whole units (no cents); every other is in hundredths.
ZERO_DECIMAL_CURRENCIES = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)


def minor_unit_micros(currency: str) -> int:
    """Micro-units of money in one of Stripe's minor units of `currency` (a cent: 10,000)."""
    return 1_000_000 if currency.upper() in ZERO_DECIMAL_CURRENCIES else 10_000


def top_up_create(*, team: Team, user: User, amount: Decimal) -> tuple[TopUp, str]:
    """A PaymentIntent for `amount` and its pending top-up; returns the intent's client secret."""
    if not stripe_gateway.configured():
        raise errors.Conflict(
            "Payments are not configured on this installation; ask your operator for credit.",
            code="payments_not_configured",
        )
    currency = settings.PRICE_CURRENCY
    unit = minor_unit_micros(currency)
    if (amount * 1_000_000) % unit:
        places = "whole units" if unit == 1_000_000 else "at most 2 decimals"
        raise errors.Invalid(f"amount has {places} in {currency}.", errors=[f"amount: {places}"])
    low, high = settings.BILLING_TOP_UP_MIN or Decimal("0.01"), settings.BILLING_TOP_UP_MAX or Decimal(10**6)
    if not low <= amount <= high:
        raise errors.Invalid(
            f"amount must be between {low} and {high} {currency}.",
            errors=[f"amount: between {low} and {high}"],
        )
    customer = _customer_for(team)
    value = _euros_to_micros(amount)
    intent = stripe_gateway.payment_intent_create(
        amount_minor=value // unit,
        currency=currency,
        customer=customer,
        metadata={"team_id": str(team.pk), "team": team.slug},
    )
    top_up = TopUp.objects.create(
        team=team,
        created_by=user,
        amount_micros=value,
        currency=currency,
        payment_intent_id=intent.id,
        customer_id=customer,
    )
    return top_up, intent.client_secret


def top_up_refund(*, top_up: TopUp, amount: Decimal | None, by: User | None) -> LedgerEntry | None:
    """Return (part of) a succeeded top-up to the card: a refund at Stripe, and the debit of
    what Stripe then says is refunded in all (a webhook that got there first took it already:
    then None)."""
    if top_up.status != TopUpStatus.SUCCEEDED:
        raise errors.Conflict("Only a succeeded top-up can be refunded.")
    unit = minor_unit_micros(top_up.currency)
    left = top_up.amount_micros - top_up.refunded_micros
    value = left if amount is None else _euros_to_micros(amount)
    if not 0 < value <= left or value % unit:
        raise errors.Invalid(
            f"A refund is in whole minor units, at most {format_micros(left)}.",
            errors=["amount: out of range"],
        )
    refund = stripe_gateway.refund_create(payment_intent=top_up.payment_intent_id, amount_minor=value // unit)
    with transaction.atomic():
        return _refunds_sync(
            top_up=top_up, refunded_minor=refund.charge_refunded_minor, charge=refund.charge, by=by
        )


def _refunds_sync(
    *, top_up: TopUp, refunded_minor: int, charge: str, by: User | None = None
) -> LedgerEntry | None:
    """Debit what Stripe says is refunded of the top-up in all, less what is debited already
    (so an admin refund and its `charge.refunded` debit it once, in either order)."""
    locked = TopUp.objects.select_for_update().select_related("team").get(pk=top_up.pk)
    total = min(refunded_minor * minor_unit_micros(locked.currency), locked.amount_micros)
    delta = min(total - locked.refunded_micros, locked.amount_micros - _taken_back(locked))
    if delta <= 0:
        return None
    TopUp.objects.filter(pk=locked.pk).update(refunded_micros=locked.refunded_micros + delta)
    return _post(
        team=locked.team,
        kind=EntryKind.REFUND,
        amount=-delta,
        reason=f"refund of top-up {locked.receipt_number}",
        top_up=locked,
        reference=f"refund:{charge}:{refunded_minor}",
        created_by=by,
    )


def stripe_webhook_handle(*, payload: bytes, signature: str) -> str:
    """Verify, record once, act: what a webhook delivery did (for the log and the reply)."""
    event = stripe_gateway.event_verify(payload=payload, signature=signature)
    event_id, kind = event.get("id"), event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if (
        not isinstance(event_id, str)
        or not event_id
        or not isinstance(kind, str)
        or not isinstance(obj, dict)
    ):
        raise errors.BadRequest("The event has no id, type or data object.", code="malformed_event")
    with transaction.atomic():
        try:
            with transaction.atomic():
                record = StripeEvent.objects.create(event_id=event_id[:128], type=kind[:100])
        except IntegrityError:
            return "duplicate"
        try:
            outcome = _event_act(kind, obj)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # Signed by our secret but not shaped as Stripe's: refuse, record nothing.
            transaction.set_rollback(True)
            raise errors.BadRequest(f"The {kind} event is malformed: {exc}", code="malformed_event") from exc
        record.outcome = outcome[:300]
        record.save(update_fields=["outcome"])
    logger.info("stripe event %s (%s): %s", event_id, kind, outcome)
    return outcome


def _event_act(kind: str, obj: dict[str, Any]) -> str:
    if kind == "payment_intent.succeeded":
        return _intent_succeeded(obj)
    if kind == "payment_intent.payment_failed":
        TopUp.objects.filter(payment_intent_id=str(obj.get("id")), status=TopUpStatus.PENDING).update(
            status=TopUpStatus.FAILED
        )
        return "marked failed"
    if kind == "charge.refunded":
        return _charge_refunded(obj)
    if kind in ("charge.dispute.created", "charge.dispute.updated", "charge.dispute.funds_withdrawn"):
        return _dispute_opened(obj)
    if kind in ("charge.dispute.closed", "charge.dispute.funds_reinstated"):
        return _dispute_returned(obj, closed=kind == "charge.dispute.closed")
    return "ignored"


def _whole(value: Any) -> int:
    """A non-negative integer from an event field (a bool or a string is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not an amount")
    return value


def _intent_succeeded(intent: dict[str, Any]) -> str:
    top_up = TopUp.objects.select_for_update().filter(payment_intent_id=str(intent.get("id"))).first()
    if top_up is None:
        return "not a top-up of ours"
    problems = []
    if intent.get("amount") != top_up.amount_micros // minor_unit_micros(top_up.currency):
        problems.append("amount")
    if str(intent.get("currency", "")).upper() != top_up.currency.upper():
        problems.append("currency")
    if intent.get("customer") != top_up.customer_id:
        problems.append("customer")
    if intent.get("status") not in (None, "succeeded"):
        problems.append("status")
    if problems:
        logger.error("stripe: intent %s does not match top-up %s: %s", intent.get("id"), top_up.pk, problems)
        return "refused: " + ", ".join(problems) + " do not match"
    if top_up.status == TopUpStatus.SUCCEEDED:
        return "already credited"
    TopUp.objects.filter(pk=top_up.pk).update(status=TopUpStatus.SUCCEEDED, succeeded_at=timezone.now())
    _post(
        team=top_up.team,
        kind=EntryKind.TOP_UP,
        amount=top_up.amount_micros,
        reason=f"top-up {top_up.receipt_number}",
        top_up=top_up,
    )
    return "credited"


def _paid_top_up_of(obj: dict[str, Any]) -> TopUp | None:
    """The succeeded top-up a charge or dispute event is about (None: not one of ours). One
    whose payment is not recorded yet (Stripe does not order its events) is a 503, so the
    event is not recorded and Stripe delivers it again later."""
    intent = obj.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    if not isinstance(intent, str) or not intent:
        return None
    top_up = TopUp.objects.select_for_update().select_related("team").filter(payment_intent_id=intent).first()
    if top_up is None or top_up.status == TopUpStatus.FAILED:
        return None
    if top_up.status == TopUpStatus.PENDING:
        raise errors.Unavailable(
            f"Top-up {top_up.pk}'s payment is not recorded yet; deliver this event again later.",
            code="event_out_of_order",
        )
    return top_up


def _taken_back(top_up: TopUp) -> int:
    """What refunds and open chargebacks took of the top-up so far (µ€, positive)."""
    disputes = (
        LedgerEntry.objects.filter(
            top_up=top_up, kind__in=[EntryKind.DISPUTE, EntryKind.DISPUTE_WON]
        ).aggregate(total=Sum("amount_micros"))["total"]
        or 0
    )
    return top_up.refunded_micros - disputes


def _charge_refunded(charge: dict[str, Any]) -> str:
    """`amount_refunded` is what Stripe has refunded of the charge in all (its `refunds`
    list is not in the events of current API versions)."""
    top_up = _paid_top_up_of(charge)
    if top_up is None:
        return "not a paid top-up of ours"
    entry = _refunds_sync(
        top_up=top_up, refunded_minor=_whole(charge.get("amount_refunded")), charge=str(charge.get("id"))
    )
    return "refund debited" if entry else "refund already debited"


def _dispute_opened(dispute: dict[str, Any]) -> str:
    """Money taken by a chargeback is debited once per dispute, when Stripe says it is taken:
    a dispute created (or updated) in a status that is not an inquiry's (`warning_*`: Stripe
    takes no money), or `funds_withdrawn` (an inquiry that became a chargeback). Never more
    than what refunds and other chargebacks left of the top-up."""
    if str(dispute.get("status", "")).startswith("warning_"):
        return "inquiry: nothing taken"
    top_up = _paid_top_up_of(dispute)
    if top_up is None:
        return "not a paid top-up of ours"
    dispute_id = str(dispute.get("id"))
    reference = f"dispute:{dispute_id}"
    if LedgerEntry.objects.filter(reference=reference).exists():
        return "dispute already debited"
    left = top_up.amount_micros - _taken_back(top_up)
    amount = min(_whole(dispute.get("amount")) * minor_unit_micros(top_up.currency), left)
    if amount <= 0:
        return "nothing left to take"
    _post(
        team=top_up.team,
        kind=EntryKind.DISPUTE,
        amount=-amount,
        reason=f"chargeback {dispute_id} of top-up {top_up.receipt_number}",
        top_up=top_up,
        reference=reference,
    )
    return "dispute debited"


def _dispute_returned(dispute: dict[str, Any], *, closed: bool) -> str:
    """A chargeback won (`closed` with `won`, or `funds_reinstated`) gives back exactly what
    its debit took, once (nothing if it took nothing)."""
    if closed and dispute.get("status") != "won":
        return "dispute not won (its debit stands)"
    dispute_id = str(dispute.get("id"))
    opened = (
        LedgerEntry.objects.filter(reference=f"dispute:{dispute_id}").select_related("team", "top_up").first()
    )
    reference = f"dispute_won:{dispute_id}"
    if opened is None or LedgerEntry.objects.filter(reference=reference).exists():
        return "nothing to do"
    _post(
        team=opened.team,
        kind=EntryKind.DISPUTE_WON,
        amount=-opened.amount_micros,
        reason=f"chargeback {dispute_id} won",
        top_up=opened.top_up,
        reference=reference,
    )
    return "dispute credited back"


# --- the billing sweep ----------------------------------------------------------------------

# Sandboxes of suspended teams paused per pass (each pause saves a VM's memory: seconds).
PAUSES_PER_PASS = 5


def suspended_sandboxes_pause(*, limit: int = PAUSES_PER_PASS) -> tuple[int, bool]:
    """Pause running sandboxes of suspended teams (disk and memory kept); (paused, more)."""
    from sandboxes.models import Sandbox, SandboxState
    from sandboxes.services import sandbox_pause

    suspended = Account.objects.filter(suspended_at__isnull=False).values("team_id")
    running = Sandbox.objects.filter(team_id__in=suspended, state=SandboxState.READY).select_related(
        "team", "host"
    )
    paused = 0
    for sandbox in running.order_by("pk")[: limit + 1][:limit]:
        try:
            # to disk: a suspended team holds no host memory
            sandbox_pause(sandbox=sandbox, reason="team suspended", to_disk=True)
            paused += 1
        except errors.DomainError:
            logger.warning(
                "billing: could not pause sandbox %s of a suspended team", sandbox.pk, exc_info=True
            )
    return paused, running.exists() and paused == limit


def billing_sweep(*, now: datetime | None = None) -> dict[str, Any]:
    """Bill the windows that ended, follow the balances (suspend, lift, alert), pause what a
    suspension stops, and write the statements of closed months."""
    from billing.metering import meter_run

    now = now or timezone.now()
    result: dict[str, Any] = meter_run(now=now)
    result.update(accounts_enforce(now=now))
    paused, more_paused = suspended_sandboxes_pause()
    result["paused"] = paused
    result["statements"] = statements_close(now=now)
    result["more"] = bool(result["more"] or more_paused)
    return result

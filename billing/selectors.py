"""Reads of billing, always for one team the caller may see."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing import stripe_gateway
from billing.metering import UNITS, micros
from billing.models import (
    Account,
    EntryKind,
    LedgerEntry,
    LineItem,
    MeterCursor,
    Statement,
    TopUp,
    UsageRecord,
)
from billing.services import (
    SUSPENDED_CACHE_KEY,
    account_of,
    format_micros,
    month_start,
    suspended_message,
)
from teams.models import Team
from watasu import errors, ids

SANDBOX_ITEMS = (LineItem.VCPU, LineItem.MEMORY, LineItem.STOPPED_DISK)
GROUPS = ("line_item", "sandbox", "day")


# --- suspension (what create, resume, builds and the edge ask) ------------------------------


def team_suspended(team_id: int) -> bool:
    """Whether the team is suspended, from the database."""
    return Account.objects.filter(team_id=team_id, suspended_at__isnull=False).exists()


def team_suspended_cached(team_id: int) -> bool:
    """`team_suspended` through the cache: at most BILLING_SUSPENSION_CACHE_SECONDS stale
    (and a suspension or lift deletes the key at once where the cache is shared)."""
    key = SUSPENDED_CACHE_KEY.format(team_id=team_id)
    cached = cache.get(key)
    if cached is None:
        cached = team_suspended(team_id)
        cache.set(key, cached, settings.BILLING_SUSPENSION_CACHE_SECONDS)
    return bool(cached)


def team_require_active(team: Team) -> None:
    """Refuse (402 `team_suspended`) what a suspended team may not do."""
    account = Account.objects.filter(team=team, suspended_at__isnull=False).first()
    if account is not None:
        raise errors.PaymentRequired(suspended_message(team, account.balance_micros))


# --- balance ---------------------------------------------------------------------------


def balance_of(team: Team, *, now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    account = account_of(team)
    spent = -(
        LedgerEntry.objects.filter(
            team=team, kind=EntryKind.USAGE, window_start__gte=month_start(now)
        ).aggregate(total=Sum("amount_micros"))["total"]
        or 0
    )
    grace_ends = (
        account.exhausted_at + timedelta(seconds=settings.BILLING_GRACE_SECONDS)
        if account.exhausted_at and settings.BILLING_ENFORCE
        else None
    )
    return {
        "team": team.slug,
        "currency": settings.PRICE_CURRENCY,
        "balance": format_micros(account.balance_micros),
        "balance_micros": account.balance_micros,
        "enforced": settings.BILLING_ENFORCE,
        "suspended": account.suspended_at is not None,
        "suspended_at": account.suspended_at,
        "exhausted_at": account.exhausted_at,
        "suspends_at": grace_ends if account.suspended_at is None else None,
        "low_balance": account.balance_micros < micros(settings.BILLING_LOW_BALANCE),
        "low_balance_threshold": format_micros(micros(settings.BILLING_LOW_BALANCE)),
        "negative_floor": format_micros(micros(settings.BILLING_NEGATIVE_FLOOR)),
        "month_to_date": format_micros(spent),
        "spend_alert": None
        if account.spend_alert_micros is None
        else format_micros(account.spend_alert_micros),
        "metered_until": dict(MeterCursor.objects.values_list("meter", "metered_until")),
        "payments": {
            "stripe": stripe_gateway.configured(),
            "publishable_key": settings.STRIPE_PUBLISHABLE_KEY or None,
        },
    }


# --- usage -----------------------------------------------------------------------------------


def parse_moment(raw: str | None, name: str, default: datetime) -> datetime:
    """An ISO date (midnight UTC) or date-time with a zone; a clear 422 otherwise."""
    if raw is None or raw == "":
        return default
    moment: datetime | None = None
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(raw)
            moment = moment.astimezone(UTC) if moment.tzinfo is not None else None
    except (ValueError, OverflowError):
        moment = None
    if moment is None or not 1970 <= moment.year <= 9998:
        raise errors.Invalid(
            f"{name} must be a date (2026-12-01) or a date-time with a zone (2026-12-01T10:00:00Z; in a "
            "URL write + as %2B), between 1970 and 9998.",
            errors=[f"{name}: invalid"],
        )
    return moment


def usage_of(
    *, team: Team, start: datetime, end: datetime, group_by: str, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """Usage records whose window starts in [start, end), grouped; keyset pages by group key."""
    if group_by not in GROUPS:
        raise errors.Invalid(f"group_by must be one of {', '.join(GROUPS)}.", errors=["group_by: invalid"])
    if end <= start:
        raise errors.Invalid("to must be after from.", errors=["to: before from"])
    records = UsageRecord.objects.filter(team=team, window_start__gte=start, window_start__lt=end)
    total = records.aggregate(amount=Sum("amount_micros"))["amount"] or 0
    rows = _grouped(records, group_by, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    token = str(rows[-1]["_key"]) if more else None
    for row in rows:
        row.pop("_key")
    summary = {"amount": format_micros(total), "amount_micros": total, "currency": settings.PRICE_CURRENCY}
    return rows, token, summary


def _grouped(
    records: QuerySet[UsageRecord], group_by: str, after: str | None, limit: int
) -> list[dict[str, Any]]:
    if group_by == "line_item":
        if after is not None:
            records = records.filter(line_item__gt=after)
        found = records.values("line_item").annotate(
            quantity=Sum("quantity"), amount=Sum("amount_micros"), windows=Count("id")
        )
        return [
            {
                "_key": row["line_item"],
                "line_item": row["line_item"],
                "unit": UNITS[LineItem(row["line_item"])],
                "quantity": row["quantity"],
                "amount": format_micros(row["amount"]),
                "amount_micros": row["amount"],
            }
            for row in found.order_by("line_item")[:limit]
        ]
    if group_by == "day":
        return _by_day(records, after, limit)
    sandboxes = records.filter(line_item__in=SANDBOX_ITEMS)
    if after is not None:
        if not after.isascii() or not after.isdigit() or len(after) > 19:
            raise errors.Invalid("next_token is not a token this API issued.")
        sandboxes = sandboxes.filter(subject_id__gt=int(after))
    subjects = list(
        sandboxes.values("subject_id").annotate(amount=Sum("amount_micros")).order_by("subject_id")[:limit]
    )
    items: dict[int, dict[str, Any]] = {row["subject_id"]: {} for row in subjects}
    detail = (
        sandboxes.filter(subject_id__in=list(items))
        .values("subject_id", "line_item")
        .annotate(quantity=Sum("quantity"), amount=Sum("amount_micros"))
    )
    for row in detail:
        items[row["subject_id"]][row["line_item"]] = {
            "quantity": row["quantity"],
            "unit": UNITS[LineItem(row["line_item"])],
            "amount": format_micros(row["amount"]),
        }
    return [
        {
            "_key": row["subject_id"],
            "sandbox_id": str(row["subject_id"]),
            "amount": format_micros(row["amount"]),
            "amount_micros": row["amount"],
            "line_items": items[row["subject_id"]],
        }
        for row in subjects
    ]


def usage_by_day_and_line_item(*, team: Team, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Usage whose window starts in [start, end), per UTC day and line item: one query, from
    which the dashboard's tables and charts take their days, line items and total."""
    rows = (
        UsageRecord.objects.filter(team=team, window_start__gte=start, window_start__lt=end)
        .annotate(day=TruncDate("window_start", tzinfo=UTC))
        .values("day", "line_item")
        .annotate(amount=Sum("amount_micros"), quantity=Sum("quantity"))
        .order_by("day", "line_item")
    )
    return [
        {
            "day": row["day"].isoformat(),
            "line_item": row["line_item"],
            "amount_micros": row["amount"],
            "quantity": row["quantity"],
        }
        for row in rows
    ]


def _by_day(records: QuerySet[UsageRecord], after: str | None, limit: int) -> list[dict[str, Any]]:
    days = records.annotate(day=TruncDate("window_start", tzinfo=UTC))
    if after is not None:
        try:
            days = days.filter(day__gt=date.fromisoformat(after))
        except ValueError as exc:
            raise errors.Invalid("next_token is not a token this API issued.") from exc
    rows = days.values("day").annotate(amount=Sum("amount_micros")).order_by("day")[:limit]
    return [
        {
            "_key": row["day"].isoformat(),
            "day": row["day"].isoformat(),
            "amount": format_micros(row["amount"]),
            "amount_micros": row["amount"],
        }
        for row in rows
    ]


# --- ledger, top-ups, statements ---------------------------------------------------------


def ledger_of(team: Team) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(team=team)


def top_ups_of(team: Team) -> QuerySet[TopUp]:
    return TopUp.objects.filter(team=team)


def top_up_of(team: Team, top_up_id: str) -> TopUp:
    pk = ids.db_id(top_up_id)
    top_up = TopUp.objects.filter(team=team, pk=pk).first() if pk is not None else None
    if top_up is None:
        raise errors.NotFound("Top-up not found.", code="top_up_not_found")
    return top_up


def tax_included(amount: int) -> int:
    """The tax contained in a tax-inclusive amount, rounded half up to the micro-euro."""
    rate = settings.BILLING_TAX_RATE or Decimal(0)
    return int((Decimal(amount) * rate / (1 + rate)).quantize(Decimal(1), rounding="ROUND_HALF_UP"))


def statement_compute(*, team: Team, period_start: date) -> dict[str, Any]:
    """A month of the team's ledger: opening, credits, usage by line item, waivers, closing.

    Usage belongs to the month its window starts in, other entries to the month of `at`.
    closing = opening + credits + adjustments - usage + waived, exactly the ledger's sum."""
    start = datetime(period_start.year, period_start.month, 1, tzinfo=UTC)
    end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    entries = LedgerEntry.objects.filter(team=team)
    windowed = Q(kind__in=[EntryKind.USAGE, EntryKind.WAIVER])
    before = Q(windowed, window_start__lt=start) | Q(~windowed, at__lt=start)
    within = Q(windowed, window_start__gte=start, window_start__lt=end) | Q(
        ~windowed, at__gte=start, at__lt=end
    )

    def total(query: Q) -> int:
        return entries.filter(query).aggregate(total=Sum("amount_micros"))["total"] or 0

    opening = total(before)
    usage = -total(within & Q(kind=EntryKind.USAGE))
    waived = total(within & Q(kind=EntryKind.WAIVER))
    adjustments = total(within & Q(kind__in=[EntryKind.REFUND, EntryKind.DISPUTE]))
    credits = total(within & Q(kind__in=[EntryKind.TOP_UP, EntryKind.GRANT, EntryKind.DISPUTE_WON]))
    lines = [
        {
            "line_item": row["line_item"],
            "unit": UNITS[LineItem(row["line_item"])],
            "quantity": row["quantity"],
            "amount": format_micros(row["amount"]),
            "amount_micros": row["amount"],
        }
        for row in UsageRecord.objects.filter(team=team, window_start__gte=start, window_start__lt=end)
        .values("line_item")
        .annotate(quantity=Sum("quantity"), amount=Sum("amount_micros"))
        .order_by("line_item")
    ]
    return {
        "period_end": end.date(),
        "currency": settings.PRICE_CURRENCY,
        "opening_micros": opening,
        "credits_micros": credits,
        "adjustments_micros": adjustments,
        "usage_micros": usage,
        "waived_micros": waived,
        "closing_micros": opening + credits + adjustments - usage + waived,
        "lines": lines,
        "tax_name": settings.BILLING_TAX_NAME,
        "tax_rate": settings.BILLING_TAX_RATE or Decimal(0),
        "tax_included_micros": tax_included(usage),
    }


def statements_of(team: Team, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Closed statements, newest first, after the current month's (open, computed live)."""
    now = now or timezone.now()
    current = month_start(now).date()
    live = {
        "team": team.slug,
        "period_start": current,
        "status": "open",
        **statement_compute(team=team, period_start=current),
    }
    closed = [
        {"status": "closed", **statement_as_dict(statement)}
        for statement in Statement.objects.filter(team=team)
        .exclude(period_start=current)
        .select_related("team")
    ]
    return [live, *closed]


def statement_as_dict(statement: Statement) -> dict[str, Any]:
    return {
        "team": statement.team.slug,
        "period_start": statement.period_start,
        "period_end": statement.period_end,
        "currency": statement.currency,
        "opening_micros": statement.opening_micros,
        "credits_micros": statement.credits_micros,
        "adjustments_micros": statement.adjustments_micros,
        "usage_micros": statement.usage_micros,
        "waived_micros": statement.waived_micros,
        "closing_micros": statement.closing_micros,
        "lines": statement.lines,
        "tax_name": statement.tax_name,
        "tax_rate": statement.tax_rate,
        "tax_included_micros": statement.tax_included_micros,
    }

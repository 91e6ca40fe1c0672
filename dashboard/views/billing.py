"""Usage & billing pages: balance, usage charts and tables, statements, ledger, top-ups.

Reads go through billing/selectors.py (the ones the API uses); the two writes, a top-up and
the spend alert, through billing/services.py. A top-up is paid in the browser with Stripe.js
(the client secret of its PaymentIntent is rendered once, into the payment page only); the
webhook credits it and the page polls the top-up's status until it does.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.views.decorators.http import require_safe

from billing import selectors, services, stripe_gateway
from billing.metering import UNITS
from billing.models import LedgerEntry, LineItem, TopUp, TopUpStatus
from billing.services import format_micros, month_start
from dashboard.access import TeamAccess, team_page
from dashboard.actions import perform
from teams.services import audit_record
from watasu import errors

LINE_ITEM_LABELS: dict[str, str] = {
    LineItem.VCPU: "vCPU",
    LineItem.MEMORY: "Memory",
    LineItem.BUILD_VCPU: "Build vCPU",
    LineItem.BUILD_MEMORY: "Build memory",
    LineItem.STOPPED_DISK: "Stopped disks",
    LineItem.CHECKPOINT: "Checkpoints",
    LineItem.TEMPLATE: "Templates",
    LineItem.VOLUME: "Volumes",
}
MAX_RANGE_DAYS = 366
EARLIEST, LATEST = date(2000, 1, 1), date(2999, 12, 31)  # usage exists in between; a day past it overflows
LEDGER_PAGE = 50
TOP_UPS_SHOWN = 100
# How often and how long a payment page asks whether the webhook credited the top-up.
POLL_SECONDS = 2
POLL_TIMES = 90


def _label(line_item: str) -> str:
    return LINE_ITEM_LABELS.get(line_item, line_item)


# --- usage -------------------------------------------------------------------------------


class RangeForm(forms.Form):
    """The usage range: whole UTC days, both ends included."""

    start = forms.DateField(required=False, label="From")
    end = forms.DateField(required=False, label="To (included)")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for field in ("start", "end"):
            day = data.get(field)
            if day is not None and not (EARLIEST <= day <= LATEST):
                self.add_error(field, f"Pick a day between {EARLIEST} and {LATEST}.")
        return data

    def days(self, today: date) -> tuple[date, date]:
        first, last = month_start(datetime(today.year, today.month, today.day, tzinfo=UTC)).date(), today
        if self.is_valid():
            first = self.cleaned_data["start"] or first
            last = self.cleaned_data["end"] or last
        if last < first:
            self.add_error("end", "The range ends before it starts.")
            return first, first
        if (last - first).days >= MAX_RANGE_DAYS:
            self.add_error("end", f"Ranges are at most {MAX_RANGE_DAYS} days.")
            return first, first + timedelta(days=MAX_RANGE_DAYS - 1)
        return first, last


def _usage(access: TeamAccess, first: date, last: date) -> dict[str, Any]:
    """Usage from `first` to `last` (included) by day, by line item and both (the charts)."""
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    cells: dict[tuple[str, str], int] = {}
    days: dict[str, int] = {}
    item_amounts: dict[str, int] = {}
    item_quantities: dict[str, int] = {}
    for row in selectors.usage_by_day_and_line_item(team=access.team, start=start, end=end):
        day, item, amount = row["day"], row["line_item"], row["amount_micros"]
        cells[(day, item)] = amount
        days[day] = days.get(day, 0) + amount
        item_amounts[item] = item_amounts.get(item, 0) + amount
        item_quantities[item] = item_quantities.get(item, 0) + row["quantity"]
    items = sorted(item_amounts)
    by_item = [
        {
            "line_item": item,
            "label": _label(item),
            "unit": UNITS[LineItem(item)],
            "quantity": item_quantities[item],
            "amount": format_micros(item_amounts[item]),
            "amount_micros": item_amounts[item],
        }
        for item in items
    ]
    by_day = [
        {
            "day": day,
            "amount": format_micros(amount),
            "amount_micros": amount,
            "cells": [
                {"line_item": item, "amount": format_micros(cells.get((day, item), 0))} for item in items
            ],
        }
        for day, amount in sorted(days.items())
    ]
    grand = sum(days.values())
    total = {"amount": format_micros(grand), "amount_micros": grand, "currency": settings.PRICE_CURRENCY}
    all_days = [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    chart = {
        "currency": settings.PRICE_CURRENCY,
        "days": all_days,
        "series": [
            {
                "line_item": item,
                "label": _label(item),
                "amounts": [cells.get((day, item), 0) / 1e6 for day in all_days],
            }
            for item in items
        ],
        "items": [{"label": _label(item), "amount": item_amounts[item] / 1e6} for item in items],
    }
    return {
        "by_day": by_day,
        "by_item": by_item,
        "items": [{"line_item": item, "label": _label(item)} for item in items],
        "total": total,
        "chart": chart,
    }


class TopUpForm(forms.Form):
    amount = forms.DecimalField(max_digits=12, decimal_places=2)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the service's own bounds (it refuses anything else too)
        low: Decimal = settings.BILLING_TOP_UP_MIN or Decimal("0.01")
        high: Decimal = settings.BILLING_TOP_UP_MAX or Decimal(10**6)
        field = self.fields["amount"]
        field.label = f"Amount ({settings.PRICE_CURRENCY})"
        self.low, self.high = low, high

    def clean_amount(self) -> Decimal:
        amount: Decimal = self.cleaned_data["amount"]
        if not self.low <= amount <= self.high:
            raise forms.ValidationError(
                f"A top-up is between {self.low} and {self.high} {settings.PRICE_CURRENCY}."
            )
        return amount


class SpendAlertForm(forms.Form):
    spend_alert = forms.DecimalField(
        max_digits=12, decimal_places=2, min_value=Decimal("0.01"), required=False, label="Spend alert"
    )


@team_page()
@require_safe
def usage(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    today = timezone.now().astimezone(UTC).date()
    range_form = RangeForm(request.GET or None)
    first, last = range_form.days(today)
    balance = selectors.balance_of(access.team)
    context = {
        "range_form": range_form,
        "first": first,
        "last": last,
        "usage": _usage(access, first, last),
        "billing": balance,
        "top_up_form": TopUpForm(initial={"amount": settings.BILLING_TOP_UP_MIN}),
        "spend_alert_form": SpendAlertForm(initial={"spend_alert": balance["spend_alert"]}),
        "payments": stripe_gateway.configured(),
    }
    return render(request, "dashboard/billing/usage.html", context)


@team_page(manage=True)
def spend_alert(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    if request.method != "POST":
        return redirect("dashboard:usage", access.team.slug)
    form = SpendAlertForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The spend alert is an amount of at least 0.01, or empty to turn it off.")
        return redirect("dashboard:usage", access.team.slug)
    amount = form.cleaned_data["spend_alert"]
    done = perform(
        request,
        lambda: services.spend_alert_set(team=access.team, amount=amount),
        success="Spend alert turned off." if amount is None else f"Spend alert set to {amount}.",
    )
    if done is not None:
        audit_record(
            team=access.team,
            actor=access.user,
            action="billing.spend_alert",
            source="dashboard",
            amount=None if amount is None else str(amount),
        )
    return redirect("dashboard:usage", access.team.slug)


# --- top-ups -------------------------------------------------------------------------------


@team_page(manage=True)
def top_up_create(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    """Create the PaymentIntent and its pending top-up, then show the payment form for it."""
    if request.method != "POST":
        return redirect("dashboard:usage", access.team.slug)
    form = TopUpForm(request.POST)
    if not form.is_valid():
        for problem in form.errors.get("amount", []):
            messages.error(request, str(problem))
        return redirect(reverse("dashboard:usage", args=[access.team.slug]) + "#top-up")
    amount = form.cleaned_data["amount"]
    created = perform(
        request, lambda: services.top_up_create(team=access.team, user=access.user, amount=amount)
    )
    if created is None:
        return redirect(reverse("dashboard:usage", args=[access.team.slug]) + "#top-up")
    top_up, client_secret = created
    audit_record(
        team=access.team,
        actor=access.user,
        action="billing.top_up",
        target=f"top-up {top_up.pk}",
        source="dashboard",
        amount=str(amount),
    )
    receipt = request.build_absolute_uri(reverse("dashboard:top-up", args=[access.team.slug, top_up.pk]))
    context = {
        "top_up": _top_up_row(top_up),
        "client_secret": client_secret,
        "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "stripe_js_url": settings.STRIPE_JS_URL,
        "return_url": receipt,
    }
    return render(request, "dashboard/billing/pay.html", context)


def _top_up_row(top_up: TopUp) -> dict[str, Any]:
    paid = top_up.succeeded_at is not None
    return {
        "id": top_up.pk,
        "status": top_up.status,
        "amount": format_micros(top_up.amount_micros),
        "refunded": format_micros(top_up.refunded_micros),
        "currency": top_up.currency,
        "created_at": top_up.created_at,
        "succeeded_at": top_up.succeeded_at,
        "created_by": top_up.created_by.email if top_up.created_by else "",
        "receipt_number": top_up.receipt_number if paid else "",
        "tax_included": format_micros(selectors.tax_included(top_up.amount_micros)) if paid else "",
    }


def _top_up_of(access: TeamAccess, top_up_id: int) -> TopUp:
    try:
        return selectors.top_up_of(access.team, str(top_up_id))
    except errors.NotFound as exc:
        raise Http404("No such top-up.") from exc


@team_page()
@require_safe
def top_ups(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    rows = selectors.top_ups_of(access.team).select_related("created_by").order_by("-id")[:TOP_UPS_SHOWN]
    return render(request, "dashboard/billing/top_ups.html", {"top_ups": [_top_up_row(t) for t in rows]})


@team_page()
@require_safe
def top_up(request: HttpRequest, access: TeamAccess, top_up_id: int) -> HttpResponse:
    """One top-up and, once paid, its receipt (Stripe's return_url after a redirect too)."""
    found = _top_up_of(access, top_up_id)
    context = {
        "top_up": _top_up_row(found),
        "tax_name": settings.BILLING_TAX_NAME,
        "tax_rate": settings.BILLING_TAX_RATE or Decimal(0),
        "status": _status_context(access, found, polls=0),
    }
    return render(request, "dashboard/billing/top_up.html", context)


def _status_context(access: TeamAccess, found: TopUp, *, polls: int) -> dict[str, Any]:
    pending = found.status == TopUpStatus.PENDING
    return {
        "top_up": _top_up_row(found),
        "url": reverse("dashboard:top-up-status", args=[access.team.slug, found.pk]),
        "polling": pending and polls < POLL_TIMES,
        "gave_up": pending and polls >= POLL_TIMES,
        "next": polls + 1,
        "delay": POLL_SECONDS,
        "balance": selectors.balance_of(access.team) if not pending else None,
    }


@team_page()
@require_safe
def top_up_status(request: HttpRequest, access: TeamAccess, top_up_id: int) -> HttpResponse:
    """The top-up's status as a fragment that asks again while the payment is pending."""
    found = _top_up_of(access, top_up_id)
    raw = request.GET.get("n", "0")
    polls = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 6 else POLL_TIMES
    context = _status_context(access, found, polls=polls)
    response = render(request, "dashboard/billing/_top_up_status.html", {"status": context})
    # one element and nothing around it: htmx 2.0.8 fails to process the new content of an
    # outerHTML swap when the response also holds a bare text node (the template's last newline)
    response.content = response.content.strip()
    return response


# --- ledger and statements --------------------------------------------------------------------


@team_page()
@require_safe
def ledger(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    """The ledger, newest first, a page at a time (`before` an entry id)."""
    entries = selectors.ledger_of(access.team).order_by("-id")
    raw = request.GET.get("before", "")
    if raw.isascii() and raw.isdigit() and len(raw) < 19:
        entries = entries.filter(id__lt=int(raw))
    page = list(entries[: LEDGER_PAGE + 1])
    more = len(page) > LEDGER_PAGE
    rows = [_entry_row(entry) for entry in page[:LEDGER_PAGE]]
    context = {"entries": rows, "before": rows[-1]["id"] if more else None}
    return render(request, "dashboard/billing/ledger.html", context)


def _entry_row(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.pk,
        "kind": entry.kind,
        "kind_label": entry.get_kind_display(),
        "amount": format_micros(entry.amount_micros),
        "credit": entry.amount_micros > 0,
        "at": entry.at,
        "window_start": entry.window_start,
        "meter": entry.meter,
        "reason": entry.reason,
        "top_up_id": entry.top_up_id,
    }


def _statement_row(row: dict[str, Any]) -> dict[str, Any]:
    money = {
        key[: -len("_micros")]: format_micros(value) for key, value in row.items() if key.endswith("_micros")
    }
    lines = [{**line, "label": _label(line["line_item"])} for line in row["lines"]]
    return {**row, **money, "lines": lines, "period": row["period_start"].strftime("%Y-%m")}


@team_page()
@require_safe
def statements(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    rows = [_statement_row(row) for row in selectors.statements_of(access.team)]
    return render(request, "dashboard/billing/statements.html", {"statements": rows})


@team_page()
@require_safe
def statement(request: HttpRequest, access: TeamAccess, period: str) -> HttpResponse:
    try:
        wanted = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC).date()
    except ValueError:
        raise Http404("Statements are named by month, e.g. 2026-12.") from None
    for row in selectors.statements_of(access.team):
        if row["period_start"] == wanted:
            return render(request, "dashboard/billing/statement.html", {"statement": _statement_row(row)})
    raise Http404(f"No statement for {period}.")


urls = [
    path("usage", usage, name="usage"),
    path("usage/spend-alert", spend_alert, name="billing-spend-alert"),
    path("usage/ledger", ledger, name="billing-ledger"),
    path("usage/top-ups", top_ups, name="top-ups"),
    path("usage/top-ups/new", top_up_create, name="top-up-create"),
    path("usage/top-ups/<int:top_up_id>", top_up, name="top-up"),
    path("usage/top-ups/<int:top_up_id>/status", top_up_status, name="top-up-status"),
    path("statements", statements, name="statements"),
    path("statements/<str:period>", statement, name="statement"),
]

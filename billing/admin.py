"""Operator views of billing: balances, the ledger (read-only; credits through a form that
goes through the service, with a reason), statements, top-ups (refund), suspended teams."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect

from billing import services
from billing.models import Account, LedgerEntry, Statement, TopUp, TopUpStatus, UsageRecord
from teams.models import Team
from watasu import errors


def _money(value: int) -> str:
    return services.format_micros(value)


class SuspendedFilter(admin.SimpleListFilter):
    title = "suspended"
    parameter_name = "suspended"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Suspended"), ("no", "Active")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Account]) -> QuerySet[Account]:
        if self.value() == "yes":
            return queryset.filter(suspended_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(suspended_at__isnull=True)
        return queryset


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("team", "balance", "suspended_at", "exhausted_at", "low_balance_notified_at")
    list_filter = (SuspendedFilter,)
    list_select_related = ("team",)
    search_fields = ("team__slug", "stripe_customer_id")
    readonly_fields = (
        "team",
        "balance",
        "stripe_customer_id",
        "exhausted_at",
        "suspended_at",
        "low_balance_notified_at",
        "spend_alert_micros",
        "spend_alert_notified_for",
        "created_at",
    )
    exclude = ("balance_micros",)

    @admin.display(description="balance", ordering="balance_micros")
    def balance(self, account: Account) -> str:
        return _money(account.balance_micros)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class GrantForm(forms.ModelForm):
    """An operator credit (or, negative, a correction): through `credit_grant`, never a raw row."""

    team = forms.ModelChoiceField(queryset=Team.objects.all())
    amount = forms.DecimalField(max_digits=14, decimal_places=6, help_text="Euros; negative to correct")
    reason = forms.CharField(max_length=500, help_text="Why: kept in the ledger and the admin log")

    class Meta:
        model = LedgerEntry
        fields: list[str] = []

    def clean_amount(self) -> Decimal:
        amount: Decimal = self.cleaned_data["amount"]
        if amount == 0:
            raise forms.ValidationError("A grant of zero changes nothing.")
        return amount


@admin.register(LedgerEntry)
class LedgerEntryAdmin(admin.ModelAdmin):
    list_display = ("at", "team", "kind", "amount", "reason", "created_by")
    list_filter = ("kind",)
    list_select_related = ("team", "created_by")
    search_fields = ("team__slug", "reason", "reference")
    date_hierarchy = "at"

    @admin.display(description="amount", ordering="amount_micros")
    def amount(self, entry: LedgerEntry) -> str:
        return _money(entry.amount_micros)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = GrantForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return [field.name for field in LedgerEntry._meta.fields]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        try:
            entry = services.credit_grant(
                team=form.cleaned_data["team"],
                amount=form.cleaned_data["amount"],
                reason=form.cleaned_data["reason"],
                by=request.user,  # type: ignore[arg-type]
            )
        except errors.DomainError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        for field in LedgerEntry._meta.concrete_fields:  # the admin's messages name the entry made
            setattr(obj, field.attname, getattr(entry, field.attname))

    def response_add(self, request: HttpRequest, obj: Any, post_url_continue: str | None = None) -> Any:
        if obj.pk is None:  # the grant was refused; its message is already shown
            return HttpResponseRedirect(request.path)
        return super().response_add(request, obj, post_url_continue)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TopUp)
class TopUpAdmin(_ReadOnly):
    list_display = ("created_at", "team", "amount", "status", "refunded", "payment_intent_id")
    list_filter = ("status",)
    list_select_related = ("team",)
    search_fields = ("team__slug", "payment_intent_id", "customer_id")
    actions = ("refund_in_full",)

    @admin.display(description="amount", ordering="amount_micros")
    def amount(self, top_up: TopUp) -> str:
        return _money(top_up.amount_micros)

    @admin.display(description="refunded")
    def refunded(self, top_up: TopUp) -> str:
        return _money(top_up.refunded_micros)

    @admin.action(description="Refund what is left of the selected top-ups to the card")
    def refund_in_full(self, request: HttpRequest, queryset: QuerySet[TopUp]) -> None:
        for top_up in queryset.filter(status=TopUpStatus.SUCCEEDED).select_related("team"):
            try:
                services.top_up_refund(top_up=top_up, amount=None, by=request.user)  # type: ignore[arg-type]
                self.message_user(request, f"Refunded {top_up.receipt_number}.")
            except errors.DomainError as exc:
                self.message_user(request, f"{top_up.receipt_number}: {exc.message}", messages.ERROR)


@admin.register(Statement)
class StatementAdmin(_ReadOnly):
    list_display = ("period_start", "team", "opening", "credits", "usage", "closing", "currency")
    list_select_related = ("team",)
    search_fields = ("team__slug",)

    def opening(self, statement: Statement) -> str:
        return _money(statement.opening_micros)

    def credits(self, statement: Statement) -> str:
        return _money(statement.credits_micros)

    def usage(self, statement: Statement) -> str:
        return _money(statement.usage_micros)

    def closing(self, statement: Statement) -> str:
        return _money(statement.closing_micros)


@admin.register(UsageRecord)
class UsageRecordAdmin(_ReadOnly):
    list_display = ("window_start", "team", "line_item", "subject_id", "quantity", "amount_micros")
    list_filter = ("line_item",)
    list_select_related = ("team",)
    search_fields = ("team__slug",)
    date_hierarchy = "window_start"

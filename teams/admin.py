"""Operator views of users, teams, memberships and API keys."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import Count, F, QuerySet
from django.http import HttpRequest

from billing.services import format_micros
from teams.models import ApiKey, IdempotencyRecord, Membership, Team, User
from teams.services import api_key_revoke, personal_team_ensure


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    ordering = ["email"]
    list_display = ["email", "is_active", "is_staff", "date_joined"]
    search_fields = ["email"]
    fieldsets = [
        (None, {"fields": ["email", "password"]}),
        ("Permissions", {"fields": ["is_active", "is_staff", "is_superuser"]}),
        ("Dates", {"fields": ["last_login", "date_joined"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "password1", "password2"]})]

    def save_model(self, request: HttpRequest, obj: User, form: object, change: bool) -> None:
        super().save_model(request, obj, form, change)
        personal_team_ensure(user=obj)


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    """Teams with their quotas (editable in the list), members, balance and suspension: the
    list is one query (annotated), whatever the number of teams."""

    list_display = [
        "slug",
        "name",
        "personal_for",
        "members",
        "balance",
        "suspended",
        "max_running_instances",
        "max_vcpu_count",
        "max_memory_mb",
        "created_at",
    ]
    list_editable = ["max_running_instances", "max_vcpu_count", "max_memory_mb"]
    list_select_related = ["personal_for"]
    search_fields = ["slug", "name"]
    readonly_fields = ["created_at"]
    inlines = [MembershipInline]
    fieldsets = [
        (None, {"fields": ["slug", "name", "personal_for", "created_at"]}),
        (
            "Quota (empty = platform default)",
            {"fields": ["max_running_instances", "max_vcpu_count", "max_memory_mb"]},
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_count=Count("memberships", distinct=True),
                account_balance_micros=F("billing_account__balance_micros"),
                account_suspended_at=F("billing_account__suspended_at"),
            )
        )

    @admin.display(description="members", ordering="member_count")
    def members(self, team: Team) -> int:
        return team.member_count  # type: ignore[attr-defined]

    @admin.display(description=f"balance ({settings.PRICE_CURRENCY})", ordering="account_balance_micros")
    def balance(self, team: Team) -> str:
        value = team.account_balance_micros  # type: ignore[attr-defined]
        return "-" if value is None else format_micros(value)

    @admin.display(boolean=True, description="suspended", ordering="account_suspended_at")
    def suspended(self, team: Team) -> bool:
        return team.account_suspended_at is not None  # type: ignore[attr-defined]


@admin.action(description="Revoke selected API keys")
def revoke_keys(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
    for key in queryset:
        api_key_revoke(api_key=key)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "prefix",
        "user",
        "name",
        "scope",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    ]
    list_select_related = ["user"]
    list_filter = ["scope"]
    search_fields = ["prefix", "user__email", "name"]
    readonly_fields = ["prefix", "key_hash", "created_at", "last_used_at", "revoked_at"]
    actions = [revoke_keys]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # keys are minted by `create_api_key` or the API, which show the key once


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin):
    list_display = ["key", "api_key", "state", "response_status", "created_at", "expires_at"]
    list_select_related = ["api_key"]
    search_fields = ["key"]
    # The stored response is encrypted and may hold a session token or a new key.
    exclude = ["response_body"]
    readonly_fields = [f.name for f in IdempotencyRecord._meta.fields if f.name != "response_body"]

"""Filters of the team and API key lists (API and dashboard)."""

from __future__ import annotations

import django_filters

from teams.models import ApiKey, Scope, Team
from watasu.filtering import StrictBooleanFilter


class TeamFilter(django_filters.FilterSet):
    personal = StrictBooleanFilter(
        field_name="personal_for",
        lookup_expr="isnull",
        exclude=True,
        label="true: only the caller's personal team; false: the others",
    )

    class Meta:
        model = Team
        fields: list[str] = []


class ApiKeyFilter(django_filters.FilterSet):
    scope = django_filters.ChoiceFilter(choices=Scope.choices, label="read or write")
    revoked = StrictBooleanFilter(
        field_name="revoked_at",
        lookup_expr="isnull",
        exclude=True,
        label="true: only revoked keys; false: only live ones",
    )

    class Meta:
        model = ApiKey
        fields: list[str] = []

"""Filters of the template lists (API and dashboard)."""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from templates_app.models import Template, TemplateVersion, VersionStatus, Visibility


class TemplateFilter(django_filters.FilterSet):
    visibility = django_filters.ChoiceFilter(
        choices=Visibility.choices,
        method="filter_visibility",
        label="provider (the platform's) or team (a team's own)",
    )

    class Meta:
        model = Template
        fields: list[str] = []

    def filter_visibility(self, queryset: QuerySet[Template], name: str, value: str) -> QuerySet[Template]:
        # a provider template is one without a team (`Template.visibility`)
        return queryset.filter(team__isnull=value == Visibility.PROVIDER)


class TemplateVersionFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(
        choices=VersionStatus.choices, label="Build status; repeatable"
    )

    class Meta:
        model = TemplateVersion
        fields: list[str] = []

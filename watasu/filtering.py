"""What list filters share, in the API and in the dashboard's list pages.

Each listable model has one `django_filters.FilterSet` in its app's `filters.py`; a list
applies it to a queryset already scoped to the caller's teams (selectors do the scoping,
filters only narrow). A value a filter cannot read is refused, never ignored: a typo in a
filter must not silently list everything.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter

from watasu import errors

BOOLEAN_CHOICES = (("true", "true"), ("false", "false"))


class StrictBooleanFilter(django_filters.ChoiceFilter):
    """`true` or `false`, nothing else (django-filter's BooleanFilter reads `yes` as no filter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("choices", BOOLEAN_CHOICES)
        super().__init__(*args, **kwargs)

    def filter(self, qs: QuerySet[Any], value: Any) -> QuerySet[Any]:
        if value in ("", None):
            return qs
        return super().filter(qs, value == "true")


def filter_or_refuse(filterset: django_filters.FilterSet) -> QuerySet[Any]:
    """The filtered queryset, or a 422 `validation_failed` naming each bad parameter."""
    if not filterset.is_valid():
        lines = [f"{name}: {message}" for name, messages in filterset.errors.items() for message in messages]
        raise errors.Invalid("; ".join(lines), errors=lines)
    return filterset.qs


def openapi_parameters(filterset_class: type[django_filters.FilterSet]) -> list[OpenApiParameter]:
    """The query parameters of a FilterSet, for `extend_schema(parameters=...)`."""
    parameters = []
    for name, item in filterset_class.base_filters.items():
        choices = item.extra.get("choices")
        parameters.append(
            OpenApiParameter(
                name,
                str,
                many=isinstance(item, django_filters.MultipleChoiceFilter),
                enum=[value for value, _ in choices] if choices else None,
                description=item.label or "",
            )
        )
    return parameters

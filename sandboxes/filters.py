"""The sandbox list's filters: states (or the SDK's `running`/`paused`) and exact metadata.

`SandboxFilter` reads plain parameters (`state=running&state=ready`, a `metadata` dict),
so a dashboard form can use it as it is; `SandboxFilter.from_sdk_query` reads the SDK's
bracketed ones (`query[state][]=running&query[metadata][job]=a`).
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db.models import QuerySet
from django.db.models.fields.json import KeyTransform
from django.http import QueryDict

from sandboxes.models import Sandbox, SandboxState
from sandboxes.selectors import STATE_ALIASES

STATE_PARAM = "query[state][]"
METADATA_PREFIX, METADATA_SUFFIX = "query[metadata][", "]"
STATE_CHOICES = [*SandboxState.choices, *((alias, alias) for alias in STATE_ALIASES)]
MAX_METADATA_FILTERS = 64


class MetadataField(forms.Field):
    """A dict of metadata key -> exact value (keys as stored: any text, `__` included)."""

    def to_python(self, value: Any) -> dict[str, str]:
        if value in (None, ""):
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise forms.ValidationError("must map metadata keys to values.")
        if len(value) > MAX_METADATA_FILTERS:
            raise forms.ValidationError(f"at most {MAX_METADATA_FILTERS} metadata keys.")
        if any(not key for key in value):
            raise forms.ValidationError("a metadata key must not be empty.")
        return value


class MetadataFilter(django_filters.Filter):
    field_class = MetadataField

    def filter(self, qs: QuerySet[Any], value: dict[str, str]) -> QuerySet[Any]:
        for index, (key, item) in enumerate((value or {}).items()):
            # KeyTransform takes the key verbatim (a key may contain "__").
            alias = f"metadata_filter_{index}"
            qs = qs.alias(**{alias: KeyTransform(key, "metadata")}).filter(**{alias: item})
        return qs


class StateFilter(django_filters.MultipleChoiceFilter):
    """States or their aliases; none given: every state but `destroyed`."""

    def filter(self, qs: QuerySet[Any], value: list[str]) -> QuerySet[Any]:
        if not value:
            return qs.exclude(state=SandboxState.DESTROYED)
        states = set().union(*(STATE_ALIASES.get(item, {item}) for item in value))
        return qs.filter(state__in=states)


class SandboxFilter(django_filters.FilterSet):
    state = StateFilter(
        choices=STATE_CHOICES,
        label="State or alias (running, paused); repeatable",
        error_messages={
            "invalid_choice": "Unknown state '%(value)s'; use one of "
            + ", ".join(value for value, _ in STATE_CHOICES)
            + "."
        },
    )
    metadata = MetadataFilter(label="Exact match on metadata keys")

    class Meta:
        model = Sandbox
        fields: list[str] = []

    @classmethod
    def from_sdk_query(cls, query: QueryDict, queryset: QuerySet[Sandbox]) -> SandboxFilter:
        metadata = {
            key[len(METADATA_PREFIX) : -len(METADATA_SUFFIX)]: value
            for key, value in query.items()
            if key.startswith(METADATA_PREFIX)
            and key.endswith(METADATA_SUFFIX)
            and len(key) > len(METADATA_PREFIX) + len(METADATA_SUFFIX)
        }
        return cls({"state": query.getlist(STATE_PARAM), "metadata": metadata}, queryset=queryset)

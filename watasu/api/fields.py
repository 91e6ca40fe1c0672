"""Serializer fields and checks shared by the control-plane APIs."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import serializers

from watasu import suggest

# C0 and C1 control characters and DEL: never part of a name, slug, key or id.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control_characters(value: str) -> bool:
    return CONTROL_CHARACTERS.search(value) is not None


def no_control_characters(value: str) -> None:
    if has_control_characters(value):
        raise serializers.ValidationError("must not contain control characters.")


class NameField(serializers.CharField):
    """A human-readable name: bounded length, no control characters."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validators.append(no_control_characters)


class ClosedSerializer(serializers.Serializer):
    """A body the platform defines: a key it does not know is a 422 naming the key and the
    closest known one (`scop` once minted a write key where a read key was meant)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            suggest.refuse_unknown_keys(data, self.fields, where=self.field_name or "")
        return super().to_internal_value(data)

"""Serializer fields and checks shared by the control-plane APIs."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import serializers

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

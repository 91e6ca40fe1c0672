"""Serializer fields and checks shared by the control-plane APIs."""

from __future__ import annotations

import math
import re
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.settings import api_settings

from watasu import ids, suggest

# C0 and C1 control characters and DEL: never part of a name, slug, key or id.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control_characters(value: str) -> bool:
    return CONTROL_CHARACTERS.search(value) is not None


def no_control_characters(value: str) -> None:
    if has_control_characters(value):
        raise serializers.ValidationError("must not contain control characters.")


class NameField(serializers.CharField):
    """A human-readable name: bounded length, no control characters, kept as sent (never
    trimmed: `"lab\n"` is refused, not silently turned into `"lab"`)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        self.validators.append(no_control_characters)


class ClosedSerializer(serializers.Serializer):
    """A body the platform defines: a key it does not know is a 422 naming the key and the
    closest known one (`scop` once minted a write key where a read key was meant)."""

    unknown_code = "unknown_field"

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            suggest.refuse_unknown_keys(
                data, self.fields, where=self.field_name or "", code=self.unknown_code
            )
        return super().to_internal_value(data)


def refusal(message: str, code: str = "validation_failed") -> serializers.ValidationError:
    """A serializer error with a whole message that names its field, and the API error code
    it answers with (`watasu.api.errors.REQUEST_CODES` lists those codes)."""
    return serializers.ValidationError(message, code=code)


def body_refusal(message: str, code: str = "validation_failed") -> serializers.ValidationError:
    """`refusal` for a serializer's `to_internal_value`, where errors must be keyed."""
    return serializers.ValidationError({api_settings.NON_FIELD_ERRORS_KEY: [ErrorDetail(message, code=code)]})


def whole(value: Any) -> bool:
    """A JSON number without a fraction (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


class LenientField(serializers.Field):
    """A field whose JSON null means absent (clients send `null` for options they leave out)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(OpenApiTypes.BOOL)
class StrictBooleanField(LenientField):
    """JSON true or false only (DRF's BooleanField also reads "yes", 1 and "on")."""

    def __init__(self, *, code: str = "validation_failed", **kwargs: Any) -> None:
        self.code = code
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            raise refusal(f"{self.field_name} must be true or false.", self.code)
        return data


@extend_schema_field(OpenApiTypes.INT)
class SecondsField(LenientField):
    """A whole number of seconds between `minimum` and `maximum` (a setting's name, read per
    request, or a number). Fractions, non-finite and out-of-range numbers are refused."""

    def __init__(
        self, *, code: str = "validation_failed", maximum: str | int | None = None, **kwargs: Any
    ) -> None:
        self.code, self.maximum = code, maximum
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        limit = getattr(settings, self.maximum) if isinstance(self.maximum, str) else self.maximum
        if limit is None:
            if not whole(data) or data < 1:
                raise refusal(f"{self.field_name} must be a positive whole number of seconds.", self.code)
            return int(data)
        if not whole(data):
            raise refusal(f"{self.field_name} must be a whole number of seconds.", self.code)
        if not 1 <= data <= limit:
            raise refusal(f"{self.field_name} must be between 1 and {limit} seconds.", self.code)
        return int(data)


@extend_schema_field(OpenApiTypes.STR)
class OptionalTextField(LenientField):
    """A non-empty string (or a JSON integer, read as its digits) of at most `max_length`
    characters without control characters."""

    def __init__(self, *, max_length: int, **kwargs: Any) -> None:
        self.max_length = max_length
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        name = self.field_name
        if not isinstance(data, str | int) or isinstance(data, bool) or str(data) == "":
            raise refusal(f"{name} must be a non-empty string.")
        text = str(data)
        if len(text) > self.max_length:
            raise refusal(f"{name} must be at most {self.max_length} characters.")
        if has_control_characters(text):
            raise refusal(f"{name} must not contain control characters.")
        return text


@extend_schema_field(OpenApiTypes.INT)
class IdField(LenientField):
    """A database id: a positive JSON integer or its ASCII digits, within bigint."""

    def to_internal_value(self, data: Any) -> int:
        pk = ids.db_id(data)
        if pk is None:
            raise refusal(f"{self.field_name} must be an integer id.")
        return pk


class FullMatchField(serializers.CharField):
    """A string the whole of which matches `pattern` (`re.fullmatch`: DRF's RegexField and
    SlugField search with `$`, which lets a trailing newline through)."""

    def __init__(self, pattern: str | re.Pattern[str], *, message: str, **kwargs: Any) -> None:
        self.pattern = re.compile(pattern)
        self.message = message
        kwargs.setdefault("trim_whitespace", False)  # "lab\n" is refused, never read as "lab"
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        text = super().to_internal_value(data)
        if not self.pattern.fullmatch(text):
            raise serializers.ValidationError(self.message, code="invalid")
        return text


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
class JsonObjectField(LenientField):
    """Schema type of an object of strings checked by its serializer (metadata, env)."""

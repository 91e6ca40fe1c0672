"""OpenAPI helpers: bearer auth and the list envelopes."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import inline_serializer
from rest_framework import serializers


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "teams.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "Team API key (wsk_...)"}


def list_envelope(name: str, envelope: str, item: serializers.Serializer) -> serializers.Serializer:
    """`{<envelope>: [item, ...], "next_token": str|null}`."""
    return inline_serializer(name, {
        envelope: serializers.ListField(child=item),
        "next_token": serializers.CharField(allow_null=True),
    })


def object_envelope(name: str, key: str, item: serializers.Serializer) -> serializers.Serializer:
    """`{<key>: item}`."""
    return inline_serializer(name, {key: item})

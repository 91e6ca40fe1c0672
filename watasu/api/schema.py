"""OpenAPI helpers: bearer auth, the list envelopes, the schema view and its docs page."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import extend_schema, inline_serializer
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from watasu import errors
from watasu.api.views import OnlyItsMethods


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "teams.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "Team API key (wsk_...)"}


def list_envelope(name: str, envelope: str, item: serializers.Serializer) -> serializers.Serializer:
    """`{<envelope>: [item, ...], "next_token": str|null}`."""
    return inline_serializer(
        name,
        {
            envelope: serializers.ListField(child=item),
            "next_token": serializers.CharField(allow_null=True),
        },
    )


def object_envelope(name: str, key: str, item: serializers.Serializer) -> serializers.Serializer:
    """`{<key>: item}`."""
    return inline_serializer(name, {key: item})


class _JsonErrors:
    """Errors of a view that renders something else (YAML, HTML) are JSON in the API's shape."""

    def handle_exception(self, exc: Exception) -> Response:
        self.request.accepted_renderer = JSONRenderer()  # type: ignore[attr-defined]
        self.request.accepted_media_type = "application/json"  # type: ignore[attr-defined]
        return super().handle_exception(exc)  # type: ignore[misc]


class SchemaView(_JsonErrors, OnlyItsMethods, SpectacularAPIView):
    """`GET /v1/schema`: the OpenAPI document (YAML, or JSON with `?format=json`).

    Its errors (405, a bad `lang`) are JSON in the API's error shape, not YAML, and `lang`
    must be one of the configured languages (it is otherwise used to look up files).
    """

    @extend_schema(exclude=True)  # like SpectacularAPIView's own get (SERVE_INCLUDE_SCHEMA off)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        lang = request.query_params.get("lang")
        if lang and lang not in dict(settings.LANGUAGES):
            raise errors.Invalid(
                "lang must be one of the configured language codes.", errors=["lang: invalid"]
            )
        return super().get(request, *args, **kwargs)

    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = "application/json"
        return super().options(request, *args, **kwargs)


class DocsView(_JsonErrors, OnlyItsMethods, SpectacularSwaggerView):
    """`GET /v1/docs`: Swagger UI over `/v1/schema`, readable without a key.

    Its scripts and styles come from `drf-spectacular-sidecar` under STATIC_URL, never from
    a CDN: the platform runs where the internet may not be reachable. (Redoc is not served:
    its page loads web fonts from Google.)
    """

    url_name = "schema"

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        lang = request.query_params.get("lang")
        if lang and lang not in dict(settings.LANGUAGES):  # passed on to the schema URL
            raise errors.Invalid(
                "lang must be one of the configured language codes.", errors=["lang: invalid"]
            )
        return super().get(request, *args, **kwargs)

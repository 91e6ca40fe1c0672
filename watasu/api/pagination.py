"""`limit` / `next_token` keyset pagination, newest first.

The token is the id of the last row of the page (the docs show numeric
tokens); clients treat it as opaque. Keyset pages cost the same query at any
depth, unlike offsets.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response

from watasu import errors, ids


def parse_limit(raw: str | None) -> int:
    """Default when absent, clamped to the maximum, positive integers only."""
    if raw is None or raw == "":
        return settings.API_PAGE_SIZE_DEFAULT
    value = ids.count(raw)
    if value is None or value < 1:
        raise errors.Invalid(
            "limit must be a positive integer.", errors=["limit: must be a positive integer"]
        )
    return min(value, settings.API_PAGE_SIZE_MAX)


def parse_next_token(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    token = ids.db_id(raw)
    if token is None:
        raise errors.Invalid("next_token is not a token this API issued.", errors=["next_token: invalid"])
    return token


class NextTokenPagination(BasePagination):
    """Pages of `limit` rows ordered by descending id; `next_token` iff more rows exist."""

    def paginate_queryset(self, queryset: QuerySet[Any], request: Request, view: Any = None) -> list[Any]:
        limit = parse_limit(request.query_params.get("limit"))
        after = parse_next_token(request.query_params.get("next_token"))
        self.envelope = getattr(view, "envelope", "results")
        if after is not None:
            queryset = queryset.filter(pk__lt=after)
        rows = list(queryset.order_by("-pk")[: limit + 1])
        self.next_token = str(rows[limit - 1].pk) if len(rows) > limit else None
        return rows[:limit]

    def get_paginated_response(self, data: Any) -> Response:
        return Response({self.envelope: data, "next_token": self.next_token})

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "results": schema,
                "next_token": {"type": "string", "nullable": True},
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": settings.API_PAGE_SIZE_MAX},
            },
            {"name": "next_token", "in": "query", "required": False, "schema": {"type": "string"}},
        ]

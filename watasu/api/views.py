"""Base classes for control-plane views."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.views import APIView

from teams.models import User
from watasu.api.pagination import NextTokenPagination


def team_param(request: Request) -> str | None:
    """The `team` slug from the query string, or from a JSON body on mutations."""
    slug = request.query_params.get("team")
    if not slug and isinstance(request.data, dict):
        slug = request.data.get("team")
    return str(slug) if slug else None


class ApiView(APIView):
    """An API view whose caller is always a user authenticated by an API key.

    List views set `envelope` (the key of the list in the response body) and
    answer with `self.paginated(...)`.
    """

    envelope = "results"

    @property
    def user(self) -> User:
        return self.request.user  # type: ignore[return-value]

    def paginated(self, queryset: QuerySet[Any], serializer_class: type[BaseSerializer[Any]]) -> Response:
        paginator = NextTokenPagination()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)

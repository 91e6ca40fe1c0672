"""Base classes for control-plane views."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework.exceptions import MethodNotAllowed
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.views import APIView

from teams.models import User
from watasu import errors
from watasu.api.pagination import NextTokenPagination


def team_param(request: Request, body: Any = None) -> str | None:
    """The `team` slug of `body` if it names one, else of the query string, else of the
    JSON body on mutations. A team that is not a string is a 422."""
    data = request.data if request.method not in SAFE_METHODS else None
    for source in (body, request.query_params, data):
        slug = source.get("team") if isinstance(source, dict) else None
        if slug is not None and not isinstance(slug, str):
            raise errors.Invalid("team must be a team slug.", errors=["team: must be a string"])
        if slug:
            return slug
    return None


class OnlyItsMethods:
    """A route answers the methods it implements and a 405 for any other, whoever asks:
    the method is checked before the key (a read key or no key does not turn a 405 into
    a 403 or 401). OPTIONS is not answered: its metadata would describe views, not the API."""

    metadata_class = None

    @property
    def allowed_methods(self) -> list[str]:
        return [m for m in super().allowed_methods if m != "OPTIONS"]  # type: ignore[misc]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if request.method not in self.allowed_methods:
            raise MethodNotAllowed(request.method)
        super().initial(request, *args, **kwargs)  # type: ignore[misc]


class ApiView(OnlyItsMethods, APIView):
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

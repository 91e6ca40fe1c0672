"""Control-plane authentication: `Authorization: Bearer <api key>`."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from teams.models import ApiKey, User
from teams.services import api_key_authenticate


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuthentication(BaseAuthentication):
    """Resolves the bearer key to its user; `request.auth` is the ApiKey."""

    def authenticate(self, request: Request) -> tuple[User, ApiKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        token = bearer_token(header)
        if token is None:
            raise exceptions.AuthenticationFailed("Authorization must be 'Bearer <api key>'.")
        key = api_key_authenticate(raw_key=token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key.")
        return key.user, key

    def authenticate_header(self, request: Any) -> str:
        # Makes DRF answer 401 (not 403) to a missing or bad key.
        return 'Bearer realm="api"'

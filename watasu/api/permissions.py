"""The capability of the API key: read keys may only read."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from teams.models import ApiKey


class ApiKeyScope(BasePermission):
    """Every request needs a key; mutations need a write key (403 otherwise)."""

    message = "This API key is read-only; mutations need a write key."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not isinstance(request.auth, ApiKey):
            return False  # DRF turns this into 401 via authenticate_header
        return request.method in SAFE_METHODS or request.auth.can_write


class AnyApiKey(BasePermission):
    """Any valid key, read or write: for POSTs that only read (e.g. a signed download URL)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, ApiKey)

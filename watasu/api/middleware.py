"""Refusals of hostile `/v1/` requests before any view runs, in the API's error shape.

- a Content-Length above DATA_UPLOAD_MAX_MEMORY_SIZE: 413 before a byte is read;
- a NUL in the path: 404 (no id or slug contains one, and PostgreSQL cannot compare one);
- a NUL in a query parameter's name or value: 422 naming the parameter;
- a query string Django refuses (too many fields): 400.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.http import HttpRequest, HttpResponse, JsonResponse

from watasu.api.errors import error_body, json_400, payload_too_large

API_PREFIX = "/v1/"


def _content_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


def _nul_parameter(request: HttpRequest) -> str | None:
    for key, values in request.GET.lists():
        if "\x00" in key or any("\x00" in value for value in values):
            return key.replace("\x00", "\\u0000")[:100]
    return None


class ApiInputMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and _content_length(request) > limit:
            return JsonResponse(error_body("payload_too_large", str(payload_too_large().detail)), status=413)
        if "\x00" in request.path:
            return JsonResponse(error_body("not_found", "Not found."), status=404)
        try:
            parameter = _nul_parameter(request)
        except SuspiciousOperation as exc:
            return json_400(request, exc)
        if parameter is not None:
            message = f"Query parameter '{parameter}' must not contain NUL characters."
            return JsonResponse(error_body("validation_failed", message, errors=[message]), status=422)
        return self.get_response(request)

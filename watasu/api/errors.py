"""One error shape for the whole API: `{"error": code, "message": text, ...}`.

`exception_handler` is DRF's hook; `json_400`/`json_404`/`json_500` cover what Django
answers before or after DRF (a bad Host header or an oversized body, unknown URLs,
crashes), so that no answer is an HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

from watasu import errors as domain

logger = logging.getLogger(__name__)


class PayloadTooLarge(drf.APIException):
    status_code = 413
    default_code = "payload_too_large"


def payload_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")


_DRF_CODES: list[tuple[type[drf.APIException], int, str]] = [
    (drf.NotAuthenticated, 401, "unauthorized"),
    (drf.AuthenticationFailed, 401, "unauthorized"),
    (drf.PermissionDenied, 403, "forbidden"),
    (drf.NotFound, 404, "not_found"),
    (drf.MethodNotAllowed, 405, "method_not_allowed"),
    (drf.NotAcceptable, 406, "not_acceptable"),
    (drf.UnsupportedMediaType, 415, "unsupported_media_type"),
    (drf.Throttled, 429, "rate_limited"),
    (drf.ParseError, 400, "bad_request"),
    (PayloadTooLarge, 413, "payload_too_large"),
]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, **extra}


# The error codes a request serializer refuses a value with (`watasu.api.fields.refusal`).
# Such a message is whole: it names its field itself. Any other code is one of DRF's own
# (`required`, `max_length`, `invalid`...): its message gets the field's path in front and
# the answer's code is `validation_failed`.
REQUEST_CODES = frozenset(
    {
        "validation_failed",
        "invalid_timeout",
        "invalid_lifecycle",
        "invalid_resources",
        "invalid_path",
        "invalid_volume_mounts",
        "invalid_mode",
        "invalid_argument",
        "mcp_unavailable",
        "invalid_mcp",
        "network_rules_unavailable",
        "invalid_network_policy",
        "unknown_field",
    }
)


def _error_items(detail: Any, prefix: str = "") -> list[tuple[str, drf.ErrorDetail]]:
    """DRF's nested error dict/list as (field path, error) pairs, in field order."""
    if isinstance(detail, dict):
        items: list[tuple[str, drf.ErrorDetail]] = []
        for field, value in detail.items():
            name = f"{prefix}.{field}" if prefix else str(field)
            if field == "non_field_errors":
                name = prefix
            items.extend(_error_items(value, name))
        return items
    if isinstance(detail, list):
        return [item for entry in detail for item in _error_items(entry, prefix)]
    return [(prefix, detail)]


def _line(path: str, error: drf.ErrorDetail) -> str:
    if getattr(error, "code", None) in REQUEST_CODES or not path:
        return str(error)
    return f"{path}: {error}"


def _validation_response(exc: drf.ValidationError) -> Response:
    items = _error_items(exc.detail)
    errors = [_line(path, error) for path, error in items]
    message = "; ".join(errors) or "Invalid request."
    first = getattr(items[0][1], "code", None) if items else None
    code = first if first in REQUEST_CODES else "validation_failed"
    return Response(error_body(code, message, errors=errors), status=422)


def _domain_response(exc: domain.DomainError) -> Response:
    return Response(error_body(exc.code, exc.message, **exc.extra), status=exc.status)


def _drf_response(exc: drf.APIException) -> Response:
    status, code = next(
        ((s, c) for cls, s, c in _DRF_CODES if isinstance(exc, cls)),
        (exc.status_code, "error"),
    )
    headers = {}
    if isinstance(exc, drf.Throttled) and exc.wait is not None:
        headers["Retry-After"] = str(int(exc.wait) + 1)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return Response(error_body(code, str(detail)), status=status, headers=headers)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler producing the shared error shape."""
    if isinstance(exc, domain.DomainError):
        return _domain_response(exc)
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "Not found."), status=404)
    if isinstance(exc, DjangoPermissionDenied):
        return Response(error_body("forbidden", "Permission denied."), status=403)
    if isinstance(exc, drf.ValidationError):
        return _validation_response(exc)
    if isinstance(exc, drf.APIException):
        return _drf_response(exc)
    if isinstance(exc, SuspiciousOperation):  # e.g. RequestDataTooBig, TooManyFieldsSent
        return _drf_response(_suspicious(exc))
    return None  # a crash: Django's handler500 (json_500) answers


def _suspicious(exc: SuspiciousOperation) -> drf.APIException:
    if isinstance(exc, RequestDataTooBig):
        return payload_too_large()
    if isinstance(exc, DisallowedHost):
        return drf.ParseError("Invalid Host header.")
    return drf.ParseError("Bad request.")


def json_400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """Django's own 400s (SuspiciousOperation): never call request.get_host() here."""
    error = _suspicious(exception) if isinstance(exception, SuspiciousOperation) else drf.ParseError()
    status, code = next((s, c) for cls, s, c in _DRF_CODES if isinstance(error, cls))
    return JsonResponse(error_body(code, str(error.detail)), status=status)


def json_404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("not_found", f"No route for {request.path}."), status=404)


def json_403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("forbidden", "Forbidden."), status=403)


def json_500(request: HttpRequest) -> JsonResponse:
    return JsonResponse(error_body("internal_error", "Internal server error."), status=500)

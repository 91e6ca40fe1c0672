"""The one family of domain exceptions raised by services and selectors.

Domain code never imports the API layer. Each class carries the HTTP status it
means (`status`) and its default code: the API's one exception handler and the edge
read them from here and render `{"error": code, "message": ...}` plus any extra
fields (for example `quota`). A new kind of error is a new class here, never a
table beside a handler.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: a machine-readable code, a human message and extra context."""

    status = 500
    code = "error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class NotFound(DomainError):
    """The object does not exist or is not visible to the caller's teams."""

    status = 404
    code = "not_found"


class BadRequest(DomainError):
    """The request itself cannot be read (a webhook whose signature does not verify)."""

    status = 400
    code = "bad_request"


class Invalid(DomainError):
    """The request is well-formed but asks for something not allowed."""

    status = 422
    code = "validation_failed"


class Conflict(DomainError):
    """The object is in a state where the action cannot happen now."""

    status = 409
    code = "conflict"


class Forbidden(DomainError):
    """The caller is known but may not do this."""

    status = 403
    code = "forbidden"


class PaymentRequired(DomainError):
    """The team's balance does not allow the action."""

    status = 402
    code = "team_suspended"


class Unavailable(DomainError):
    """A dependency (runtime host, guest agent) cannot serve the request now."""

    status = 503
    code = "service_unavailable"


class TooLarge(DomainError):
    """What the request moves is over a stated limit."""

    status = 413
    code = "payload_too_large"


class InsufficientStorage(DomainError):
    """The storage the request writes to is full."""

    status = 507
    code = "not_enough_space"


class BadGateway(DomainError):
    """A helper the platform runs (a guest, a storage tool) answered with something unusable."""

    status = 502
    code = "bad_gateway"

"""The one family of domain exceptions raised by services and selectors.

Domain code never imports the API layer; the API's exception handler maps
each class to an HTTP status and renders `{"error": code, "message": ...}`
plus any extra fields (for example `quota`).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: a machine-readable code, a human message and extra context."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class NotFound(DomainError):
    """The object does not exist or is not visible to the caller's teams."""

    code = "not_found"


class Invalid(DomainError):
    """The request is well-formed but asks for something not allowed."""

    code = "validation_failed"


class Conflict(DomainError):
    """The object is in a state where the action cannot happen now."""

    code = "conflict"


class Forbidden(DomainError):
    """The caller is known but may not do this."""

    code = "forbidden"


class PaymentRequired(DomainError):
    """The team's balance does not allow the action."""

    code = "team_suspended"


class Unavailable(DomainError):
    """A dependency (runtime host, guest agent) cannot serve the request now."""

    code = "service_unavailable"

"""Running a service from a page: its domain error becomes a message, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.contrib import messages
from django.http import HttpRequest

from watasu import errors

T = TypeVar("T")


def perform(request: HttpRequest, action: Callable[[], T], *, success: str = "") -> T | None:
    """Call `action`; on a domain error show its message and return None."""
    try:
        result = action()
    except errors.DomainError as exc:
        messages.error(request, exc.message)
        return None
    if success:
        messages.success(request, success)
    return result

"""Error pages: HTML under /dashboard/, the API's JSON error shape everywhere else."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from watasu.api import errors as api_errors

PREFIX = "/dashboard/"


def _page(request: HttpRequest, status: int, title: str, message: str) -> HttpResponse:
    context = {"status": status, "title": title, "message": message}
    return render(request, "dashboard/error.html", context, status=status)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith(PREFIX):
        return _page(
            request, 404, "Not found", "There is nothing here, or it belongs to a team you are not in."
        )
    return api_errors.json_404(request, exception)


def forbidden(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith(PREFIX):
        message = str(exception) if exception and str(exception) else "Your role may not do this."
        return _page(request, 403, "Not allowed", message)
    return api_errors.json_403(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith(PREFIX):
        return _page(request, 500, "Something broke", "The error was logged. Try again in a moment.")
    return api_errors.json_500(request)

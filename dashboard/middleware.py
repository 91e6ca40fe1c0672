"""A Content-Security-Policy for the dashboard's pages (any Django version).

Scripts only from the app itself and Stripe.js; no inline scripts; sockets and fetches to
the platform itself and the sandboxes' data planes; Stripe's frames; nobody may frame the
dashboard. A page that breaks a rule logs it in the browser's console, which the browser
tests fail on.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def policy() -> str:
    stripe = _origin(settings.STRIPE_JS_URL)
    public = urlsplit(settings.PUBLIC_URL)
    sockets = f"{'wss' if public.scheme == 'https' else 'ws'}://{public.netloc}"
    data_planes = ""
    if settings.DATA_PLANE_DOMAIN:
        scheme = settings.DATA_PLANE_SCHEME
        ws = "wss" if scheme == "https" else "ws"
        data_planes = f" {scheme}://*.sandbox.{settings.DATA_PLANE_DOMAIN} {ws}://*.sandbox.{settings.DATA_PLANE_DOMAIN}"
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src 'self' {stripe}".strip(),
            # htmx adds its indicator style; xterm.js and Chart.js set element styles
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "font-src 'self' data:",
            f"connect-src 'self' {sockets}{data_planes} {stripe}".strip(),
            f"frame-src {stripe or 'none'}",
            "frame-ancestors 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            "object-src 'none'",
        ]
    )


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path.startswith("/dashboard/"):
            if "Content-Security-Policy" not in response:
                response["Content-Security-Policy"] = policy()
            if "Cache-Control" not in response:  # a team's pages are never kept by a shared cache
                patch_cache_control(response, private=True, no_cache=True)
        return response

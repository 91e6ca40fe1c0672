"""Rate limits on the control plane: per API key, 429 `rate_limited` with `Retry-After`.

The rate (`WATASU_API_RATE_LIMIT`, e.g. `1200/min`; empty: off) is read on every request,
and counted in the shared cache (Redis when `REDIS_URL` is set, so every web process
counts together; per process on the embedded defaults). The data plane is not limited
here: its traffic is the sandbox's own, bounded by the edge per sandbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

if TYPE_CHECKING:  # DRF imports this module while loading its views
    from rest_framework.request import Request


class ApiKeyRateThrottle(SimpleRateThrottle):
    scope = "api_key"

    def get_rate(self) -> str | None:
        return settings.API_RATE_LIMIT or None

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        key = request.auth
        if key is None or not hasattr(key, "key_hash"):
            return None  # unauthenticated: refused with 401 before it costs anything
        return f"throttle:api_key:{key.key_hash}"

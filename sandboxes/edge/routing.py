"""Which requests the edge serves, and where on the agent they go.

Paths are taken from `raw_path` (still percent-encoded) so process ids that
the SDK quotes (`proc%2F1`) reach the agent unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from django.conf import settings

DP_PREFIX = "/sandboxes-dp/"
PREVIEW_PREFIX = "/sandboxes-preview/"
RUNTIME_PREFIX = "/runtime/v1"
_TOKEN = re.compile(r"^[a-z0-9]{1,32}$")
_PREVIEW_LABEL = re.compile(r"^p(\d{1,5})-([a-z0-9]{1,32})$")

Kind = Literal["dataplane", "preview", "invalid"]


@dataclass(frozen=True)
class Route:
    """A request the edge owns.

    `upstream` is the path on the agent (`/runtime/v1/...` or `/proxy/<port>/...`);
    `prefix` is what the public URL adds in front of the guest's own paths (path
    form of previews), used to rewrite redirects.
    """

    kind: Kind
    route_token: str
    upstream: str
    port: int = 0
    prefix: str = ""


def _raw_path(scope: dict[str, Any]) -> str:
    raw = scope.get("raw_path")
    return raw.decode("latin-1").split("?", 1)[0] if raw else scope["path"]


def _host(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"host":
            return value.decode("latin-1").lower()
    return ""


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and 1 <= int(text) <= 65535 else None


def _dataplane(route_token: str, path: str) -> Route:
    if not _TOKEN.match(route_token) or not (path == RUNTIME_PREFIX or path.startswith(RUNTIME_PREFIX + "/")):
        return Route("invalid", route_token, path)
    return Route("dataplane", route_token, path)


def _preview(route_token: str, port_text: str, rest: str, prefix: str) -> Route:
    port = _port(port_text)
    if port is None or not _TOKEN.match(route_token):
        return Route("invalid", route_token, rest)
    return Route("preview", route_token, f"/proxy/{port}{rest or '/'}", port=port, prefix=prefix)


def _by_host(scope: dict[str, Any], path: str) -> Route | None:
    domain = settings.DATA_PLANE_DOMAIN.lower()
    if not domain:
        return None
    host = _host(scope)
    suffix = f".sandbox.{domain}"
    if not host.endswith(suffix):
        host = host.rsplit(":", 1)[0]
        if not host.endswith(suffix):
            return None
    label = host[: -len(suffix)]
    if match := _PREVIEW_LABEL.match(label):
        return _preview(match[2], match[1], path, prefix="")
    return _dataplane(label, path)


def route_of(scope: dict[str, Any]) -> Route | None:
    """The edge route of an HTTP/WebSocket scope, or None for Django."""
    path = _raw_path(scope)
    if route := _by_host(scope, path):
        return route
    if path.startswith(DP_PREFIX):
        token, _, rest = path[len(DP_PREFIX):].partition("/")
        return _dataplane(token, "/" + rest)
    if path.startswith(PREVIEW_PREFIX):
        token, _, rest = path[len(PREVIEW_PREFIX):].partition("/")
        port_text, slash, tail = rest.partition("/")
        prefix = f"{PREVIEW_PREFIX}{token}/{port_text}"
        return _preview(token, port_text, slash + tail, prefix=prefix)
    return None

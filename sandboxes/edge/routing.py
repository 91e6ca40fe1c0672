"""Which requests the edge serves, and where on the agent they go.

Paths are taken from `raw_path` (still percent-encoded) so process ids that
the SDK quotes (`proc%2F1`) reach the agent unchanged. The edge forwards the
exact bytes it checked, so it refuses what another hop could read differently:
`.` and `..` segments, raw or percent-encoded (`%2e%2E`, `..%2f..`), empty
segments (`//`), backslashes, and control characters. A refused path is a 400
in the shared error shape, before any credential is attached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from django.conf import settings

DP_PREFIX = "/sandboxes-dp/"
PREVIEW_PREFIX = "/sandboxes-preview/"
RUNTIME_PREFIX = "/runtime/v1"
AGENT_PORT = 49983  # the guest agent's own port (sandboxes/runtime/guest/agent/)
_TOKEN = re.compile(r"^[a-z0-9]{1,32}$")
_PREVIEW_LABEL = re.compile(r"^p(\d{1,5})-([a-z0-9]{1,32})$")

# Host form of previews when no data-plane domain is set: browsers and curl resolve
# every `*.localhost` name to loopback, so local previews get an origin of their own.
LOCAL_PREVIEW_DOMAIN = "localhost"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEPARATORS = re.compile(r"[/\\]")

Kind = Literal["dataplane", "preview", "invalid", "bad_path"]


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
    # ASCII digits only: a raw 0xB2 byte reads as "²", which str.isdigit() accepts
    return int(text) if re.fullmatch(r"[0-9]{1,5}", text) and 1 <= int(text) <= 65535 else None


def path_is_safe(path: str) -> bool:
    """True if no hop after the edge can read `path` (raw, percent-encoded) as another path.

    Every segment, decoded once (and twice, for servers that decode again), must hold
    no `.` or `..` part between slashes or backslashes (an encoded slash alone is fine:
    the SDK quotes process ids as `proc%2F1`) and no control character. Only the last
    segment may be empty (a trailing slash).
    """
    if not path.startswith("/"):
        return False
    try:
        return _segments_are_safe(path[1:].split("/"))
    except UnicodeDecodeError:  # percent-encoded bytes that are not UTF-8
        return False


def _segments_are_safe(segments: list[str]) -> bool:
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                continue
            return False
        once = unquote(segment, errors="strict") if "%" in segment else segment
        for decoded in (once, unquote(once) if "%" in once else once):
            if _CONTROL.search(decoded) or {".", ".."} & set(_SEPARATORS.split(decoded)):
                return False
    return True


def _dataplane(route_token: str, path: str) -> Route:
    if not _TOKEN.match(route_token) or not (path == RUNTIME_PREFIX or path.startswith(RUNTIME_PREFIX + "/")):
        return Route("invalid", route_token, path)
    if not path_is_safe(path):
        return Route("bad_path", route_token, path)
    return Route("dataplane", route_token, path)


def _preview(route_token: str, port_text: str, rest: str, prefix: str) -> Route:
    port = _port(port_text)
    if port is None or port == AGENT_PORT or not _TOKEN.match(route_token):  # the agent is no preview
        return Route("invalid", route_token, rest)
    if rest and not path_is_safe(rest):
        return Route("bad_path", route_token, rest)
    return Route("preview", route_token, f"/proxy/{port}{rest or '/'}", port=port, prefix=prefix)


def _by_host(scope: dict[str, Any], path: str) -> Route | None:
    domain = settings.DATA_PLANE_DOMAIN.lower()
    host = _host(scope)
    suffix = f".sandbox.{domain or LOCAL_PREVIEW_DOMAIN}"
    if not host.endswith(suffix):
        host = host.rsplit(":", 1)[0]
        if not host.endswith(suffix):
            return None
    label = host[: -len(suffix)]
    if match := _PREVIEW_LABEL.match(label):
        return _preview(match[2], match[1], path, prefix="")
    if not domain:  # locally the data plane lives under the path form only
        return Route("invalid", label, path)
    return _dataplane(label, path)


def route_of(scope: dict[str, Any]) -> Route | None:
    """The edge route of an HTTP/WebSocket scope, or None for Django."""
    path = _raw_path(scope)
    if route := _by_host(scope, path):
        return route
    if path.startswith(DP_PREFIX):
        token, _, rest = path[len(DP_PREFIX) :].partition("/")
        return _dataplane(token, "/" + rest)
    if path.startswith(PREVIEW_PREFIX):
        token, _, rest = path[len(PREVIEW_PREFIX) :].partition("/")
        port_text, slash, tail = rest.partition("/")
        prefix = f"{PREVIEW_PREFIX}{token}/{port_text}"
        return _preview(token, port_text, slash + tail, prefix=prefix)
    return None

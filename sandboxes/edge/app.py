"""The ASGI entry point: the data-plane edge in front of Django."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from django.conf import settings

from sandboxes.edge import access, multipart, resumes
from sandboxes.edge.access import EdgeError, Upstream
from sandboxes.edge.http_proxy import (
    BodyFilter,
    Headers,
    close_agent_client,
    forwarded_headers,
    proxy_http,
    send_error,
)
from sandboxes.edge.routing import Route, route_of
from sandboxes.edge.signing import SIGNED_PATH
from sandboxes.edge.ws_proxy import deny, proxy_websocket

logger = logging.getLogger(__name__)
FILES_PATH = "/runtime/v1/files"
# Signed URL method -> (operation it needs, method on the agent's /runtime/v1/files).
SIGNED_METHODS = {"GET": ("read", "GET"), "POST": ("write", "PUT"), "PUT": ("write", "PUT")}
# The sockets a dashboard terminal opens with `?ticket=`: start a process, attach to one.
TICKET_ROUTES = re.compile(r"/runtime/v1/process(/[^/]+/connect)?")
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """An authorised request: which agent, and the method, path and query to use on it."""

    upstream: Upstream
    method: str
    path: str
    query: bytes
    # For a socket opened with a dashboard ticket: asked every few seconds while it is open
    # whether the ticket's user may still use the sandbox (a removed or demoted user's
    # terminal is closed, not only refused at its next handshake).
    still_allowed: Callable[[], Awaitable[bool]] | None = None


def _bearer(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def _header(headers: Headers, wanted: bytes) -> str:
    return next((value.decode("latin-1") for name, value in headers if name == wanted), "")


def _forwarded_for(route: Route, scope: dict[str, Any]) -> Headers:
    """What a preview app behind the edge needs to know about the original request.

    The agent takes `Authorization` for its own secret, so the client's own credential
    (a preview app's basic auth, say) travels in a header the agent turns back into it;
    only on the preview's own origin (host form): in the path form a browser would send
    the platform's own credentials, which no sandbox may see.
    """
    client = scope.get("client") or ("", 0)
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    headers = [
        (b"x-forwarded-for", str(client[0]).encode()),
        (b"x-forwarded-proto", scheme.encode()),
        (b"x-forwarded-host", _header(scope["headers"], b"host").encode()),
    ]
    own_origin = not route.prefix  # the path form shares the platform's origin and its credentials
    if own_origin and (authorization := _header(scope["headers"], b"authorization")):
        headers.append((b"x-watasu-forwarded-authorization", authorization.encode("latin-1")))
    return headers


def preview_host(route: Route, target: Target, scope: dict[str, Any]) -> str:
    """The Host a preview's app sees: the one it is served on, or the sandbox's
    `mask_request_host` with `${PORT}` as the previewed port."""
    mask = target.upstream.mask_request_host
    if mask:
        return mask.replace("${PORT}", str(route.port))
    return _header(scope["headers"], b"host")


async def _authorise(route: Route, scope: dict[str, Any], method: str) -> Target:
    """Check the caller's credential for this route and make sure the sandbox runs."""
    if route.kind == "invalid":
        raise EdgeError(404, "not_found", "No data-plane route at this address.")
    if route.kind == "bad_path":
        raise EdgeError(
            400,
            "invalid_path",
            "Paths may not contain '.', '..' or empty segments, "
            "encoded or not, backslashes or control characters.",
        )
    query: bytes = scope.get("query_string", b"")
    if route.kind == "preview":
        upstream = await resumes.upstream(
            access.preview_upstream, route.route_token, route.port, _bearer(scope["headers"])
        )
        return Target(upstream, method, route.upstream, query)
    if route.upstream == SIGNED_PATH:
        return await _authorise_signed(route, query, method)
    bearer = _bearer(scope["headers"])
    if bearer is None and (ticket := _ticket_of(query)) is not None:
        return await _authorise_ticket(route, scope, query, ticket)
    upstream = await resumes.upstream(access.dataplane_upstream, route.route_token, bearer)
    return Target(upstream, method, route.upstream, query)


def _ticket_of(query: bytes) -> str | None:
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("ticket")
    return values[0] if values else None


def _without_ticket(query: bytes) -> bytes:
    """The query minus its `ticket` parameters, every other byte as it came."""
    kept = [
        part
        for part in query.split(b"&")
        if unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) != "ticket"
    ]
    return b"&".join(kept)


def _origin(url: str) -> str | None:
    """`scheme://host[:port]` as a browser sends it in `Origin` (no default port); None
    for anything that is not an http(s) origin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[scheme] else "")


async def _authorise_ticket(route: Route, scope: dict[str, Any], query: bytes, ticket: str) -> Target:
    """A dashboard terminal: no header, the ticket in the query (a browser cannot set one on a
    WebSocket). Only process sockets, only opened by a page of the platform's own origin (a
    ticket leaked to another site is useless there); the agent never sees the ticket."""
    if scope["type"] != "websocket" or not TICKET_ROUTES.fullmatch(route.upstream):
        raise EdgeError(
            401,
            "unauthorized",
            "A dashboard ticket opens process WebSockets only; send Authorization: Bearer.",
        )
    origin = _origin(_header(scope["headers"], b"origin"))
    if origin is None or origin != _origin(settings.PUBLIC_URL):
        raise EdgeError(
            403, "forbidden", "A dashboard ticket is accepted only from the dashboard's own origin."
        )
    upstream = await resumes.upstream(access.ticket_upstream, route.route_token, ticket)

    async def still_allowed() -> bool:
        return await resumes.lookup(access.ticket_still_allowed, route.route_token, ticket)

    return Target(upstream, "GET", route.upstream, _without_ticket(query), still_allowed)


async def _authorise_signed(route: Route, query: bytes, method: str) -> Target:
    """A signed file URL: no header, the query is the credential; the agent's /files serves it."""
    params = {key: values[0] for key, values in parse_qs(query.decode("latin-1")).items()}
    op, agent_method = SIGNED_METHODS.get(method, ("", ""))
    if not op:
        error = EdgeError(
            405,
            "method_not_allowed",
            f"Signed URLs answer GET (download) and POST or PUT (upload), not {method}.",
        )
        error.headers.append((b"allow", ", ".join(SIGNED_METHODS).encode()))
        raise error
    if params.get("op") != op:
        raise EdgeError(403, "forbidden", f"This signed URL does not allow {method}.")
    check = functools.partial(
        access.signed_upstream,
        path=params.get("path", ""),
        op=op,
        expires=params.get("expires", ""),
        sig=params.get("sig", ""),
    )
    upstream = await resumes.upstream(check, route.route_token)
    return Target(upstream, agent_method, FILES_PATH, urlencode({"path": params["path"]}).encode())


def _upload_filter(route: Route, method: str, headers: Headers) -> BodyFilter | None:
    """A signed upload stores its body as it is, whatever its type, except that of a
    `multipart/form-data` body (a browser form, `curl -F`) it stores the first file part."""
    if route.upstream != SIGNED_PATH or SIGNED_METHODS.get(method, ("",))[0] != "write":
        return None
    boundary = multipart.boundary_of(_header(headers, b"content-type"))
    if boundary is None:
        return None
    return functools.partial(multipart.first_file_part, boundary=boundary)


def _inbound_headers(route: Route, headers: Headers) -> Headers:
    """The client's headers the agent may see.

    A signed upload's body is bytes to store (its type was used by the edge). A preview in the path form
    shares the platform's origin, so the browser sends it the platform's cookies (the
    admin's and dashboard's session): no cookie reaches the sandbox there.
    """
    if route.upstream == SIGNED_PATH:
        return [(name, value) for name, value in headers if name == b"content-length"]
    if route.kind == "preview" and route.prefix:
        return [(name, value) for name, value in headers if name != b"cookie"]
    return headers


UNFRAMED_BODY = (
    "Send the request body with a Content-Length header; bodies without one "
    "(Transfer-Encoding: chunked) are not accepted by the API."
)


def _unframed_body(headers: Headers) -> bool:
    """A body sent without Content-Length (chunked). Django would spool it unbounded and
    DRF would then read it as empty: a `{"scope": "read"}` sent so once minted a write key."""
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" not in names


class EdgeApp:
    """Serves data-plane, preview and signed-URL traffic; hands the rest to `django_app`."""

    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        route = route_of(scope) if scope["type"] in ("http", "websocket") else None
        if route is None and scope["type"] == "http" and _unframed_body(scope["headers"]):
            await send_error(send, EdgeError(411, "length_required", UNFRAMED_BODY))
        elif route is None:
            await self.django_app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(route, scope, receive, send)
        else:
            await self._http_guarded(route, scope, receive, send)

    async def _http_guarded(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A bug is still an answer in the error shape (if nothing was sent yet), never HTML."""
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._http(route, scope, receive, tracked)
        except Exception:
            logger.exception("edge request failed")
            if started:
                raise
            await send_error(send, EdgeError(500, "internal_error", "The edge failed on this request."))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        """Django does not speak lifespan; the edge uses shutdown to close its agent connections."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await close_agent_client()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            target = await _authorise(route, scope, scope["method"])
            headers = _inbound_headers(route, scope["headers"])
            body_filter = _upload_filter(route, scope["method"], scope["headers"])
            extra = _forwarded_for(route, scope) if route.kind == "preview" else None
            if extra is not None and (host := preview_host(route, target, scope)):
                extra.append((b"host", host.encode("latin-1")))
            await proxy_http(
                scope,
                receive,
                send,
                upstream=target.upstream,
                method=target.method,
                path=target.path,
                query=target.query,
                headers=forwarded_headers(headers, target.upstream.secret, extra),
                prefix=route.prefix,
                preview=route.kind == "preview",
                body_filter=body_filter,
            )
        except EdgeError as error:
            await send_error(send, error)

    async def _websocket(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            if route.upstream == SIGNED_PATH:
                raise EdgeError(404, "not_found", "Signed URLs are plain HTTP.")
            target = await _authorise(route, scope, "GET")
        except EdgeError as error:
            await deny(scope, send, error)
            return
        extra = _forwarded_for(route, scope) if route.kind == "preview" else []
        if route.kind == "preview" and not route.prefix:  # own origin: its cookies are its own
            extra += [(name, value) for name, value in scope["headers"] if name == b"cookie"]
        await proxy_websocket(
            scope,
            receive,
            send,
            upstream=target.upstream,
            path=target.path,
            query=target.query,
            extra_headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in extra],
            kind="preview" if route.kind == "preview" else "dataplane",
            still_allowed=target.still_allowed,
        )

"""Streaming HTTP proxy to a guest agent.

Request bodies are forwarded chunk by chunk as uvicorn hands them over, and
response bodies are relayed chunk by chunk; uvicorn's flow control (it stops
reading a socket whose body is not consumed, and `send` waits for a slow
client) keeps the web process's memory flat whatever the size of a file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from django.conf import settings

from sandboxes.edge.access import EdgeError, Upstream, overloaded

logger = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
# What the agent is sent instead of the client's body (a signed upload's file part).
BodyFilter = Callable[[AsyncIterator[bytes]], Awaitable[AsyncIterator[bytes]]]
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"authorization",
        b"proxy-connection",
        # only the edge itself says what the client's credential was (app._forwarded_for)
        b"x-watasu-forwarded-authorization",
    }
)
# Preview responses in the path form share the platform's origin: they may not set
# cookies there, and the browser gives them an opaque origin of their own.
PATH_FORM_CSP = b"sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
# The web server sends its own Date (uvicorn runs with --no-server-header); a preview
# app's own `Server` is the app's answer, passed on (data-plane answers pass neither).
_PREVIEW_SERVER_OWN = frozenset({b"date"})
# A data-plane answer (files, processes, signed URLs) is never a page of the platform's
# origin, even when a hostile guest replaces the agent: these come from the edge alone.
# Of a data-plane answer only what the agent's protocol uses passes; the rest (cookies,
# Location, Clear-Site-Data, CORS, service-worker scope...) would act on the platform's
# origin, so the edge sets the security headers itself and the guest cannot add others.
_DATA_PLANE_PASSED = frozenset({b"content-type", b"content-length", b"allow", b"retry-after"})
_DATA_PLANE_TYPES = (b"application/json", b"application/octet-stream", b"application/x-ndjson")
DATA_PLANE_CSP = b"default-src 'none'; sandbox; frame-ancestors 'none'"
DATA_PLANE_SECURITY = [(b"content-security-policy", DATA_PLANE_CSP), (b"x-content-type-options", b"nosniff")]
_transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncHTTPTransport] = (
    weakref.WeakKeyDictionary()
)


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class UnsafeUpstreamPath(Exception):
    """The URL the HTTP library would send differs from the path the edge checked."""


def agent_transport() -> httpx.AsyncHTTPTransport:
    """One connection pool per event loop (keep-alive to agents saves a TCP setup per call).

    The edge talks to the transport, not to an `httpx.AsyncClient`: a client keeps a
    cookie jar (one sandbox's `Set-Cookie` would be replayed to every other sandbox and
    team), adds headers the caller never sent (`Accept-Encoding`, `User-Agent`) and may
    follow redirects. Connections to a paused guest die with its QEMU process; the pool
    notices the closed socket before reusing it, and a failed connect is retried once.
    """
    loop = asyncio.get_running_loop()
    transport = _transports.get(loop)
    if transport is None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=5.0)
        transport = httpx.AsyncHTTPTransport(retries=1, limits=limits, trust_env=False)
        _transports[loop] = transport
    return transport


async def close_agent_client() -> None:
    transport = _transports.pop(asyncio.get_running_loop(), None)
    if transport is not None:
        await transport.aclose()


def _timeouts() -> dict[str, float]:
    return httpx.Timeout(
        connect=5.0,
        read=settings.EDGE_AGENT_TIMEOUT_SECONDS,
        write=settings.EDGE_AGENT_TIMEOUT_SECONDS,
        pool=10.0,
    ).as_dict()


def agent_request(
    method: str,
    port: int,
    path: str,
    query: bytes,
    headers: Headers,
    content: AsyncIterator[bytes] | None,
    address: str = "127.0.0.1",
) -> httpx.Request:
    """The request to the agent, carrying exactly `path` and `query` as checked.

    httpx normalises `.`/`..` segments and re-quotes paths; the routing already refused
    anything it could change, and this refuses (instead of sending) any URL whose bytes
    still differ from what was checked.
    """
    raw = path.encode("latin-1") + (b"?" + query if query else b"")
    url = httpx.URL(scheme="http", host=address, port=port, raw_path=raw)
    if url.raw_path != raw:
        raise UnsafeUpstreamPath(raw)
    return httpx.Request(method, url, headers=headers, content=content, extensions={"timeout": _timeouts()})


def forwarded_headers(headers: Headers, secret: str, extra: Headers | None = None) -> Headers:
    """The client's headers minus hop-by-hop ones and its credential, plus the agent secret."""
    kept = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
    return [*kept, *(extra or []), (b"authorization", f"Bearer {secret}".encode())]


def request_framing(headers: Headers) -> bool:
    """Whether the client's request (its own headers, before any filtering) has a body.

    A request that declares both `Content-Length` and `Transfer-Encoding` is refused: the
    two hops could read its end differently (request smuggling), and the length would be
    forwarded next to a de-chunked body.
    """
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise EdgeError(
            400, "invalid_request", "A request may not carry both Content-Length and Transfer-Encoding."
        )
    for name, value in headers:
        if name.lower() == b"content-length":
            return value.strip() not in (b"", b"0")
        if name.lower() == b"transfer-encoding":
            return True
    return False


async def _request_body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _domain_cookie(value: bytes) -> bool:
    """A `Set-Cookie` with a Domain attribute would reach sibling previews' origins."""
    return any(part.strip().lower().startswith(b"domain=") for part in value.split(b";")[1:])


def _response_headers(response: httpx.Response, prefix: str, preview: bool) -> Headers:
    """The agent's headers for the client. Previews in the path form (`prefix`) share the
    platform's origin: no cookies, and a sandboxing CSP. Previews in the host form keep
    cookies scoped to their own host only. Data-plane answers come from inside the guest
    too, and are served on the platform's origin: whatever the agent says, they set no
    cookie, never render as a page (a sandboxing CSP, nosniff) and a file is an attachment."""
    if not preview:
        return _data_plane_headers(response)
    headers = []
    for name, value in response.headers.raw:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _PREVIEW_SERVER_OWN:
            continue
        if lowered == b"set-cookie" and preview and (prefix or _domain_cookie(value)):
            continue
        if lowered == b"location" and prefix and value.startswith(b"/") and not value.startswith(b"//"):
            value = prefix.encode() + value  # a guest redirect to /x stays under the preview prefix
        if lowered == b"content-security-policy" and preview and prefix:
            continue  # replaced below: the guest may not loosen the sandbox
        headers.append((lowered, value))
    if preview and prefix:
        headers.append((b"content-security-policy", PATH_FORM_CSP))
    return headers


def _data_plane_headers(response: httpx.Response) -> Headers:
    headers = []
    for name, value in response.headers.raw:
        lowered = name.lower()
        if lowered == b"content-type" and not value.lower().startswith(_DATA_PLANE_TYPES):
            value = b"application/octet-stream"  # the agent answers JSON or bytes, nothing a browser renders
        if lowered in _DATA_PLANE_PASSED:
            headers.append((lowered, value))
    return [*headers, (b"content-disposition", _attachment(response)), *DATA_PLANE_SECURITY]


def _attachment(response: httpx.Response) -> bytes:
    """One `attachment` disposition: the agent's first (its filename kept), else a bare one."""
    value = next((v for n, v in response.headers.raw if n.lower() == b"content-disposition"), b"")
    return b"attachment" + (value[value.index(b";") :] if b";" in value else b"")


async def proxy_http(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    upstream: Upstream,
    method: str,
    path: str,
    query: bytes,
    headers: Headers,
    prefix: str = "",
    preview: bool = False,
    body_filter: BodyFilter | None = None,
) -> None:
    """Send one request to the agent and stream its answer back.

    `body_filter` replaces the client's body (of unknown length: sent chunked) with
    what it returns; its EdgeErrors are the answer. Raises EdgeError (503
    sandbox_overloaded) when the agent does not answer; once the response has started,
    a broken upstream aborts the client connection instead of ending a truncated body
    cleanly.
    """
    body = _request_body(receive) if request_framing(scope["headers"]) else None
    if body is None or body_filter is not None:
        headers = [(name, value) for name, value in headers if name != b"content-length"]
    try:
        if body_filter is not None:
            body = await body_filter(body or _no_body())
        request = agent_request(method, upstream.port, path, query, headers, body, upstream.address)
    except ClientGone:
        return
    except UnsafeUpstreamPath as exc:
        raise EdgeError(400, "invalid_path", "The request path cannot be forwarded as it is.") from exc
    try:
        response = await agent_transport().handle_async_request(request)
    except ClientGone:
        return
    except httpx.TransportError as exc:
        raise overloaded(
            f"sandbox is alive but guestd is not responding ({type(exc).__name__}); retry shortly."
        ) from exc
    try:
        if response.status_code == 401 and not preview:
            raise overloaded("sandbox is alive but guestd refused the edge's credential; retry shortly.")
        if not preview and not 200 <= response.status_code < 300 and not 400 <= response.status_code < 600:
            # the agent never redirects: a 3xx (an open redirect on the platform's origin) is not relayed
            raise EdgeError(
                502,
                "bad_gateway",
                f"The sandbox answered {response.status_code}, which the data plane never relays.",
            )
        await _relay(response, receive, send, prefix, preview)
    finally:
        await response.aclose()


async def _relay(response: httpx.Response, receive: Any, send: Any, prefix: str, preview: bool) -> None:
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _response_headers(response, prefix, preview),
            }
        )
        async for chunk in response.aiter_raw():
            if gone.done():
                return  # the client left: stop reading the agent
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except httpx.TransportError:
        logger.warning("agent connection broke mid-response; aborting the client connection")
    finally:
        gone.cancel()


async def send_error(send: Any, error: EdgeError) -> None:
    """An HTTP error answer in the shared `{"error", "message"}` shape."""
    body = json.dumps(error.body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *error.headers,
                *DATA_PLANE_SECURITY,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})

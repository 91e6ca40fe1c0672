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
from collections.abc import AsyncIterator
from typing import Any

import httpx
from django.conf import settings

from sandboxes.edge.access import EdgeError, Upstream, overloaded

logger = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"host", b"authorization", b"proxy-connection",
})
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary())


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def agent_client() -> httpx.AsyncClient:
    """One pooled client per event loop (keep-alive to agents saves a TCP setup per call).

    Connections to a paused guest die with its QEMU process; the pool notices
    the closed socket before reusing it, and a failed connect is retried once.
    """
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        timeout = httpx.Timeout(connect=5.0, read=settings.EDGE_AGENT_TIMEOUT_SECONDS,
                                write=settings.EDGE_AGENT_TIMEOUT_SECONDS, pool=10.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=5.0)
        transport = httpx.AsyncHTTPTransport(retries=1, limits=limits)
        client = httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)
        _clients[loop] = client
    return client


async def close_agent_client() -> None:
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


def forwarded_headers(headers: Headers, secret: str, extra: Headers | None = None) -> Headers:
    """The client's headers minus hop-by-hop ones and its credential, plus the agent secret."""
    kept = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
    return [*kept, *(extra or []), (b"authorization", f"Bearer {secret}".encode())]


def _has_body(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
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


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _response_headers(response: httpx.Response, prefix: str) -> Headers:
    headers = []
    for name, value in response.headers.raw:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            continue
        if lowered == b"location" and prefix and value.startswith(b"/") and not value.startswith(b"//"):
            value = prefix.encode() + value  # a guest redirect to /x stays under the preview prefix
        headers.append((lowered, value))
    return headers


async def proxy_http(scope: dict[str, Any], receive: Any, send: Any, *, upstream: Upstream, method: str,
                     path: str, query: bytes, headers: Headers, prefix: str = "") -> None:
    """Send one request to the agent and stream its answer back.

    Raises EdgeError (503 sandbox_overloaded) when the agent does not answer;
    once the response has started, a broken upstream aborts the client connection
    instead of ending a truncated body cleanly.
    """
    client = agent_client()
    url = f"http://127.0.0.1:{upstream.port}{path}" + (f"?{query.decode('latin-1')}" if query else "")
    body = _request_body(receive) if _has_body(headers) else None
    if body is None:
        headers = [(name, value) for name, value in headers if name != b"content-length"]
    request = client.build_request(method, url, headers=headers, content=body)
    try:
        response = await client.send(request, stream=True)
    except ClientGone:
        return
    except httpx.TransportError as exc:
        raise overloaded(f"sandbox is alive but guestd is not responding ({type(exc).__name__}); "
                         "retry shortly.") from exc
    try:
        if response.status_code == 401:
            raise overloaded("sandbox is alive but guestd refused the edge's credential; retry shortly.")
        await _relay(response, receive, send, prefix)
    finally:
        await response.aclose()


async def _relay(response: httpx.Response, receive: Any, send: Any, prefix: str) -> None:
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _response_headers(response, prefix)})
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
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *error.headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})

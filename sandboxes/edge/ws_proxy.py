"""WebSocket proxy to a guest agent.

The agent's socket is opened before the client's is accepted, so an agent
refusal (404 for an unknown process on `/connect`) reaches the client as the
same HTTP status at the handshake. Frames are pumped both ways in order until
either side closes; close codes are passed on.

Limits: a frame (message) is at most `MAX_FRAME` bytes either way, at most
`MAX_QUEUE` incoming messages wait on each side (then reading stops and TCP
pushes back), and a sandbox has at most `EDGE_MAX_SOCKETS_PER_SANDBOX` open
sockets (429 at the handshake past it). A quiet stream is never closed for being
quiet: towards the client uvicorn pings every 60 s and drops it after 120 s more
without a pong; towards the agent the edge does the same, so a dead socket ends
within 3 minutes and a live one (ping answered) lives as long as it wants.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from sandboxes.edge.access import EdgeError, Upstream, overloaded

logger = logging.getLogger(__name__)

DENIAL_EXTENSION = "websocket.http.response"
MAX_FRAME = 64 * 2**20
MAX_QUEUE = 16
PING_INTERVAL, PING_TIMEOUT = 60.0, 120.0
# (sandbox id, kind) -> open sockets through this web process. Anonymous preview sockets
# and the owner's data-plane sockets are counted apart: previews cannot crowd out the owner.
_open: dict[tuple[int, str], int] = {}
CLIENT_CLOSE_GRACE = 5.0
# Codes that describe a close but may not be sent in a close frame.
_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}


def _sendable(code: int | None) -> int:
    code = 1000 if code is None else code
    return _UNSENDABLE.get(code, code)


async def deny(scope: dict[str, Any], send: Any, error: EdgeError) -> None:
    """Refuse the handshake with a real HTTP status and JSON body (uvicorn supports the extension)."""
    if DENIAL_EXTENSION not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": error.body["message"][:120]})
        return
    body = json.dumps(error.body).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), *error.headers],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def _open_agent(
    scope: dict[str, Any],
    upstream: Upstream,
    path: str,
    query: bytes,
    extra_headers: list[tuple[str, str]],
    preview: bool = False,
) -> ClientConnection:
    url = f"ws://{upstream.address}:{upstream.port}{path}" + (f"?{query.decode('latin-1')}" if query else "")
    headers = [("Authorization", f"Bearer {upstream.secret}"), *extra_headers]
    try:
        return await connect(
            url,
            additional_headers=headers,
            subprotocols=scope.get("subprotocols") or None,
            compression=None,
            proxy=None,
            open_timeout=15,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=5,
            max_size=MAX_FRAME,
            max_queue=MAX_QUEUE,
            user_agent_header=None,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401 and not preview:  # a preview app's own 401 is the app's answer
            message = "sandbox is alive but guestd refused the edge's credential; retry shortly."
            raise overloaded(message) from exc
        try:
            body = json.loads(exc.response.body or b"{}")
        except ValueError:
            body = {}
        raise EdgeError(
            status,
            str(body.get("error") or "agent_refused"),
            str(body.get("message") or f"The sandbox answered {status}."),
        ) from exc
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise overloaded(
            f"sandbox is alive but guestd is not responding ({type(exc).__name__}); retry shortly."
        ) from exc


async def _client_to_agent(receive: Any, agent: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await agent.close(code=_sendable(message.get("code")))
            return
        if message["type"] == "websocket.receive":
            text = message.get("text")
            await agent.send(text if text is not None else message.get("bytes") or b"")


async def _agent_to_client(send: Any, agent: ClientConnection) -> bool:
    """Relay until the agent closes (True) or the client is gone (False)."""
    try:
        async for data in agent:
            key = "text" if isinstance(data, str) else "bytes"
            await send({"type": "websocket.send", key: data})
    except ConnectionClosed:
        pass
    except OSError:  # uvicorn's ClientDisconnected: the client's own close is on its way
        return False
    try:
        await send(
            {
                "type": "websocket.close",
                "code": _sendable(agent.close_code),
                "reason": agent.close_reason or "",
            }
        )
    except OSError:
        return False
    return True


async def _revoked(still_allowed: Callable[[], Awaitable[bool]], agent: ClientConnection) -> None:
    """Ends when access is gone: the agent's side is closed with 1008, which the relay passes
    on to the client (a lookup that fails is not a revocation; it is asked again)."""
    while True:
        await asyncio.sleep(settings.EDGE_ACCESS_RECHECK_SECONDS)
        try:
            allowed = await still_allowed()
        except Exception:
            logger.warning("re-checking a dashboard terminal's access failed", exc_info=True)
            continue
        if not allowed:
            await agent.close(code=1008, reason="access to this sandbox was withdrawn")
            return


def open_sockets(sandbox_id: int, kind: str = "dataplane") -> int:
    return _open.get((sandbox_id, kind), 0)


async def proxy_websocket(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    upstream: Upstream,
    path: str,
    query: bytes,
    extra_headers: list[tuple[str, str]] | None = None,
    kind: str = "dataplane",
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Connect to the agent, accept the client, pump frames until one side closes (or, with
    `still_allowed`, until it answers False: checked every ACCESS_RECHECK_SECONDS)."""
    limit, key = settings.EDGE_MAX_SOCKETS_PER_SANDBOX, (upstream.sandbox_id, kind)
    if _open.get(key, 0) >= limit:
        await deny(
            scope,
            send,
            EdgeError(
                429,
                "too_many_connections",
                f"Sandbox {upstream.sandbox_id} has {limit} open {kind} streams; close one first.",
            ),
        )
        return
    _open[key] = _open.get(key, 0) + 1
    try:
        await _proxy(
            scope,
            receive,
            send,
            upstream,
            path,
            query,
            extra_headers or [],
            preview=kind == "preview",
            still_allowed=still_allowed,
        )
    finally:
        _open[key] -= 1
        if not _open[key]:
            del _open[key]


async def _proxy(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    upstream: Upstream,
    path: str,
    query: bytes,
    extra_headers: list[tuple[str, str]],
    preview: bool,
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    try:
        agent = await _open_agent(scope, upstream, path, query, extra_headers, preview)
    except EdgeError as error:
        await deny(scope, send, error)
        return
    try:
        await send({"type": "websocket.accept", "subprotocol": agent.subprotocol})
        inbound = asyncio.ensure_future(_client_to_agent(receive, agent))
        outbound = asyncio.ensure_future(_agent_to_client(send, agent))
        tasks = [inbound, outbound]
        if still_allowed is not None:
            tasks.append(asyncio.ensure_future(_revoked(still_allowed, agent)))
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if len(tasks) > 2 and tasks[2].done():
            # access withdrawn: the agent's side is closing; let the relay pass the close on
            await asyncio.wait([outbound], timeout=CLIENT_CLOSE_GRACE)
        elif outbound.done() and not outbound.exception() and not outbound.result():
            # The client left while output was flowing: let its close (code, and any frames
            # it sent before) reach the agent before tearing down.
            await asyncio.wait([inbound], timeout=CLIENT_CLOSE_GRACE)
        for task in tasks:
            if not task.done():
                task.cancel()
            elif (exc := task.exception()) and not isinstance(exc, (ConnectionClosed, OSError)):
                logger.warning("websocket relay ended with %r", exc)
    finally:
        await agent.close()

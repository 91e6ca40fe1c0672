"""Preview traffic: ``/proxy/<port>/...`` to a port inside the sandbox, streamed both ways."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
from typing import TYPE_CHECKING

from .core import CHUNK, HttpError

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}

if TYPE_CHECKING:
    from .routing import Agent, Request, Result
    from .server import AgentHandler


def proxy(agent: Agent, req: Request) -> Result:
    """``/proxy/<port>/<rest>?<query>`` → ``http://127.0.0.1:<port>/<rest>?<query>``, streamed both ways.

    The agent secret is never forwarded; the edge may pass the client's own Authorization
    in ``X-Watasu-Forwarded-Authorization``.
    """
    m = re.fullmatch(r"/proxy/(\d{1,5})(/.*)?", req.path)
    if m is None or not 0 < int(m[1]) < 65536:
        raise HttpError(404, "not_found", "expected /proxy/<port>/<path>")
    port, h = int(m[1]), req.http
    assert h is not None
    target = (m[2] or "/") + (f"?{req.raw_query}" if req.raw_query else "")
    skip = HOP_BY_HOP | {"authorization", "content-length", "x-watasu-forwarded-authorization"}
    headers = [(k, v) for k, v in h.headers.items() if k.lower() not in skip]
    if h.headers.get("X-Watasu-Forwarded-Authorization"):
        headers.append(("Authorization", h.headers["X-Watasu-Forwarded-Authorization"]))
    if not h.headers.get("Host"):
        headers.append(("Host", f"127.0.0.1:{port}"))
    if h.is_upgrade():
        return proxy_tunnel(h, port, req.method, target, headers)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.putrequest(req.method, target, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if h.chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif h.remaining:
            conn.putheader("Content-Length", str(h.remaining))
        conn.endheaders()
        for chunk in h.body_chunks():
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if h.chunked else chunk)
        if h.chunked:
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
    except ConnectionRefusedError as e:
        conn.close()
        raise not_listening(port) from e
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise HttpError(502, "bad_gateway", f"upstream on port {port} failed: {e}") from e
    try:
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
        if req.method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            cl = resp.getheader("Content-Length")
            h.start_response(
                resp.status,
                out + ([("Content-Length", cl)] if cl else []),
                None,
                body=False,
                reason=resp.reason,
            )
            return None
        h.start_response(resp.status, out, resp.length, reason=resp.reason)
        while data := resp.read1(CHUNK):
            h.write_body(data)
        h.end_body()
    finally:
        conn.close()
    return None


def not_listening(port: int) -> HttpError:
    return HttpError(502, "port_not_listening", f"nothing is listening on port {port} in the sandbox")


def proxy_tunnel(
    h: AgentHandler, port: int, method: str, target: str, headers: list[tuple[str, str]]
) -> Result:
    """Upgrade requests (WebSocket dev servers): forward the head, then splice bytes both ways."""
    try:
        up = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        raise not_listening(port) from e
    up.settimeout(None)
    head = [
        f"{method} {target} HTTP/1.1",
        *(f"{k}: {v}" for k, v in headers),
        "Connection: Upgrade",
        f"Upgrade: {h.headers.get('Upgrade', 'websocket')}",
    ]
    up.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    h.response_started = True
    h.close_connection = True

    def client_to_upstream() -> None:
        try:
            while data := h.rfile.read1(65536):
                up.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=client_to_upstream, daemon=True)
    t.start()
    try:
        while data := up.recv(65536):
            h.connection.sendall(data)
    except OSError:
        pass
    finally:
        up.close()
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)
    return None

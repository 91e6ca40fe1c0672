"""HTTP/1.1 plumbing: request parsing, bodies, responses, WebSocket upgrades, the server."""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import routes  # noqa: F401 (registers every route on the router)
from .core import AGENT_PORT, CHUNK, MAX_BODY, HttpError, log
from .identity import boot_token
from .routing import Agent, Request, Result
from .websocket import WebSocket


class AgentHandler(BaseHTTPRequestHandler):
    """Parses HTTP/1.1 (keep-alive, chunked bodies, upgrades) and delegates to ``Agent.dispatch``."""

    server_version = "watasu-agent/0.2"
    protocol_version = "HTTP/1.1"
    agent: Agent  # set on the subclass built by ``serve``
    chunked = False
    remaining = 0
    body_done = True
    response_started = False
    chunk_out = False

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self.chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            self.remaining = 0 if self.chunked else int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.remaining = 0
            self.close_connection = True
        self.body_done = not self.chunked and self.remaining == 0
        self.response_started = self.chunk_out = False
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request(method, url.path, self._token(), query=query, raw_query=url.query, http=self)
        result: Result
        extra_headers: list[tuple[str, str]] = []
        try:
            upgrade = self.is_upgrade() and not url.path.startswith("/proxy/")
            result = self.agent.dispatch(req, websocket=upgrade)
        except HttpError as e:
            result, extra_headers = (e.status, e.payload()), e.headers
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:
            log(f"{method} {url.path}: {traceback.format_exc()}")
            result = 500, {"error": "internal_error", "message": repr(e)}
        if result is not None:
            if self.response_started:  # failed mid-stream: the only honest signal left is to hang up
                self.close_connection = True
            else:
                self.send_json(*result, headers=extra_headers)
        if not self.body_done:
            self.close_connection = True  # unread request body would be parsed as the next request

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def is_upgrade(self) -> bool:
        return ("upgrade" in self.headers.get("Connection", "").lower()
                and bool(self.headers.get("Upgrade")))

    # -- request body

    def body_chunks(self) -> Iterator[bytes]:
        """The request body in pieces, honouring Content-Length or chunked transfer encoding."""
        if self.chunked:
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as e:
                    self.close_connection = True
                    raise HttpError(400, "bad_request", "malformed chunked body") from e
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self.body_done = True
                    return
                while size:
                    data = self.rfile.read(min(size, CHUNK))
                    if not data:
                        raise HttpError(400, "bad_request", "body ended early")
                    size -= len(data)
                    yield data
                self.rfile.readline()
        while self.remaining > 0:
            data = self.rfile.read(min(self.remaining, CHUNK))
            if not data:
                raise HttpError(400, "bad_request", "body shorter than Content-Length")
            self.remaining -= len(data)
            yield data
        self.body_done = True

    def read_json(self) -> dict[str, Any]:
        if not self.chunked and self.remaining > MAX_BODY:
            raise HttpError(413, "payload_too_large", "body too large")
        parts, size = [], 0
        for chunk in self.body_chunks():
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(413, "payload_too_large", "body too large")
            parts.append(chunk)
        if not size:
            return {}
        try:
            body = json.loads(b"".join(parts))
        except ValueError as e:
            raise HttpError(400, "bad_request", f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise HttpError(400, "bad_request", "body must be a JSON object")
        return body

    # -- responses

    def send_json(self, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        for name, value in headers or []:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_response(self, status: int, headers: list[tuple[str, str]], length: int | None,
                       body: bool = True, reason: str | None = None) -> None:
        """Send the status line and headers; ``length=None`` means chunked transfer encoding."""
        self.response_started = True
        self.send_response(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if body and length is None:
            self.chunk_out = True
            self.send_header("Transfer-Encoding", "chunked")
        elif body:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def write_body(self, data: bytes) -> None:
        if not data:
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunk_out else data)

    def end_body(self) -> None:
        if self.chunk_out:
            self.wfile.write(b"0\r\n\r\n")

    def upgrade(self) -> WebSocket:
        """Complete the RFC 6455 handshake (101) and hand back the framed connection."""
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or self.headers.get("Upgrade", "").lower() != "websocket":
            raise HttpError(400, "bad_request", "not a WebSocket upgrade")
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", WebSocket.accept_key(key))
        self.end_headers()
        self.response_started = True
        self.close_connection = True
        self.body_done = True
        return WebSocket(self.rfile, self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        """Status line and Date, without the ``Server`` header naming the agent and its Python."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve(host: str = "0.0.0.0", port: int = AGENT_PORT, secret: str | None = None) -> None:
    """Serve forever. ``secret`` overrides the boot token (for tests on the host)."""
    agent = Agent(secret or boot_token())
    handler = type("BoundHandler", (AgentHandler,), {"agent": agent})
    with AgentServer((host, port), handler) as srv:
        srv.serve_forever()

"""HTTP/1.1 plumbing: request parsing, bodies, responses, WebSocket upgrades, the server."""

from __future__ import annotations

import io
import json
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import routes  # noqa: F401 (registers every route on the router)
from .core import AGENT_PORT, CHUNK, MAX_BODY, HttpError, log
from .head import MAX_QUERY_FIELDS, body_framing, chunk_end, chunk_size, read_head, read_trailers
from .identity import boot_token
from .routing import Agent, Request, Result
from .websocket import WebSocket

ERROR_CODES = {
    400: "bad_request",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "header_too_large",
    501: "not_implemented",
    505: "http_version_not_supported",
}


class AgentHandler(BaseHTTPRequestHandler):
    """Parses HTTP/1.1 (keep-alive, chunked bodies, upgrades) and delegates to ``Agent.dispatch``.

    Every read from the socket is bounded (``head``): a head, a body or a chunk that is too
    large or malformed is a 4xx in the agent's error shape, and the connection is closed.
    """

    server_version = "watasu-agent/0.2"
    protocol_version = "HTTP/1.1"
    agent: Agent  # set on the subclass built by ``serve``
    requestline = ""  # read by the error path before a request line was parsed
    request_version = default_request_version = "HTTP/1.1"  # errors always carry a status line
    chunked = False
    remaining = 0
    body_done = True
    response_started = False
    chunk_out = False

    def handle_one_request(self) -> None:
        """One request: its head read within bounds here, then parsed by the standard library."""
        self.command = ""
        try:
            head = read_head(self.rfile)
        except HttpError as e:
            self.send_error(e.status, explain=e.message)
            return
        if head is None:
            self.close_connection = True
            return
        self.raw_requestline, block = head
        stream, self.rfile = self.rfile, io.BytesIO(block)
        try:
            parsed = self.parse_request()
        finally:
            self.rfile = stream
        if not parsed:
            return
        handler = getattr(self, f"do_{self.command}", None)
        if handler is None:
            self.send_error(501, explain=f"method {self.command} is not implemented")
            return
        handler()
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the HTTP layer itself answers (bad heads, bounds), in the agent's error
        shape; the connection is closed, as what follows cannot be trusted to be a request."""
        self.close_connection = True
        self.send_json(
            code,
            {
                "error": ERROR_CODES.get(code, "bad_request"),
                "message": explain or message or HTTPStatus(code).phrase,
            },
        )

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
        self.response_started = self.chunk_out = False
        try:
            req = self._request(method)
        except HttpError as e:
            self.send_error(e.status, explain=e.message)
            return
        result: Result
        extra_headers: list[tuple[str, str]] = []
        try:
            upgrade = self.is_upgrade() and not req.path.startswith("/proxy/")
            result = self.agent.dispatch(req, websocket=upgrade)
        except HttpError as e:
            result, extra_headers = (e.status, e.payload()), e.headers
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:
            log(f"{method} {req.path}: {traceback.format_exc()}")
            result = 500, {"error": "internal_error", "message": repr(e)}
        if not self.body_done:
            self.close_connection = True  # unread request body would be parsed as the next request
        if result is not None:
            if self.response_started:  # failed mid-stream: the only honest signal left is to hang up
                self.close_connection = True
            else:
                self.send_json(*result, headers=extra_headers)

    def _request(self, method: str) -> Request:
        self.chunked, self.remaining = body_framing(self.headers)
        self.body_done = not self.chunked and self.remaining == 0
        url = urlsplit(self.path)
        try:  # a preview's query is the app's business: it is passed on as sent, never parsed here
            fields = (
                {}
                if url.path.startswith("/proxy/")
                else parse_qs(url.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
            )
        except ValueError as e:
            raise HttpError(400, "bad_request", f"more than {MAX_QUERY_FIELDS} query fields") from e
        query = {k: v[0] for k, v in fields.items()}
        return Request(method, url.path, self._token(), query=query, raw_query=url.query, http=self)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def is_upgrade(self) -> bool:
        return "upgrade" in self.headers.get("Connection", "").lower() and bool(self.headers.get("Upgrade"))

    # -- request body

    def body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces, honouring Content-Length or chunked transfer encoding;
        past ``limit`` bytes (checked on each chunk's declared size, before reading it) a 413."""
        if self.chunked:
            yield from self._chunked(limit)
            return
        if limit is not None and self.remaining > limit:
            raise HttpError(413, "payload_too_large", f"body over {limit} bytes")
        while self.remaining > 0:
            data = self.rfile.read(min(self.remaining, CHUNK))
            if not data:
                raise HttpError(400, "bad_request", "body shorter than Content-Length")
            self.remaining -= len(data)
            yield data
        self.body_done = True

    def _chunked(self, limit: int | None) -> Iterator[bytes]:
        total = 0
        try:
            while size := chunk_size(self.rfile):
                total += size
                if limit is not None and total > limit:
                    raise HttpError(413, "payload_too_large", f"body over {limit} bytes")
                while size:
                    data = self.rfile.read(min(size, CHUNK))
                    if not data:
                        raise HttpError(400, "bad_request", "body ended early")
                    size -= len(data)
                    yield data
                chunk_end(self.rfile)
            read_trailers(self.rfile)
        except HttpError:
            self.close_connection = True
            raise
        self.body_done = True

    def read_json(self) -> dict[str, Any]:
        parts = list(self.body_chunks(MAX_BODY))
        if not parts:
            return {}
        try:
            body = json.loads(b"".join(parts))
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
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

    def start_response(
        self,
        status: int,
        headers: list[tuple[str, str]],
        length: int | None,
        body: bool = True,
        reason: str | None = None,
    ) -> None:
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

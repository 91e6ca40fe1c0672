"""``/runtime/v1/code`` and ``/runtime/v1/code/...``: forwarded to the in-guest code interpreter.

Templates built on ``code-interpreter`` run its code server on 127.0.0.1:49999 (see
``templates_app/provider/guest/code_server.py``). The agent checks the data-plane credential,
as for every ``/runtime/v1`` route, and forwards the request with the same path and query,
streaming both ways (a streamed run, ``Accept: application/x-ndjson``, reaches the client
line by line). The sandbox's env vars (from ``/init``) travel in ``X-Watasu-Sandbox-Env`` so
code sees them as processes do; a client's own header of that name is dropped.

When nothing listens there the answer is a 404 ``code_interpreter_unavailable`` that says which
template to start from. A client that hangs up while its code runs closes the forwarded
connection, which the code server takes as a reason to interrupt the run.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import select
import socket
from typing import TYPE_CHECKING

from .core import CHUNK, HttpError
from .identity import CONTROL, DATAPLANE
from .proxy import HOP_BY_HOP

if TYPE_CHECKING:
    from .routing import Agent, Request, Result
    from .server import AgentHandler

CODE_PREFIX = "/runtime/v1/code"
# The code server's port; WATASU_CODE_PORT lets tests on the host point the agent elsewhere.
CODE_PORT = int(os.environ.get("WATASU_CODE_PORT", "49999"))
MAX_CODE_BODY = 16 * 1024 * 1024  # the code server's own bound on a request
SANDBOX_ENV_HEADER = "X-Watasu-Sandbox-Env"
# Changes with the agent's secret, i.e. with every sandbox made from a memory snapshot: the
# code server reseeds the kernels' random generators when it sees a new one.
GENERATION_HEADER = "X-Watasu-Sandbox-Generation"
DROPPED = HOP_BY_HOP | {
    GENERATION_HEADER.lower(),
    "authorization",
    "content-length",
    "host",
    "x-watasu-forwarded-authorization",
    SANDBOX_ENV_HEADER.lower(),
}


def is_code_path(path: str) -> bool:
    return path == CODE_PREFIX or path.startswith(CODE_PREFIX + "/")


def unavailable() -> HttpError:
    return HttpError(
        404,
        "code_interpreter_unavailable",
        "no code interpreter answers in this sandbox: its template has none (start it from "
        "`code-interpreter` or a template built on it), or it stopped and is starting again "
        "(a few seconds; its contexts' state is lost)",
    )


def forward_code(agent: Agent, req: Request) -> Result:
    """Forward one request to the code server and stream its answer back."""
    agent.state.check(req.token, roles=(CONTROL, DATAPLANE))
    h = req.http
    assert h is not None
    if h.is_upgrade():
        raise HttpError(400, "bad_request", f"{req.path} is no WebSocket route")
    conn = http.client.HTTPConnection("127.0.0.1", CODE_PORT, timeout=10)
    try:
        conn.connect()
    except OSError as e:
        conn.close()
        raise unavailable() from e
    assert conn.sock is not None
    conn.sock.settimeout(None)  # a run lasts as long as its own timeout says
    try:
        _send(agent, req, h, conn)
        if not _wait_answer(h, conn.sock):
            conn.close()  # the client left: closing upstream makes the code server interrupt the run
            h.close_connection = True
            return None
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise HttpError(502, "bad_gateway", f"the code interpreter failed: {e}") from e
    try:
        _relay(h, resp, req.method)
    finally:
        conn.close()
    return None


def _send(agent: Agent, req: Request, h: AgentHandler, conn: http.client.HTTPConnection) -> None:
    target = req.path + (f"?{req.raw_query}" if req.raw_query else "")
    conn.putrequest(req.method, target, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"127.0.0.1:{CODE_PORT}")
    for k, v in h.headers.items():
        if k.lower() not in DROPPED:
            conn.putheader(k, v)
    with agent.state.lock:
        env = dict(agent.state.env)
        generation = hashlib.sha256(agent.state.secret.encode()).hexdigest()[:32]
    conn.putheader(GENERATION_HEADER, generation)
    if env:
        conn.putheader(SANDBOX_ENV_HEADER, base64.b64encode(json.dumps(env).encode()).decode())
    body = b"".join(h.body_chunks(MAX_CODE_BODY))  # bounded, and whole: the server reads a length
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body if body else None)


def _wait_answer(h: AgentHandler, upstream: socket.socket) -> bool:
    """Wait for the code server's first byte; False if the client hung up first."""
    watch_client = True
    while True:
        sockets = [upstream, h.connection] if watch_client else [upstream]
        readable, _, _ = select.select(sockets, [], [], 30)
        if upstream in readable:
            return True
        if h.connection in readable:
            try:
                if h.connection.recv(1, socket.MSG_PEEK) == b"":
                    return False
            except OSError:
                return False
            watch_client = False  # a pipelined next request: it waits its turn


def _relay(h: AgentHandler, resp: http.client.HTTPResponse, method: str) -> None:
    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
    if method == "HEAD" or resp.status in (204, 304):
        h.start_response(resp.status, headers, None, body=False, reason=resp.reason)
        return
    h.start_response(resp.status, headers, resp.length, reason=resp.reason)
    while data := resp.read1(CHUNK):
        h.write_body(data)
        h.wfile.flush()
    h.end_body()

#!/usr/bin/env python3
"""Watasu guest agent: runs inside every sandbox VM, stdlib only (Python 3.11+).

It is the data plane's far end. Today it serves health, init, exec and a process list;
later it grows the /runtime/v1 protocol (files, PTY, watch, git) as more routes on the
same ``Router``.

Authentication (see NOTES.md, "agent secret scheme"):
- At boot the only accepted credential is the boot token the host put on the kernel
  command line (``watasu.token=``): only the host and this guest can read it.
- ``POST /init`` must carry the *current* credential and installs a new secret. While
  the agent is *fresh* (just booted, or sealed as a template with ``"seal": true``) the
  new secret must differ from the current one and nothing but /init and /health is
  served. A clone restored from a template snapshot therefore accepts exactly one thing:
  an init authenticated by the template secret, which rotates it away. If anyone else
  won that race, the host's init gets 401 and the host destroys the sandbox.
- Every other route needs ``Authorization: Bearer <secret>``.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import hmac
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AGENT_PORT = 49983
MAX_BODY = 16 * 1024 * 1024
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
CLOCK_REALTIME = 0


class HttpError(Exception):
    """An error answered as ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --------------------------------------------------------------------------- state


@dataclass
class AgentState:
    """Mutable agent identity; one lock guards it because handlers run in threads."""

    secret: str
    fresh: bool = True
    env: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, token: str | None, *, allow_fresh: bool = False) -> None:
        """Raise 401 unless ``token`` is the current secret (and the agent is initialised)."""
        if token is None or not hmac.compare_digest(token.encode(), self.secret.encode()):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token")
        if self.fresh and not allow_fresh:
            raise HttpError(401, "unauthorized", "agent not initialised")

    def rotate(self, token: str | None, new_secret: str, seal: bool) -> None:
        """Atomically check the current credential and install ``new_secret``."""
        if len(new_secret) < 16:
            raise HttpError(400, "bad_request", "secret too short")
        with self.lock:
            self.check(token, allow_fresh=True)
            if self.fresh and hmac.compare_digest(new_secret.encode(), self.secret.encode()):
                raise HttpError(400, "bad_request", "a fresh agent must get a new secret")
            self.secret, self.fresh = new_secret, seal


def boot_token(cmdline_path: str = "/proc/cmdline") -> str:
    """The ``watasu.token=`` kernel argument, or a random value nobody knows."""
    try:
        with open(cmdline_path) as f:
            for arg in f.read().split():
                if arg.startswith("watasu.token="):
                    return arg.split("=", 1)[1]
    except OSError:
        pass
    return os.urandom(32).hex()


# --------------------------------------------------------------------------- system effects


def set_clock(epoch: float) -> None:
    """Set CLOCK_REALTIME: a restored clone wakes up with the template's clock."""

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    libc = ctypes.CDLL(None, use_errno=True)
    ts = Timespec(int(epoch), int((epoch % 1) * 1e9))
    if libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
        raise OSError(ctypes.get_errno(), "clock_settime failed")


def add_entropy(data: bytes) -> None:
    """Mix host entropy into the kernel pool and reseed: clones share the template's RNG.

    RNDADDENTROPY mixes (and credits) the bytes into the input pool, but since Linux
    5.18 the ChaCha output state is only rebuilt on its reseed interval, so without
    RNDRESEEDCRNG two clones would read identical /dev/urandom bytes for a minute.
    Failing either ioctl fails the init: a clone with a shared RNG must not be used.
    Python's ``random`` module state is reseeded too.
    """
    if not data:
        raise ValueError("init needs entropy")
    with open("/dev/urandom", "wb") as f:
        req = struct.pack("ii", len(data) * 8, len(data)) + data
        fcntl.ioctl(f.fileno(), RNDADDENTROPY, req)
        fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
    random.seed(os.urandom(32))


def set_hostname(name: str) -> None:
    """Set the kernel hostname and /etc/hostname (best effort for the file)."""
    socket.sethostname(name)
    try:
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- processes


@dataclass
class TrackedProcess:
    """A background process started through the agent."""

    pid: int
    cmd: list[str]
    popen: subprocess.Popen[bytes]


class ProcessTable:
    """Background processes the agent started, so they can be listed (and reaped)."""

    def __init__(self) -> None:
        self._procs: dict[int, TrackedProcess] = {}
        self._lock = threading.Lock()

    def start(self, cmd: list[str], env: dict[str, str], cwd: str | None) -> int:
        """Start ``cmd`` detached from the request (own session, output discarded)."""
        p = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        with self._lock:
            self._procs[p.pid] = TrackedProcess(p.pid, cmd, p)
        return p.pid

    def list(self) -> list[dict[str, Any]]:
        """Snapshot of tracked processes with running state / exit code."""
        with self._lock:
            procs = list(self._procs.values())
        out = []
        for t in procs:
            code = t.popen.poll()
            out.append({"pid": t.pid, "cmd": t.cmd, "running": code is None, "exit_code": code})
        return out


def run_command(cmd: list[str], env: dict[str, str], cwd: str | None, timeout: float,
                stdin: bytes | None) -> dict[str, Any]:
    """Run to completion and capture output; a timeout kills the process group."""
    started = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        timed_out = True
    return {
        "exit_code": p.returncode, "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"), "timed_out": timed_out,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


# --------------------------------------------------------------------------- routes


Handler = Callable[["Agent", "Request"], tuple[int, Any]]


@dataclass
class Request:
    """What a route handler sees: method, path, parsed JSON body, bearer token."""

    method: str
    path: str
    body: dict[str, Any]
    token: str | None


class Router:
    """Maps (method, path) to handlers; each route declares whether it needs auth."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[Handler, str]] = {}

    def add(self, method: str, path: str, auth: str = "secret") -> Callable[[Handler], Handler]:
        """Decorator. ``auth`` is "none", "init" (custom check in handler) or "secret"."""
        def deco(fn: Handler) -> Handler:
            self.routes[(method, path)] = (fn, auth)
            return fn
        return deco


router = Router()


class Agent:
    """The agent's state and services, shared by all request threads."""

    def __init__(self, secret: str) -> None:
        self.state = AgentState(secret=secret)
        self.processes = ProcessTable()

    def dispatch(self, req: Request) -> tuple[int, Any]:
        """Find the route, enforce its auth, call it."""
        route = router.routes.get((req.method, req.path))
        if route is None:
            raise HttpError(404, "not_found", f"no route {req.method} {req.path}")
        fn, auth = route
        if auth == "secret":
            self.state.check(req.token)
        return fn(self, req)

    def process_env(self) -> dict[str, str]:
        """Environment for new processes: a sane base plus the env vars from init."""
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "LANG": "C.UTF-8"}
        with self.state.lock:
            return {**base, **self.state.env}


@router.add("GET", "/health", auth="none")
def health(agent: Agent, req: Request) -> tuple[int, Any]:
    return 200, {"status": "ok"}


@router.add("POST", "/init", auth="init")
def init(agent: Agent, req: Request) -> tuple[int, Any]:
    """Give this VM its identity: secret, env vars, clock, hostname, entropy."""
    b = req.body
    secret = b.get("secret")
    if not isinstance(secret, str):
        raise HttpError(400, "bad_request", "secret required")
    agent.state.rotate(req.token, secret, seal=bool(b.get("seal", False)))
    if "entropy" in b:
        add_entropy(base64.b64decode(b["entropy"]))
    if "clock" in b:
        set_clock(float(b["clock"]))
    if b.get("hostname"):
        set_hostname(str(b["hostname"]))
    if "env_vars" in b:
        env = {str(k): str(v) for k, v in (b["env_vars"] or {}).items()}
        with agent.state.lock:
            agent.state.env = env
    return 200, {"status": "ok", "time": time.time()}


@router.add("POST", "/exec")
def exec_(agent: Agent, req: Request) -> tuple[int, Any]:
    """Run ``cmd`` (list, or string for ``sh -c``); ``background`` returns at once with a pid."""
    cmd = req.body.get("cmd")
    if isinstance(cmd, str):
        cmd = ["/bin/sh", "-c", cmd]
    if not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
        raise HttpError(400, "bad_request", "cmd must be a string or a list of strings")
    env = {**agent.process_env(), **{str(k): str(v) for k, v in req.body.get("env", {}).items()}}
    cwd = req.body.get("cwd")
    if req.body.get("background"):
        return 200, {"pid": agent.processes.start(cmd, env, cwd)}
    stdin = req.body.get("stdin")
    timeout = float(req.body.get("timeout", 60))
    return 200, run_command(cmd, env, cwd, timeout, stdin.encode() if stdin else None)


@router.add("GET", "/processes")
def processes(agent: Agent, req: Request) -> tuple[int, Any]:
    return 200, {"processes": agent.processes.list()}


# --------------------------------------------------------------------------- HTTP plumbing


class AgentHandler(BaseHTTPRequestHandler):
    """Parses HTTP, delegates to ``Agent.dispatch``, writes JSON back."""

    server_version = "watasu-agent/0.1"
    protocol_version = "HTTP/1.1"
    agent: Agent  # set on the subclass built by ``serve``

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        try:
            req = Request(method, self.path.split("?", 1)[0], self._body(), self._token())
            status, payload = self.agent.dispatch(req)
        except HttpError as e:
            status, payload = e.status, {"error": e.code, "message": e.message}
        except Exception as e:
            status, payload = 500, {"error": "internal", "message": repr(e)}
        self._reply(status, payload)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HttpError(413, "too_large", "body too large")
        if not length:
            return {}
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            raise HttpError(400, "bad_request", f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise HttpError(400, "bad_request", "body must be a JSON object")
        return body

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(host: str = "0.0.0.0", port: int = AGENT_PORT, secret: str | None = None) -> None:
    """Serve forever. ``secret`` overrides the boot token (for tests on the host)."""
    agent = Agent(secret or boot_token())
    handler = type("BoundHandler", (AgentHandler,), {"agent": agent})
    with AgentServer((host, port), handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    serve(port=int(os.environ.get("WATASU_AGENT_PORT", AGENT_PORT)),
          secret=os.environ.get("WATASU_AGENT_TOKEN"))

#!/usr/bin/python3
"""mcp-gateway: MCP servers installed in a template, served behind one token on one port.

Installed as ``/usr/local/bin/mcp-gateway`` by the ``mcp-gateway`` provider template; runs on
Debian 12's python3 (3.11) with the standard library only.

``mcp-gateway pull <server>...`` (template build, as root) installs servers: ``pypi:<pkg>[==ver]``
into a venv of its own, ``npm:<pkg>[@ver]`` with Debian's nodejs, or a name from ``CATALOG``;
``<name>=<source>`` picks the server's name. Each is recorded in ``/etc/mcp-gateway/servers.json``.

``mcp-gateway serve`` (started by the platform at create) reads ``/etc/mcp-gateway/config.json``
(``{"servers": {name: {"env"?, "command"?, "args"?}}}``) and the token in
``/etc/mcp-gateway/.token``, starts every configured server as a stdio child, and serves MCP
Streamable HTTP at ``/mcp``: ``Authorization: Bearer <token>`` on every request. Tools and prompts
are named ``<server>__<name>``; resources keep their URIs. ``GET /health`` (token too) says each
server's state; ``mcp-gateway health --wait S`` asks it from inside the guest.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VERSION = "1.0.0"
# Where things live; `--etc`, `--servers-dir` and `--pidfile` move them (the host tests do).
ETC = Path("/etc/mcp-gateway")
SERVERS_DIR = Path("/opt/mcp-gateway/servers")
PIDFILE = Path("/run/mcp-gateway.pid")  # the platform replaces a running gateway by this pid
DEFAULT_HOST = "127.0.0.1"  # the agent's /proxy reaches the guest's loopback; nothing else needs to
DEFAULT_PORT = 50005
SEP = "__"  # <server>__<tool>: server names never contain it
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
PYPI_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9,._-]+\])?(?:==[A-Za-z0-9.+!_-]+)?")
NPM_RE = re.compile(r"(?:@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(?:@[A-Za-z0-9.^~_-]+)?")
PROTOCOLS = ("2025-06-18", "2025-03-26", "2024-11-05")
START_SECONDS = 120.0  # a server's initialize; under TCG a Python server's imports are slow
CALL_SECONDS = 300.0  # any later request to a server
MAX_BODY = 4 * 1024 * 1024
STDERR_LINES = 40
MAX_SESSIONS = 1024

# Bare names `pull` knows: source, and the arguments the server needs to be useful.
CATALOG: dict[str, dict[str, Any]] = {
    "time": {"source": "pypi:mcp-server-time"},
    "fetch": {"source": "pypi:mcp-server-fetch"},
    "git": {"source": "pypi:mcp-server-git"},
    "filesystem": {"source": "npm:@modelcontextprotocol/server-filesystem", "args": ["/"]},
    "everything": {"source": "npm:@modelcontextprotocol/server-everything", "args": ["stdio"]},
    "memory": {"source": "npm:@modelcontextprotocol/server-memory"},
    "sequential-thinking": {"source": "npm:@modelcontextprotocol/server-sequential-thinking"},
}


class GatewayError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------
# pull


def _run(argv: list[str], what: str) -> str:
    """Run one install step, its output streamed to the build log as it comes."""
    print(f"mcp-gateway: {what}", flush=True)
    lines: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"  {lines[-1]}", flush=True)
    if proc.returncode != 0:
        tail = "\n".join(lines[-20:])
        raise GatewayError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return "\n".join(lines)


def default_name(kind: str, package: str) -> str:
    """`mcp-server-time` -> `time`, `@modelcontextprotocol/server-filesystem` -> `filesystem`."""
    base = re.split(r"[=\[@]", package.rpartition("/")[2] if kind == "npm" else package)[0].lower()
    base = re.sub(r"[._]+", "-", base)
    for prefix in ("mcp-server-", "server-", "mcp-"):
        if base.startswith(prefix) and len(base) > len(prefix):
            base = base[len(prefix) :]
            break
    for suffix in ("-mcp-server", "-mcp"):
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return base


def parse_pull(arg: str) -> tuple[str, str, str, list[str]]:
    """`[name=](pypi|npm):pkg` or a catalog name -> (name, kind, package, default args)."""
    name, eq, rest = arg.partition("=")
    if not eq or ":" in name or not NAME_RE.fullmatch(name):
        name, rest = "", arg
    args: list[str] = []
    if ":" not in rest:
        entry = CATALOG.get(rest)
        if entry is None:
            known = ", ".join(sorted(CATALOG))
            raise GatewayError(
                f"unknown MCP server '{rest}': use one of {known}, or pypi:<package>[==version] "
                f"or npm:<package>[@version] (optionally as <name>=<source>)"
            )
        name, rest, args = name or rest, entry["source"], list(entry.get("args", []))
    kind, _, package = rest.partition(":")
    pattern = {"pypi": PYPI_RE, "npm": NPM_RE}.get(kind)
    if pattern is None or not pattern.fullmatch(package):
        raise GatewayError(
            f"'{arg}' is not a server: expected pypi:<package>[==version], npm:<package>[@version] "
            f"or a catalog name ({', '.join(sorted(CATALOG))})"
        )
    name = name or default_name(kind, package)
    if not NAME_RE.fullmatch(name):
        raise GatewayError(f"'{name}' is not a usable server name; pull it as <name>={rest}")
    return name, kind, package, args


_SCRIPTS = """
import importlib.metadata as m, json, sys
eps = m.distribution(sys.argv[1]).entry_points
print(json.dumps([e.name for e in eps if e.group == "console_scripts"]))
"""


def _pick(package: str, commands: list[str], name: str) -> str:
    if not commands:
        raise GatewayError(f"{package} installs no command to run; it is not a stdio MCP server")
    bare = package.rpartition("/")[2].lower()
    for wanted in (bare, name, f"mcp-server-{name}"):
        if wanted in commands:
            return wanted
    mcp_like = [c for c in commands if "mcp" in c.lower()]
    if len(commands) == 1 or len(mcp_like) == 1:
        return (mcp_like or commands)[0]
    raise GatewayError(f"{package} installs several commands ({', '.join(commands)}); cannot tell which")


def install_pypi(name: str, package: str) -> str:
    venv = SERVERS_DIR / name
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], f"venv for {name}")
    pip = [str(venv / "bin/pip"), "install", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]
    _run([*pip, package], f"pip install {package}")
    dist = re.split(r"[=\[]", package)[0]
    out = _run([str(venv / "bin/python"), "-c", _SCRIPTS, dist], f"commands of {dist}")
    return str(venv / "bin" / _pick(dist, json.loads(out.strip().splitlines()[-1]), name))


def _ensure_node() -> None:
    if shutil.which("npm") and shutil.which("node"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "nodejs", "npm"],
    ):
        print(f"mcp-gateway: {' '.join(argv)}", flush=True)
        if subprocess.run(argv, env=env).returncode != 0:
            raise GatewayError(f"'{' '.join(argv)}' failed: nodejs and npm are needed for npm servers")


def install_npm(name: str, package: str) -> str:
    _ensure_node()
    prefix = SERVERS_DIR / name
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    _run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", package], f"npm {package}")
    bare = "@" + package[1:].partition("@")[0] if package.startswith("@") else package.partition("@")[0]
    manifest = json.loads((prefix / "node_modules" / bare / "package.json").read_text())
    bins = manifest.get("bin") or {}
    if isinstance(bins, str):
        bins = {bare.rpartition("/")[2]: bins}
    command = _pick(bare, sorted(bins), name)
    return str(prefix / "node_modules/.bin" / command)


def load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def write_json(path: Path, value: Any, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def pull(args: list[str]) -> None:
    """Install each server, then record it; all names are checked before anything installs."""
    if not args:
        raise GatewayError("usage: mcp-gateway pull <server>... (try: mcp-gateway catalog)")
    wanted = [parse_pull(a) for a in args]
    registry = load_json(ETC / "servers.json", {})
    for name, kind, package, default_args in wanted:
        began = time.monotonic()
        known = registry.get(name) or {}
        if known.get("source") == f"{kind}:{package}" and os.access(known.get("command", ""), os.X_OK):
            # pulled already (e.g. by the template built on): the same source is not installed twice
            print(f"mcp-gateway: {name} already installed ({kind}:{package})", flush=True)
            continue
        command = install_pypi(name, package) if kind == "pypi" else install_npm(name, package)
        registry[name] = {"command": command, "args": default_args, "source": f"{kind}:{package}"}
        write_json(ETC / "servers.json", registry, 0o644)
        print(f"mcp-gateway: {name} ready ({kind}:{package}) in {time.monotonic() - began:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# stdio children


class Child:
    """One MCP server on stdio: newline-delimited JSON-RPC, requests matched to answers by id."""

    def __init__(self, name: str, command: str, args: list[str], env: dict[str, str]) -> None:
        self.name, self.command, self.args, self.env = name, command, args, env
        self.state, self.error = "starting", ""
        self.capabilities: dict[str, Any] = {}
        self.stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, list[Any]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.error:
            out["error"] = self.error
        if self.state != "ready" and self.stderr:
            out["stderr_tail"] = "\n".join(self.stderr)
        return out

    def start(self) -> None:
        """Spawn, initialize, announce initialized; any failure leaves state `failed`."""
        try:
            self.proc = subprocess.Popen(
                [self.command, *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        except OSError as e:
            self._fail(f"cannot start {self.command}: {e.strerror or e}")
            return
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        try:
            result = self.request(
                "initialize",
                {
                    "protocolVersion": PROTOCOLS[0],
                    "capabilities": {},
                    "clientInfo": {"name": "mcp-gateway", "version": VERSION},
                },
                timeout=START_SECONDS,
            )
            self.notify("notifications/initialized")
        except RpcError as e:
            self._fail(f"initialize failed: {e.message}")
            return
        self.capabilities = result.get("capabilities") or {}
        self.state = "ready"

    def _fail(self, error: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.state, self.error = "failed", error

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        with contextlib.suppress(OSError):
            self._send(message)

    def request(self, method: str, params: dict[str, Any] | None, timeout: float | None = None) -> Any:
        """Send one request and wait for its answer (RpcError for an error, exit or timeout)."""
        timeout = CALL_SECONDS if timeout is None else timeout
        if self.proc is None or self.proc.poll() is not None:
            raise RpcError(-32603, f"MCP server '{self.name}' is not running{self._exit_note()}")
        slot: list[Any] = [threading.Event(), None]
        with self._lock:
            self._next += 1
            rid = self._next
            self._pending[rid] = slot
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        try:
            self._send(message)
        except OSError as e:
            self._pending.pop(rid, None)
            raise RpcError(-32603, f"MCP server '{self.name}' closed its input: {e}") from e
        if not slot[0].wait(timeout):
            self._pending.pop(rid, None)
            self.notify("notifications/cancelled", {"requestId": rid, "reason": "gateway timeout"})
            raise RpcError(-32603, f"MCP server '{self.name}' did not answer {method} within {timeout:g} s")
        answer = slot[1]
        if answer is None:
            raise RpcError(-32603, f"MCP server '{self.name}' exited{self._exit_note()}")
        if "error" in answer:
            err = answer["error"] if isinstance(answer["error"], dict) else {}
            raise RpcError(err.get("code", -32603), str(err.get("message", "error")), err.get("data"))
        return answer.get("result")

    def _exit_note(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None and self._stderr_thread is not None:
            self._stderr_thread.join(2)  # an exited server's last words are its error
        note = f" (exit status {code})" if code is not None else ""
        return note + (f"; stderr: {self.stderr[-1]}" if self.stderr else "")

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self.stderr.append(f"[stdout, not JSON] {line[:200].decode(errors='replace').rstrip()}")
                continue
            if isinstance(message, dict):
                try:
                    self._dispatch(message)
                except Exception as e:  # one bad message never stops this reader
                    self.stderr.append(f"[stdout, not understood] {e!r}"[:500])
        self.proc.wait()
        if self.state == "ready":
            self.state, self.error = "exited", f"exited with status {self.proc.returncode}"
        for slot in list(self._pending.values()):
            slot[0].set()
        self._pending.clear()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" in message:  # the server asks us (sampling, roots...): we offer none
            if "id" in message:
                self._send_quiet(message["id"], f"the gateway does not support {message['method']}")
            return
        rid = message.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):  # ours are ints; anything else is noise
            self.stderr.append(f"[stdout, an answer to no request of ours] id {str(rid)[:80]}")
            return
        slot = self._pending.pop(rid, None)
        if slot is not None:
            slot[1] = message
            slot[0].set()

    def _send_quiet(self, rid: Any, text: str) -> None:
        with contextlib.suppress(OSError):
            self._send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": text}})

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line[:500].decode(errors="replace").rstrip())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


# ---------------------------------------------------------------------------------------------
# the gateway


class Gateway:
    """The configured children and the MCP methods answered over them."""

    def __init__(self, children: dict[str, Child], token: str) -> None:
        self.children, self.token = children, token
        # Session ids, oldest first: a client that never sends DELETE cannot grow them forever.
        self.sessions: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._sessions_lock = threading.Lock()
        self.resource_owner: dict[str, str] = {}

    def session_open(self) -> str:
        sid = secrets.token_urlsafe(24)
        with self._sessions_lock:
            self.sessions[sid] = None
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return sid

    def session_end(self, sid: str) -> None:
        with self._sessions_lock:
            self.sessions.pop(sid, None)

    def health(self) -> dict[str, Any]:
        states = {c.state for c in self.children.values()}
        overall = "failed" if "failed" in states else "starting" if "starting" in states else "ready"
        servers = {name: c.describe() for name, c in self.children.items()}
        return {"state": overall, "servers": servers, "version": VERSION}

    def _with(self, capability: str) -> list[Child]:
        return [c for c in self.children.values() if c.state == "ready" and capability in c.capabilities]

    def _all_pages(self, child: Child, method: str, key: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        for _ in range(100):
            result = child.request(method, {"cursor": cursor} if cursor else {}) or {}
            items.extend(x for x in result.get(key, []) if isinstance(x, dict))
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return items

    def _named(self, capability: str, method: str, key: str) -> dict[str, Any]:
        """Each ready server's items, named `<server>__<name>`."""
        out = []
        for child in self._with(capability):
            for item in self._all_pages(child, method, key):
                out.append({**item, "name": f"{child.name}{SEP}{item.get('name', '')}"})
        return {key: out}

    def _owner(self, prefixed: Any, kind: str) -> tuple[Child, str]:
        server, sep, name = str(prefixed).partition(SEP)
        child = self.children.get(server)
        if not sep or child is None:
            raise RpcError(-32602, f"unknown {kind} '{prefixed}': names are <server>{SEP}<{kind}>")
        return child, name

    def _resources(self, method: str, key: str) -> dict[str, Any]:
        out = []
        for child in self._with("resources"):
            for item in self._all_pages(child, method, key):
                if "uri" in item:
                    self.resource_owner[str(item["uri"])] = child.name
                out.append(item)
        return {key: out}

    def _read_resource(self, params: dict[str, Any]) -> Any:
        uri = str(params.get("uri", ""))
        owner = self.resource_owner.get(uri)
        candidates = [self.children[owner]] if owner else self._with("resources")
        last: RpcError = RpcError(-32002, f"resource not found: {uri}")
        for child in candidates:
            try:
                return child.request("resources/read", params)
            except RpcError as e:
                last = e
        raise last

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """Answer one request after initialize."""
        if method == "ping":
            return {}
        if method == "tools/list":
            return self._named("tools", "tools/list", "tools")
        if method == "prompts/list":
            return self._named("prompts", "prompts/list", "prompts")
        if method in ("tools/call", "prompts/get"):
            child, name = self._owner(params.get("name"), method.partition("/")[0][:-1])
            return child.request(method, {**params, "name": name})
        if method == "resources/list":
            return self._resources("resources/list", "resources")
        if method == "resources/templates/list":
            return self._resources("resources/templates/list", "resourceTemplates")
        if method == "resources/read":
            return self._read_resource(params)
        if method == "logging/setLevel":
            for child in self._with("logging"):
                child.request(method, params)
            return {}
        raise RpcError(-32601, f"method not found: {method}")

    def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        caps: dict[str, Any] = {"tools": {"listChanged": False}}
        if self._with("prompts"):
            caps["prompts"] = {"listChanged": False}
        if self._with("resources"):
            caps["resources"] = {"listChanged": False, "subscribe": False}
        return {
            "protocolVersion": asked if asked in PROTOCOLS else PROTOCOLS[0],
            "capabilities": caps,
            "serverInfo": {"name": "mcp-gateway", "version": VERSION},
            "instructions": f"Tools of {', '.join(sorted(self.children))}, named <server>{SEP}<tool>.",
        }


def rpc_body(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _answer(rid: Any, fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return {"jsonrpc": "2.0", "id": rid, "result": fn(*args)}
    except RpcError as e:
        return {"jsonrpc": "2.0", "id": rid, "error": e.body()}
    except Exception as e:  # a server's malformed answer: an error for this request, not a hang-up
        return {"jsonrpc": "2.0", "id": rid, "error": rpc_body(-32603, f"gateway error: {e!r}"[:500])}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"mcp-gateway/{VERSION}"
    gateway: Gateway

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(
            f"mcp-gateway: {self.command} {self.path.split('?')[0]} {args[1] if len(args) > 1 else ''}\n"
        )

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.gateway.token.encode()
        ):
            return True
        self._drain()
        self._reply(
            401,
            {"error": "unauthorized", "message": "Send Authorization: Bearer <the sandbox's MCP token>."},
            {"WWW-Authenticate": 'Bearer realm="mcp-gateway"'},
        )
        return False

    def _drain(self) -> None:
        """Read the body of a request answered without it, or drop the connection."""
        try:
            self._body()
        except ValueError:
            self.close_connection = True

    def _route(self) -> str | None:
        path = self.path.split("?", 1)[0]
        if path in ("/mcp", "/mcp/", "/health"):
            return path.rstrip("/")
        self._drain()
        self._reply(404, {"error": "not_found", "message": "The MCP endpoint is /mcp."})
        return None

    def do_GET(self) -> None:
        path = self._route()
        if path is None or not self._authorised():
            return
        if path == "/health":
            self._reply(200, self.gateway.health())
        else:  # no server-initiated stream: the spec lets a server refuse GET with 405
            self._reply(
                405,
                {"error": "method_not_allowed", "message": "POST JSON-RPC to /mcp."},
                {"Allow": "POST, DELETE"},
            )

    def do_DELETE(self) -> None:
        path = self._route()
        if path is None or not self._authorised():
            return
        sid = self.headers.get("Mcp-Session-Id", "")
        if path != "/mcp" or sid not in self.gateway.sessions:
            self._reply(404, {"error": "not_found", "message": "No such MCP session."})
            return
        self.gateway.session_end(sid)
        self._reply(204)

    def do_POST(self) -> None:
        path = self._route()
        if path is None or not self._authorised():
            return
        if path != "/mcp":
            self._reply(405, {"error": "method_not_allowed", "message": "GET /health."}, {"Allow": "GET"})
            return
        try:
            body = self._body()
        except ValueError as e:
            self.close_connection = True
            self._reply(413 if "large" in str(e) else 400, rpc_error(None, -32600, str(e)))
            return
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            self._reply(400, rpc_error(None, -32700, "parse error: the body is not JSON"))
            return
        self._handle(payload)

    def _length(self) -> int:
        text = self.headers.get("Content-Length") or "0"
        if not text.isascii() or not text.isdigit():
            raise ValueError("Content-Length is not a number")
        if int(text) > MAX_BODY:
            raise ValueError("the body is too large: at most 4 MiB")
        return int(text)

    def _body(self) -> bytes:
        """The request body, sized or chunked (the agent forwards a chunked body as it came)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(self._length())
        chunks: list[bytes] = []
        total = 0
        while True:
            size_text = self.rfile.readline(80).split(b";")[0].strip()
            if not size_text or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise ValueError("bad chunked framing")
            size = int(size_text, 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise ValueError("the body is too large: at most 4 MiB")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _handle(self, payload: Any) -> None:
        batch = isinstance(payload, list)
        messages = payload if batch else [payload]
        if not messages or not all(isinstance(m, dict) and m.get("jsonrpc") == "2.0" for m in messages):
            self._reply(400, rpc_error(None, -32600, "invalid request: expected JSON-RPC 2.0 message(s)"))
            return
        requests = [m for m in messages if "method" in m and "id" in m]
        headers: dict[str, str] = {}
        init = [m for m in requests if m["method"] == "initialize"]
        if init:
            headers["Mcp-Session-Id"] = self.gateway.session_open()
        elif not self._session_ok():
            return
        if not requests:
            self._reply(202)
            return
        answers = [self._one(m) for m in requests]
        self._respond(answers if batch else answers[0], headers)

    def _session_ok(self) -> bool:
        sid = self.headers.get("Mcp-Session-Id")
        if sid is None:
            self._reply(400, rpc_error(None, -32000, "Mcp-Session-Id header is required; initialize first"))
            return False
        if sid not in self.gateway.sessions:
            self._reply(404, rpc_error(None, -32001, "unknown or ended MCP session; initialize again"))
            return False
        version = self.headers.get("MCP-Protocol-Version")
        if version is not None and version not in PROTOCOLS:
            self._reply(400, rpc_error(None, -32000, f"unsupported MCP-Protocol-Version {version}"))
            return False
        return True

    def _one(self, message: dict[str, Any]) -> dict[str, Any]:
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        if message["method"] == "initialize":
            return _answer(message["id"], self.gateway.initialize, params)
        return _answer(message["id"], self.gateway.call, message["method"], params)

    def _respond(self, body: Any, headers: dict[str, str]) -> None:
        """JSON unless the client accepts only an event stream."""
        accept = self.headers.get("Accept", "")
        if "text/event-stream" in accept and "application/json" not in accept:
            data = f"event: message\ndata: {json.dumps(body)}\n\n".encode()
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._reply(200, body, headers)


def rpc_error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def build_children(config: dict[str, Any], registry: dict[str, Any]) -> dict[str, Child]:
    """The config's servers, each completed from servers.json (command and default args)."""
    servers = config.get("servers")
    if not isinstance(servers, dict):
        raise GatewayError('config.json needs {"servers": {<name>: {...}}}')
    children = {}
    for name, spec in servers.items():
        spec = spec or {}
        known = registry.get(name, {})
        command = spec.get("command") or known.get("command")
        if not command:
            children[name] = Child(name, "", [], {})
            children[name]._fail(
                "it is not installed in this template; build a template from "
                f"mcp-gateway with add_mcp_server('{name}') "
                f"(installed: {', '.join(sorted(registry)) or 'none'})"
            )
            continue
        args = spec["args"] if "args" in spec else known.get("args", [])
        children[name] = Child(
            name, command, [str(a) for a in args], {**known.get("env", {}), **spec.get("env", {})}
        )
    return children


def serve(host: str, port: int) -> None:
    config = load_json(ETC / "config.json", None)
    if config is None:
        raise GatewayError(f"{ETC / 'config.json'} is missing: the platform writes it at create")
    token = (ETC / ".token").read_text().strip()
    if len(token) < 16:
        raise GatewayError(f"{ETC / '.token'} holds no usable token")
    gateway = Gateway(build_children(config, load_json(ETC / "servers.json", {})), token)
    Handler.gateway = gateway
    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    for child in gateway.children.values():
        if child.state == "starting":
            threading.Thread(target=child.start, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run `finally`: stop the children
    with contextlib.suppress(OSError):
        PIDFILE.write_text(f"{os.getpid()}\n")
    print(
        f"mcp-gateway: serving {', '.join(gateway.children) or 'no servers'} on http://{host}:{port}/mcp",
        flush=True,
    )
    try:
        httpd.serve_forever()
    finally:
        for child in gateway.children.values():
            child.stop()


def health(url: str, wait: float) -> int:
    """Print the gateway's health; 0 ready, 1 failed, 2 not answering or still starting."""
    token = (ETC / ".token").read_text().strip()
    deadline = time.monotonic() + wait
    last: Any = {"state": "unreachable"}
    while True:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                last = json.loads(response.read())
        except (OSError, ValueError) as e:
            last = {"state": "unreachable", "error": str(getattr(e, "reason", e))}
        if last.get("state") in ("ready", "failed") or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    print(json.dumps(last))
    return {"ready": 0, "failed": 1}.get(last.get("state"), 2)


def _options(ns: argparse.Namespace) -> None:
    """The command line's places and limits, for every function of this program."""
    global ETC, SERVERS_DIR, PIDFILE, START_SECONDS, CALL_SECONDS
    ETC, SERVERS_DIR = ns.etc, ns.servers_dir
    PIDFILE = getattr(ns, "pidfile", PIDFILE)
    START_SECONDS = getattr(ns, "start_seconds", START_SECONDS)
    CALL_SECONDS = getattr(ns, "call_seconds", CALL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--etc", type=Path, default=ETC, help=f"config, token and registry (default {ETC})")
    parser.add_argument(
        "--servers-dir", type=Path, default=SERVERS_DIR, help=f"installs (default {SERVERS_DIR})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="install MCP servers (template build, as root)")
    p.add_argument("servers", nargs="*")
    s = sub.add_parser("serve", help="serve the configured servers at /mcp")
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--pidfile", type=Path, default=PIDFILE)
    s.add_argument("--start-seconds", type=float, default=START_SECONDS, help="for a server's initialize")
    s.add_argument("--call-seconds", type=float, default=CALL_SECONDS, help="for any later request")
    h = sub.add_parser("health", help="print the running gateway's health")
    h.add_argument("--wait", type=float, default=0.0, help="seconds to wait for ready or failed")
    h.add_argument("--port", type=int, default=DEFAULT_PORT)
    sub.add_parser("catalog", help="list the bare names pull knows")
    sub.add_parser("list", help="list installed servers")
    ns = parser.parse_args(argv)
    _options(ns)
    try:
        if ns.command == "pull":
            pull(ns.servers)
        elif ns.command == "serve":
            serve(ns.host, ns.port)
        elif ns.command == "health":
            return health(f"http://127.0.0.1:{ns.port}/health", ns.wait)
        elif ns.command == "catalog":
            print(json.dumps(CATALOG, indent=2))
        else:
            print(json.dumps(load_json(ETC / "servers.json", {}), indent=2))
    except GatewayError as e:
        print(f"mcp-gateway: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Requests, the router and the agent's shared state."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .code import forward_code, is_code_path
from .core import HttpError
from .identity import CONTROL, DATAPLANE, PREVIEW, AgentState
from .processes import DEFAULT_PATH, ProcessManager
from .proxy import proxy

if TYPE_CHECKING:
    from .server import AgentHandler

Result = tuple[int, Any] | None  # None: the handler wrote the response (stream, WebSocket)
Handler = Callable[["Agent", "Request"], Result]


@dataclass
class Request:
    """What a route handler sees. ``body`` (JSON) is read lazily so streaming routes can stream."""

    method: str
    path: str
    token: str | None
    query: dict[str, str] = field(default_factory=dict)
    raw_query: str = ""
    params: dict[str, str] = field(default_factory=dict)
    http: AgentHandler | None = None
    _json: dict[str, Any] | None = None

    @property
    def body(self) -> dict[str, Any]:
        if self._json is None:
            self._json = self.http.read_json() if self.http is not None else {}
        return self._json

    def q(self, key: str, default: str | None = None) -> str | None:
        return self.query.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.query.get(key)
        return default if value is None else value.lower() in ("1", "true", "yes", "on")

    def int_q(self, key: str, default: int | None = None) -> int | None:
        value = self.query.get(key)
        if value in (None, "", "null", "None"):
            return default
        try:
            return int(value)
        except ValueError as e:
            raise HttpError(400, "bad_request", f"{key} must be an integer") from e


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    fn: Handler
    auth: str
    websocket: bool


class Router:
    """Maps (method, path pattern, websocket?) to handlers; each route declares its auth."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(
        self, method: str, path: str, auth: str = "secret", websocket: bool = False
    ) -> Callable[[Handler], Handler]:
        """Decorator. ``auth`` is "none", "init" (custom check in handler) or "secret";
        ``{name}`` in ``path`` captures one (percent-decoded) segment."""
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")

        def deco(fn: Handler) -> Handler:
            self.routes.append(Route(method, regex, fn, auth, websocket))
            return fn

        return deco

    def match(self, method: str, path: str, websocket: bool) -> tuple[Route, dict[str, str]]:
        """The route for the request; 405 (with ``Allow``) when the path has routes but none
        for this method, 426 when its only ``GET`` is a WebSocket one and this is no upgrade."""
        allowed: set[str] = set()
        upgrade_only = False
        for r in self.routes:
            m = r.pattern.match(path)
            if m is None:
                continue
            if r.websocket == websocket and r.method in (method, "*"):
                return r, {k: unquote(v) for k, v in m.groupdict().items()}
            if r.websocket and not websocket and r.method == method:
                upgrade_only = True
            allowed.add(r.method)
        if upgrade_only:
            raise HttpError(
                426,
                "upgrade_required",
                f"{method} {path} is a WebSocket: connect with an Upgrade: websocket request",
                headers=[("Upgrade", "websocket")],
            )
        if allowed:
            methods = ", ".join(sorted(allowed))
            raise HttpError(
                405,
                "method_not_allowed",
                f"{path} answers {methods}, not {method}",
                headers=[("Allow", methods)],
            )
        raise HttpError(404, "not_found", f"no route {method} {path}")


RT = "/runtime/v1"

router = Router()


class Agent:
    """The agent's state and services, shared by all request threads."""

    def __init__(self, secret: str) -> None:
        self.state = AgentState(secret=secret)
        self.procs = ProcessManager()
        self.workdir: str | None = None

    def dispatch(self, req: Request, websocket: bool = False) -> Result:
        """Find the route, enforce its auth, call it."""
        if req.path.startswith("/proxy/"):
            self.state.check(req.token, roles=(PREVIEW,))
            return proxy(self, req)
        if is_code_path(req.path):  # the code interpreter's routes (code.py checks the credential)
            return forward_code(self, req)
        route, req.params = router.match(req.method, req.path, websocket)
        if route.auth == "secret":
            data_plane = req.path.startswith(RT + "/")
            self.state.check(req.token, roles=(CONTROL, DATAPLANE) if data_plane else (CONTROL,))
        return route.fn(self, req)

    def process_env(self) -> dict[str, str]:
        """Environment for new processes: a sane base plus the sandbox env vars from init."""
        base = {
            "PATH": DEFAULT_PATH,
            "HOME": "/root",
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
        }
        with self.state.lock:
            return {**base, **self.state.env}

    def default_cwd(self) -> str:
        """The template workdir if init gave one, else /workspace, else root's home."""
        for candidate in (self.workdir, "/workspace", "/root"):
            if candidate and os.path.isdir(candidate):
                return candidate
        return "/"

"""Host-side client of the guest agent (stdlib http.client, explicit timeouts everywhere).

One short-lived connection per request (``Connection: close``): a restored or resumed
guest has lost every old socket, so pooling would only hand out dead connections.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .driver import DriverError

DEFAULT_TIMEOUT = 10.0
DATAPLANE, PREVIEW = "dataplane", "preview"


def role_secret(secret: str, role: str) -> str:
    """The agent credential of one edge role, derived from the agent secret as the guest
    agent derives it (``role_secret`` in guest/agent.py). The edge sends only these: the
    agent refuses them on its control routes, and the preview one outside ``/proxy/*``."""
    return hmac.new(secret.encode(), f"watasu-agent-role:{role}".encode(), hashlib.sha256).hexdigest()


class AgentError(DriverError):
    """The agent answered with an error status (``status`` holds it)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"agent answered {status}: {body}")
        self.status, self.body = status, body


class AgentUnauthorized(AgentError):
    """401: wrong secret. After a restore this means someone else initialised the clone."""


@dataclass
class AgentClient:
    """Talks to one agent through its forwarded host port."""

    port: int
    secret: str | None = None
    host: str = "127.0.0.1"
    timeout: float = DEFAULT_TIMEOUT

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                token: str | None = None, timeout: float | None = None) -> Any:
        """One JSON request; raises AgentError on non-2xx, OSError on transport failure."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        headers = {"Connection": "close", "Content-Type": "application/json"}
        token = token or self.secret
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers=headers)
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        if resp.status == 401:
            raise AgentUnauthorized(resp.status, data)
        if resp.status >= 300:
            raise AgentError(resp.status, data)
        return data

    def health(self, timeout: float = 1.0) -> bool:
        """True if the agent answers /health (no auth needed)."""
        try:
            return self.request("GET", "/health", timeout=timeout) == {"status": "ok"}
        except (OSError, http.client.HTTPException, ValueError, AgentError):
            return False

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.01) -> float:
        """Poll /health until it answers; returns seconds waited.

        The user-mode port forward accepts on the host before the guest listens and then
        drops the connection, so failures are expected and retried quickly.
        """
        start = time.monotonic()
        while not self.health(timeout=min(1.0, timeout)):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"agent on port {self.port} not ready after {timeout}s")
            time.sleep(interval)
        return time.monotonic() - start

    def init(self, *, auth: str, secret: str, env_vars: dict[str, str] | None = None,
             hostname: str | None = None, clock: float | None = None,
             entropy: bytes | None = None, seal: bool = False) -> dict[str, Any]:
        """Install ``secret`` (authenticated by ``auth``), env, clock, hostname, entropy.

        Clock and entropy default to now and 64 fresh bytes: clones must never keep the
        template's. On success the client switches to the new secret.
        """
        body: dict[str, Any] = {
            "secret": secret,
            "clock": time.time() if clock is None else clock,
            "entropy": base64.b64encode(entropy if entropy is not None else os.urandom(64)).decode(),
            "seal": seal,
        }
        if env_vars is not None:
            body["env_vars"] = env_vars  # replaces the set; omitted keeps the current one
        if hostname:
            body["hostname"] = hostname
        result = self.request("POST", "/init", body, token=auth)
        self.secret = secret
        return dict(result)

    def exec(self, cmd: str | list[str], *, background: bool = False, timeout: float = 60.0,
             env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, Any]:
        """Run a command in the guest (``background`` returns ``{"pid": N}`` at once)."""
        body: dict[str, Any] = {"cmd": cmd, "background": background, "timeout": timeout,
                                "env": env or {}}
        if cwd:
            body["cwd"] = cwd
        return dict(self.request("POST", "/exec", body, timeout=timeout + 5))

    def run_streaming(self, command: str, on_output: Callable[[str, bytes], None], *,
                      env: dict[str, str] | None = None, timeout: float = 1800.0) -> int:
        """Run ``sh -c command`` as a managed process, handing output to ``on_output`` as it
        arrives (``("stdout"|"stderr", bytes)``); returns the exit code (-1 if killed by the
        agent's timeout). Transport failures raise ``OSError``/``websockets`` errors."""
        from websockets.sync.client import connect

        start = {"type": "start", "cmd": "/bin/sh", "args": ["-c", command],
                 "environment": env or {}, "timeout_ms": int(timeout * 1000)}
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        with connect(f"ws://{self.host}:{self.port}/runtime/v1/process", additional_headers=headers,
                     open_timeout=self.timeout, max_size=None, ping_interval=None) as ws:
            ws.send(json.dumps(start))
            while True:
                frame = json.loads(ws.recv(timeout=timeout + 30))
                kind = frame.get("type")
                if kind in ("stdout", "stderr", "pty"):
                    on_output(kind, base64.b64decode(frame.get("data", "")))
                elif kind == "exit":
                    code = frame.get("exit_code")
                    return int(code) if isinstance(code, int) else -1
                elif kind in ("error", "lagged"):
                    raise AgentError(500, frame)

    def processes(self) -> list[dict[str, Any]]:
        """Background processes the agent started."""
        return list(self.request("GET", "/processes")["processes"])

"""Host-side client of the guest agent (stdlib http.client, explicit timeouts everywhere).

One short-lived connection per request (``Connection: close``): a restored or resumed
guest has lost every old socket, so pooling would only hand out dead connections. The guest
is not trusted: every JSON call is cut at its timeout as a whole (not per read, so a guest
dribbling bytes cannot hold a resume), and a reply over MAX_REPLY is refused unread. The
host's commands run through the agent's managed-process API (``/runtime/v1/process``), the
one registry the SDK's processes are in too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from . import driver
from .driver import DriverError

DEFAULT_TIMEOUT = 10.0
ALIVE_CHECK_SECONDS = 0.5
DATAPLANE, PREVIEW = "dataplane", "preview"
EXIT_MARGIN = 10.0  # seconds past a command's timeout its killed process has to report its exit
# The largest process frame the host accepts from a guest: the agent sends output in
# reads of 64 KiB (base64 in JSON), so anything near this is a hostile or broken guest.
MAX_FRAME = 4 * 2**20
# The largest JSON reply the host reads from an agent (/health, /init: a few hundred bytes).
MAX_REPLY = 2**20


class _Watchdog:
    """Cuts `conn` off when `seconds` have passed, whatever it is waiting for."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn, self.fired = conn, False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _bounded_body(resp: http.client.HTTPResponse) -> bytes:
    """The reply's body, refused (AgentError 502) past MAX_REPLY bytes, declared or sent."""
    declared = resp.getheader("Content-Length") or "0"
    if not declared.isdigit() or int(declared) > MAX_REPLY:
        raise AgentError(
            502, {"error": "reply_too_large", "message": f"agent reply declared {declared[:20]} bytes"}
        )
    chunks, total = [], 0
    while chunk := resp.read(64 * 1024):
        total += len(chunk)
        if total > MAX_REPLY:
            raise AgentError(
                502, {"error": "reply_too_large", "message": f"agent reply over {MAX_REPLY} bytes"}
            )
        chunks.append(chunk)
    return b"".join(chunks)


def role_secret(secret: str, role: str) -> str:
    """The agent credential of one edge role, derived from the agent secret as the guest
    agent derives it (``role_secret`` in guest/agent/identity.py). The edge sends only these: the
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
    host: str = field(default_factory=lambda: driver.agent_address)  # where this process's VMs listen
    timeout: float = DEFAULT_TIMEOUT

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One JSON request; raises AgentError on non-2xx, OSError on transport failure."""
        limit = timeout or self.timeout
        conn = http.client.HTTPConnection(self.host, self.port, timeout=limit)
        headers = {"Connection": "close", "Content-Type": "application/json"}
        token = token or self.secret
        if token:
            headers["Authorization"] = f"Bearer {token}"
        watchdog = _Watchdog(conn, limit)
        try:
            conn.request(
                method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers
            )
            resp = conn.getresponse()
            data = json.loads(_bounded_body(resp) or b"null")
        except (OSError, http.client.HTTPException, ValueError):
            if watchdog.fired:
                raise TimeoutError(f"the agent did not answer {method} {path} within {limit:g} s") from None
            raise
        finally:
            watchdog.cancel()
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

    def wait_ready(
        self, timeout: float = 30.0, interval: float = 0.01, *, alive: Callable[[], bool] | None = None
    ) -> float:
        """Poll /health until it answers; returns seconds waited.

        The user-mode port forward accepts on the host before the guest listens and then
        drops the connection, so failures are expected and retried quickly. ``alive``, asked
        every half second, ends the wait early when the VM is gone (destroyed meanwhile).
        """
        start = last_check = time.monotonic()
        while not self.health(timeout=min(1.0, timeout)):
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(f"agent on port {self.port} not ready after {timeout}s")
            if alive is not None and now - last_check > ALIVE_CHECK_SECONDS:
                last_check = now
                if not alive():
                    raise DriverError(f"the VM of the agent on port {self.port} is gone")
            time.sleep(interval)
        return time.monotonic() - start

    def init(
        self,
        *,
        auth: str,
        secret: str,
        env_vars: dict[str, str] | None = None,
        hostname: str | None = None,
        clock: float | None = None,
        entropy: bytes | None = None,
        seal: bool = False,
        new_machine_id: bool = False,
        trust_ca: str | None = None,
    ) -> dict[str, Any]:
        """Install ``secret`` (authenticated by ``auth``), env, clock, hostname, entropy,
        and with ``new_machine_id`` a fresh machine id (a new clone, not a resumed VM).

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
        if new_machine_id:
            body["new_machine_id"] = True
        if trust_ca:
            body["trust_ca"] = trust_ca  # the platform's egress CA, for header rules on HTTPS
        result = self.request("POST", "/init", body, token=auth)
        self.secret = secret
        return dict(result)

    def exec(
        self,
        cmd: str | list[str],
        *,
        background: bool = False,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> dict[str, Any]:
        """Run a command in the guest (a string runs under ``sh -c``) as a managed process.

        To completion: ``{"exit_code", "stdout", "stderr", "timed_out", "duration_ms"}``; past
        ``timeout`` the agent kills its process group (``exit_code`` -9, ``timed_out``).
        ``background`` returns at once with ``{"pid": <guest pid>, "id": <process id>}``: the
        process keeps running in the agent's one registry (``processes()``, the SDK's list).
        Without ``cwd`` it runs in ``/``, the agent's own directory, as host commands always have.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        start: dict[str, Any] = {
            "type": "start",
            "cmd": argv[0],
            "args": argv[1:],
            "environment": env or {},
            "cwd": cwd or "/",
        }
        if background:
            with self._process_socket("/runtime/v1/process", start) as (_, started):
                return {"pid": started["os_pid"], "id": started["pid"]}
        start["timeout_ms"] = int(timeout * 1000)
        output = {"stdout": bytearray(), "stderr": bytearray(), "pty": bytearray()}
        began = time.monotonic()
        end = self._follow(start, lambda kind, data: output[kind].extend(data), timeout + EXIT_MARGIN)
        return {
            "exit_code": end.get("exit_code"),
            "stdout": output["stdout"].decode(errors="replace"),
            "stderr": output["stderr"].decode(errors="replace"),
            "timed_out": end.get("status") == "timed_out",
            "duration_ms": round((time.monotonic() - began) * 1000, 1),
        }

    def run_streaming(
        self,
        command: str,
        on_output: Callable[[str, bytes], None],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 1800.0,
    ) -> int:
        """Run ``sh -c command`` as a managed process, handing output to ``on_output`` as it
        arrives (``("stdout"|"stderr", bytes)``); returns the exit code (-1 if killed by the
        agent's timeout). Transport failures raise ``OSError``."""
        start = {
            "type": "start",
            "cmd": "/bin/sh",
            "args": ["-c", command],
            "environment": env or {},
            "timeout_ms": int(timeout * 1000),
        }
        code = self._follow(start, on_output, timeout + EXIT_MARGIN).get("exit_code")
        return code if isinstance(code, int) else -1

    def processes(self) -> list[dict[str, Any]]:
        """Processes running in the guest, whoever started them (the host or the SDK):
        ``pid`` is the guest pid, ``id`` the agent's process id."""
        return [
            {
                "pid": p["os_pid"],
                "id": p["id"],
                "cmd": [p["cmd"], *p["args"]],
                "running": p["status"] in ("running", "killing"),
                "exit_code": p["exit_code"],
            }
            for p in self.request("GET", "/runtime/v1/process")["processes"]
        ]

    def _follow(
        self, start: dict[str, Any], on_output: Callable[[str, bytes], None], timeout: float
    ) -> dict[str, Any]:
        """Start a process and hand its output over until its ``exit`` frame, which is
        returned. A socket that fell behind (``lagged``) reconnects and replays from the
        last cursor it saw, so no output is lost or repeated."""
        deadline = time.monotonic() + timeout
        path, cursor = "/runtime/v1/process", 0
        first: dict[str, Any] | None = start
        while True:
            with self._process_socket(path, first) as (ws, started):
                while True:
                    frame = self._recv(ws, deadline)
                    kind = frame.get("type")
                    if kind in ("stdout", "stderr", "pty"):
                        cursor = int(frame["cursor"]) + 1
                        on_output(kind, base64.b64decode(frame.get("data", "")))
                    elif kind == "exit":
                        return frame
                    elif kind == "lagged":
                        path = f"/runtime/v1/process/{quote(started['pid'])}/connect?since={cursor}"
                        first = None
                        break
                    elif kind == "error":
                        raise AgentError(500, frame)

    @staticmethod
    def _recv(ws: Any, deadline: float) -> dict[str, Any]:
        from websockets.exceptions import WebSocketException

        try:
            frame = json.loads(ws.recv(timeout=max(0.0, deadline - time.monotonic())))
        except WebSocketException as exc:
            raise ConnectionError(f"agent process socket: {exc}") from exc
        return frame if isinstance(frame, dict) else {}

    @contextlib.contextmanager
    def _process_socket(
        self, path: str, start: dict[str, Any] | None
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """A process WebSocket (sending ``start`` first, if given) and its ``started`` frame.
        A refused handshake raises AgentUnauthorized/AgentError like an HTTP call; an
        ``error`` frame (a command that cannot start) raises AgentError."""
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        deadline = time.monotonic() + self.timeout
        try:
            ws = connect(
                f"ws://{self.host}:{self.port}{path}",
                additional_headers=headers,
                open_timeout=self.timeout,
                max_size=MAX_FRAME,
                ping_interval=None,
            )
        except InvalidStatus as exc:
            status, body = exc.response.status_code, _json_or_text(bytes(exc.response.body))
            raise (AgentUnauthorized if status == 401 else AgentError)(status, body) from exc
        except WebSocketException as exc:
            raise ConnectionError(f"agent process socket: {exc}") from exc
        with ws:
            if start is not None:
                ws.send(json.dumps(start))
            started = self._recv(ws, deadline)
            if started.get("type") != "started":
                raise AgentError(500, started)
            yield ws, started


def _json_or_text(body: bytes | None) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        return (body or b"").decode(errors="replace")

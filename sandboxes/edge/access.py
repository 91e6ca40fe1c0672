"""Who may reach which agent: database reads, token checks and auto-resume.

Everything here is synchronous (the ORM, libvirt); the ASGI side runs the fast
lookups on one thread pool and the slow auto-resumes on another
(`sandboxes.edge.resumes`), so a resume never delays another request's lookup.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from django.db import close_old_connections

from billing.selectors import team_require_active, team_suspended_cached
from sandboxes import services
from sandboxes.edge.signing import file_url_check
from sandboxes.mcp import GATEWAY_PORT, mcp_bearer_ok
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime import vm
from sandboxes.runtime.agent_client import DATAPLANE, PREVIEW, role_secret
from sandboxes.sessions import (
    dashboard_ticket_use,
    dashboard_ticket_user_allowed,
    dashboard_ticket_verify,
    session_verify,
)
from watasu import errors

S = SandboxState
P = ParamSpec("P")
T = TypeVar("T")
# A paused sandbox with auto_resume comes back for these (spec 6.3: file, directory and
# process requests); git and watch work on files and processes too.
AUTO_RESUME_STATES = frozenset({S.STOPPED, S.STOPPING, S.RESTORING})


class EdgeError(Exception):
    """An answer the edge gives itself, in the shared error shape."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": code, "message": message, **extra}
        self.headers: list[tuple[bytes, bytes]] = []
        if status == 401:
            self.headers.append((b"www-authenticate", b'Bearer realm="sandbox"'))


def overloaded(message: str) -> EdgeError:
    return EdgeError(503, "sandbox_overloaded", message, reason={"message": message})


@dataclass(frozen=True)
class Upstream:
    """The agent of one sandbox as the host reaches it."""

    sandbox_id: int
    port: int
    secret: str = field(repr=False)
    address: str = "127.0.0.1"  # the sandbox's host (Host.address)
    mask_request_host: str | None = None  # previews: the Host the app sees (`${PORT}` filled in)


def _outside_requests(function: Callable[P, T]) -> Callable[P, T]:
    """Database use outside Django's request cycle (edge threads): drop stale connections
    before, and connections past CONN_MAX_AGE after, as a request would."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapper


def _sandbox(route_token: str) -> Sandbox:
    sandbox = Sandbox.objects.select_related("team", "host").filter(route_token=route_token).first()
    if sandbox is None:
        raise EdgeError(
            404,
            "sandbox_not_found",
            "No sandbox exists at this data-plane address: it never "
            "existed or its record was purged. Create a new sandbox.",
        )
    _refuse_destroyed(sandbox)
    return sandbox


def _refuse_destroyed(sandbox: Sandbox) -> None:
    """The SDK turns every 404 on a file call into FileNotFoundException: the message is
    what the user reads, so it says that the sandbox, not the file, is gone."""
    if sandbox.state == S.DESTROYED:
        raise EdgeError(404, "sandbox_not_found", services.destroyed_message(sandbox.pk))


def _from_domain(exc: errors.DomainError) -> EdgeError:
    return EdgeError(exc.status, exc.code, exc.message, **exc.extra)


class ResumeNeeded(Exception):
    """The caller may use the sandbox, which is paused with `auto_resume`: resume it
    (`resume_upstream`, on the edge's resume threads) and use the upstream it returns."""

    def __init__(self, sandbox_id: int, role: str) -> None:
        super().__init__(sandbox_id)
        self.sandbox_id, self.role = sandbox_id, role


def _running(sandbox: Sandbox, *, resume: bool, role: str) -> Upstream:
    """The sandbox's agent; `ResumeNeeded` for a paused sandbox whose policy resumes it.

    The upstream carries the agent credential of `role` only (data plane or preview),
    never the agent secret: the agent refuses it on its control route (`/init`),
    and the preview credential anywhere but `/proxy/*`.
    """
    if sandbox.state != S.READY and resume and sandbox.auto_resume and sandbox.state in AUTO_RESUME_STATES:
        raise ResumeNeeded(sandbox.pk, role)
    return _upstream(sandbox, role)


# The guest answers in these states (a checkpoint copies the disk of a running guest).
SERVING_STATES = frozenset({S.READY, S.CHECKPOINTING})


def _upstream(sandbox: Sandbox, role: str) -> Upstream:
    if sandbox.state not in SERVING_STATES or not sandbox.agent_port:
        raise EdgeError(
            409, "sandbox_not_running", f"Sandbox {sandbox.pk} is {sandbox.state}; resume it first."
        )
    if not sandbox.reachable:
        raise EdgeError(
            503,
            "host_unavailable",
            f"Sandbox {sandbox.pk} is on a host that is not answering; it is kept, retry later.",
        )
    client = vm.agent_client(sandbox)
    return Upstream(
        sandbox_id=sandbox.pk,
        port=sandbox.agent_port,
        secret=role_secret(client.secret or "", role),
        address=client.host,
    )


@_outside_requests
def resume_upstream(sandbox_id: int, role: str, wait: float) -> Upstream:
    """Resume the sandbox (waiting at most `wait` for another process's unfinished
    pause or resume) and return its agent. Runs on the edge's resume threads only."""
    sandbox = Sandbox.objects.select_related("team", "host").filter(pk=sandbox_id).first()
    if sandbox is None:
        raise EdgeError(404, "sandbox_not_found", f"Sandbox {sandbox_id} no longer exists.")
    _refuse_destroyed(sandbox)
    if sandbox.state not in SERVING_STATES:
        try:
            sandbox, _ = services.sandbox_resume(sandbox=sandbox, wait=wait)
        except errors.DomainError as exc:
            raise _from_domain(exc) from exc
    return _upstream(sandbox, role)


@_outside_requests
def dataplane_upstream(route_token: str, token: str | None) -> Upstream:
    """The agent for a data-plane request carrying `Bearer <session token>`."""
    sandbox = _sandbox(route_token)
    if not token:
        raise EdgeError(401, "unauthorized", "A session token is required: Authorization: Bearer <token>.")
    if not session_verify(token=token, sandbox=sandbox):
        raise EdgeError(401, "unauthorized", "The session token is invalid, expired or for another sandbox.")
    _refuse_suspended(sandbox)
    return _running(sandbox, resume=True, role=DATAPLANE)


@_outside_requests
def ticket_upstream(route_token: str, ticket: str) -> Upstream:
    """The agent for a dashboard terminal's process socket carrying `?ticket=` (the edge
    has checked the route and the Origin already)."""
    sandbox = _sandbox(route_token)
    if not dashboard_ticket_verify(ticket=ticket, sandbox=sandbox):
        raise EdgeError(
            401,
            "unauthorized",
            "The dashboard ticket is invalid, expired, for another sandbox, or its user may "
            "no longer use this sandbox; reopen the terminal.",
        )
    if not dashboard_ticket_use(ticket=ticket):
        raise EdgeError(401, "unauthorized", "This dashboard ticket was used already; reopen the terminal.")
    _refuse_suspended(sandbox)
    return _running(sandbox, resume=True, role=DATAPLANE)


@_outside_requests
def ticket_still_allowed(route_token: str, ticket: str) -> bool:
    """Whether an open terminal's user may still use its sandbox (as the ticket's check at
    the handshake, but past the ticket's own lifetime: the socket outlives it)."""
    sandbox = Sandbox.objects.select_related("team").filter(route_token=route_token).first()
    return sandbox is not None and dashboard_ticket_user_allowed(ticket=ticket, sandbox=sandbox)


def _refuse_suspended(sandbox: Sandbox) -> None:
    """A suspended team's commands and file calls are refused (its cached state, at most
    BILLING_SUSPENSION_CACHE_SECONDS old)."""
    if team_suspended_cached(sandbox.team_id):
        try:
            team_require_active(sandbox.team)
        except errors.DomainError as exc:
            raise _from_domain(exc) from exc


@_outside_requests
def signed_upstream(route_token: str, *, path: str, op: str, expires: str, sig: str) -> Upstream:
    """The agent for a signed file URL (403 when the signature does not hold)."""
    sandbox = _sandbox(route_token)
    problem = file_url_check(sandbox, path=path, op=op, expires=expires, sig=sig)
    if problem:
        raise EdgeError(403, "forbidden", problem)
    _refuse_suspended(sandbox)
    return _running(sandbox, resume=True, role=DATAPLANE)


def _public(sandbox: Sandbox, port: int | None, bearer: str | None) -> bool:
    """Whether preview traffic to `port` may pass. The MCP gateway's port of a private sandbox
    created with `mcp` may, with the gateway's own token (checked here against its hash, so
    whatever listens on that port in the guest never sees a caller without it)."""
    if bool(sandbox.network_policy.get("allow_public_traffic", True)):
        return True
    return sandbox.mcp_enabled and port == GATEWAY_PORT and mcp_bearer_ok(sandbox, bearer)


@_outside_requests
def preview_upstream(route_token: str, port: int | None = None, bearer: str | None = None) -> Upstream:
    """The agent for preview traffic to `port`: the route token is the capability (spec 6.13).

    Previews never auto-resume: anonymous traffic must not restart (and bill) a
    paused sandbox.
    """
    sandbox = _sandbox(route_token)
    if not _public(sandbox, port, bearer):
        if sandbox.mcp_enabled and port == GATEWAY_PORT:
            raise EdgeError(
                401,
                "unauthorized",
                f"Sandbox {sandbox.pk}'s MCP gateway needs its token: Authorization: Bearer "
                "<the sandbox's get_mcp_token()>.",
            )
        raise EdgeError(403, "forbidden", f"Sandbox {sandbox.pk} does not allow public traffic.")
    _refuse_suspended(sandbox)
    upstream = _running(sandbox, resume=False, role=PREVIEW)
    mask = sandbox.network_policy.get("mask_request_host")
    return dataclasses.replace(upstream, mask_request_host=mask) if mask else upstream

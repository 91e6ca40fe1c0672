"""Data-plane session tokens, and the dashboard's short-lived terminal tickets.

A token is signed (Django signing, salted) and names one sandbox, the
sandbox's session epoch and an expiry. It stays valid across a pause so an
auto-resume can serve it; destroying the sandbox bumps the epoch, which
revokes every token minted before.

A dashboard ticket is what a browser's terminal presents instead: a WebSocket
cannot carry an Authorization header, so the ticket travels in the query of a
process socket (and only there, from the platform's own origin: the edge checks).
It names the user too, and lives `DASHBOARD_TICKET_SECONDS`; its check asks again
whether that user may still write to the sandbox's team.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core import signing
from django.core.cache import cache
from django.utils import timezone

from sandboxes.models import Sandbox, SandboxState
from teams.models import WRITER_ROLES, Membership, User

TOKEN_PREFIX = "wsess_"
_SALT = "watasu.sandbox-session.v1"
TICKET_PREFIX = "wdt_"
_TICKET_SALT = "watasu.dashboard-terminal-ticket.v1"
MIN_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class Session:
    sandbox_id: int
    token: str
    expires_at: datetime
    data_plane_url: str
    route_token: str


def data_plane_url(sandbox: Sandbox) -> str:
    """Host form when a sandbox domain is configured, else a path under the public URL."""
    if settings.DATA_PLANE_DOMAIN:
        return f"{settings.DATA_PLANE_SCHEME}://{sandbox.route_token}.sandbox.{settings.DATA_PLANE_DOMAIN}"
    return f"{settings.PUBLIC_URL}/sandboxes-dp/{sandbox.route_token}"


def session_mint(*, sandbox: Sandbox) -> Session:
    """A token valid until the later of the deadline and one hour from now."""
    now = timezone.now()
    expires_at = max(sandbox.deadline_at or now, now + MIN_LIFETIME).replace(microsecond=0)
    payload = {
        "s": sandbox.pk,
        "e": sandbox.session_epoch,
        "x": int(expires_at.timestamp()),
        "n": secrets.token_hex(4),
    }
    token = TOKEN_PREFIX + signing.dumps(payload, salt=_SALT)
    return Session(
        sandbox_id=sandbox.pk,
        token=token,
        expires_at=expires_at,
        data_plane_url=data_plane_url(sandbox),
        route_token=sandbox.route_token,
    )


def session_verify(*, token: str, sandbox: Sandbox) -> bool:
    """True if `token` was minted for this sandbox, is unexpired and not revoked."""
    if not token.startswith(TOKEN_PREFIX):
        return False
    try:
        payload = signing.loads(token.removeprefix(TOKEN_PREFIX), salt=_SALT)
    except signing.BadSignature:
        return False
    return (
        isinstance(payload, dict)
        and payload.get("s") == sandbox.pk
        and payload.get("e") == sandbox.session_epoch
        and isinstance(payload.get("x"), int)
        and payload["x"] > timezone.now().timestamp()
        and sandbox.state != SandboxState.DESTROYED
    )


def dashboard_ticket_mint(*, sandbox: Sandbox, user: User) -> str:
    """A ticket for `user`'s browser to open process sockets of `sandbox` for a short while."""
    payload = {
        "s": sandbox.pk,
        "e": sandbox.session_epoch,
        "u": user.pk,
        "x": int(timezone.now().timestamp()) + settings.DASHBOARD_TICKET_SECONDS,
        "n": secrets.token_hex(4),
    }
    return TICKET_PREFIX + signing.dumps(payload, salt=_TICKET_SALT)


def _ticket_payload(ticket: str) -> dict[str, Any] | None:
    if not ticket.startswith(TICKET_PREFIX):
        return None
    try:
        payload = signing.loads(ticket.removeprefix(TICKET_PREFIX), salt=_TICKET_SALT)
    except signing.BadSignature:
        return None
    return payload if isinstance(payload, dict) else None


def dashboard_ticket_user_allowed(*, ticket: str, sandbox: Sandbox) -> bool:
    """True while the ticket's user is an active member of the sandbox's team with a role that
    may write, the sandbox is the ticket's and not destroyed, and its sessions were not
    revoked (expiry aside: an open terminal asks this again while it lives)."""
    payload = _ticket_payload(ticket)
    if not (
        payload is not None
        and payload.get("s") == sandbox.pk
        and payload.get("e") == sandbox.session_epoch
        and isinstance(payload.get("u"), int)
        and sandbox.state != SandboxState.DESTROYED
    ):
        return False
    return Membership.objects.filter(
        user_id=payload["u"], user__is_active=True, team_id=sandbox.team_id, role__in=WRITER_ROLES
    ).exists()


def dashboard_ticket_verify(*, ticket: str, sandbox: Sandbox) -> bool:
    """True if `ticket` was minted for this sandbox, is unexpired and not revoked, and its
    user is still an active member of the sandbox's team with a role that may write."""
    payload = _ticket_payload(ticket)
    return (
        payload is not None
        and isinstance(payload.get("x"), int)
        and payload["x"] > timezone.now().timestamp()
        and dashboard_ticket_user_allowed(ticket=ticket, sandbox=sandbox)
    )


def dashboard_ticket_use(*, ticket: str) -> bool:
    """Mark a verified ticket used: True the first time only, so a ticket that leaks after
    its socket opened (a log, a proxy) opens nothing more. Through the shared cache, with
    the ticket's own lifetime (a process without a shared cache checks its own uses)."""
    key = "watasu:dashboard-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()
    return bool(cache.add(key, True, timeout=settings.DASHBOARD_TICKET_SECONDS + 1))

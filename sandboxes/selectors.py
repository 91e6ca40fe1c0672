"""Reads for sandboxes, always scoped to a team."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from sandboxes.models import RUNTIME_STATES, Checkpoint, CheckpointStatus, Sandbox, SandboxState
from teams.models import Team, User
from teams.selectors import team_for_write
from watasu import errors, ids


@dataclass(frozen=True)
class QuotaLimits:
    max_running_instances: int
    max_vcpu_count: int
    max_memory_mb: int


@dataclass(frozen=True)
class QuotaUsage:
    running_instances: int = 0
    vcpu_count: int = 0
    memory_mb: int = 0


@dataclass(frozen=True)
class QuotaReservation:
    instances: int = 0
    vcpu_count: int = 0
    memory_mb: int = 0


@dataclass(frozen=True)
class Quota:
    """The spec's quota snapshot: limits, current usage and what a request adds."""

    limits: QuotaLimits
    usage: QuotaUsage
    reservation: QuotaReservation = field(default_factory=QuotaReservation)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return asdict(self)


def team_quota_limits(*, team: Team) -> QuotaLimits:
    """The team's own limits where set, the platform defaults otherwise."""

    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    return QuotaLimits(
        max_running_instances=pick(team.max_running_instances, settings.QUOTA_DEFAULT_MAX_RUNNING_INSTANCES),
        max_vcpu_count=pick(team.max_vcpu_count, settings.QUOTA_DEFAULT_MAX_VCPU_COUNT),
        max_memory_mb=pick(team.max_memory_mb, settings.QUOTA_DEFAULT_MAX_MEMORY_MB),
    )


def team_quota_usage(*, team: Team) -> QuotaUsage:
    """Resources held by the team's sandboxes in runtime states and by its template
    builds running now (each build runs a VM of the version's shape)."""
    from templates_app.models import TemplateVersion, VersionStatus

    totals = Sandbox.objects.filter(team=team, state__in=RUNTIME_STATES).aggregate(
        running_instances=Count("id"),
        vcpu_count=Coalesce(Sum("cpu_count"), 0),
        memory_mb=Coalesce(Sum("memory_mb"), 0),
    )
    builds = TemplateVersion.objects.filter(template__team=team, status=VersionStatus.BUILDING).aggregate(
        running_instances=Count("id"),
        vcpu_count=Coalesce(Sum("cpu"), 0),
        memory_mb=Coalesce(Sum("memory_mb"), 0),
    )
    return QuotaUsage(**{name: totals[name] + builds[name] for name in totals})


def team_quota(*, team: Team, reservation: QuotaReservation | None = None) -> Quota:
    return Quota(
        limits=team_quota_limits(team=team),
        usage=team_quota_usage(team=team),
        reservation=reservation or QuotaReservation(),
    )


def _price(value: object) -> str | None:
    return None if value is None else str(value)


def sandbox_limits(*, team: Team) -> dict[str, object]:
    """What a team may ask for, what it costs, and its quota right now."""
    return {
        "team": team.slug,
        "fallback": {"cpu": settings.SANDBOX_FALLBACK_CPU, "memory_mb": settings.SANDBOX_FALLBACK_MEMORY_MB},
        "allowed_cpu": list(settings.SANDBOX_ALLOWED_CPU),
        "memory_mb": {
            "min": settings.SANDBOX_MEMORY_MIN_MB,
            "max": settings.SANDBOX_MEMORY_MAX_MB,
            "increment": settings.SANDBOX_MEMORY_INCREMENT_MB,
        },
        "max_timeout_seconds": settings.SANDBOX_MAX_TIMEOUT_SECONDS,
        "default_network_class": settings.SANDBOX_DEFAULT_NETWORK_CLASS,
        "network_classes": {name: dict(limits) for name, limits in settings.NETWORK_CLASSES.items()},
        "egress_profiles": {name: list(hosts) for name, hosts in settings.EGRESS_PROFILES.items()},
        "prices": {
            "currency": settings.PRICE_CURRENCY,
            "vcpu_second": _price(settings.PRICE_VCPU_SECOND),
            "memory_gib_second": _price(settings.PRICE_MEMORY_GIB_SECOND),
            "stopped_disk_gib_month": _price(settings.PRICE_STOPPED_DISK_GIB_MONTH),
            "checkpoint_gib_month": _price(settings.PRICE_CHECKPOINT_GIB_MONTH),
            "template_gib_month": _price(settings.PRICE_TEMPLATE_GIB_MONTH),
            "volume_gib_month": _price(settings.PRICE_VOLUME_GIB_MONTH),
        },
        "quota": team_quota(team=team).as_dict(),
    }


# --- sandboxes -------------------------------------------------------------------------

STATE_ALIASES: dict[str, frozenset[str]] = {
    "running": RUNTIME_STATES,
    "paused": frozenset({SandboxState.STOPPED}),
}


def sandboxes_of_teams(*, teams: QuerySet[Team]) -> QuerySet[Sandbox]:
    """Sandboxes of `teams`, every state; `sandboxes.filters.SandboxFilter` narrows them
    (by default to all but destroyed ones).

    The team ids are resolved first so the page query is a plain `team_id IN (...)`
    that PostgreSQL answers from the (team, -id) index without sorting all rows.
    """
    team_ids = list(teams.values_list("pk", flat=True))
    return Sandbox.objects.filter(team_id__in=team_ids).select_related("team", "template", "template_version")


def sandbox_get(*, user: User, sandbox_id: str, write: bool = False) -> Sandbox:
    """A sandbox of one of the user's teams; anything else is 404, ids that are not numbers too.

    With `write`, the user's role in the sandbox's team must allow changes (403 otherwise).
    """
    sandbox = None
    if (pk := ids.db_id(sandbox_id)) is not None:
        sandbox = (
            Sandbox.objects.select_related("team", "host", "template", "template_version")
            .filter(pk=pk, team__memberships__user=user)
            .first()
        )
    if sandbox is None:
        raise errors.NotFound(f"Sandbox {sandbox_id} not found.", code="sandbox_not_found")
    if write:
        team_for_write(user=user, slug=sandbox.team.slug)
    return sandbox


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def preview_host(sandbox: Sandbox, port: int) -> str:
    domain = settings.DATA_PLANE_DOMAIN or f"localhost:{urlsplit(settings.PUBLIC_URL).port or 80}"
    return f"p{port}-{sandbox.route_token}.sandbox.{domain}"


def sandbox_port(*, sandbox: Sandbox, port: int) -> dict[str, object]:
    """Where a server listening on `port` inside the sandbox is reachable (any port works).

    Previews get an origin of their own: `p{port}-{route}.sandbox.{domain}`, or locally
    `p{port}-{route}.sandbox.localhost:{port}` (browsers and curl resolve `*.localhost`
    to loopback). The path form under the public URL, which shares the platform's
    origin (no cookies, sandboxed by CSP), is the fallback when the public URL is not
    on loopback and no domain is set; `path_url` always gives it.
    """
    host = preview_host(sandbox, port)
    path_url = f"{settings.PUBLIC_URL}/sandboxes-preview/{sandbox.route_token}/{port}"
    public = urlsplit(settings.PUBLIC_URL)
    if settings.DATA_PLANE_DOMAIN:
        url = f"{settings.DATA_PLANE_SCHEME}://{host}"
    elif (public.hostname or "") in LOOPBACK_HOSTS:
        url = f"{public.scheme}://{host}"
    else:
        url = path_url
    return {
        "port": port,
        "host": host,
        "url": url,
        "path_url": path_url,
        "protocol": "http",
        "public": bool(sandbox.network_policy.get("allow_public_traffic", True)),
    }


# --- checkpoints ---------------------------------------------------------------------------


def checkpoints_live() -> QuerySet[Checkpoint]:
    """Checkpoints that exist for their users: failed ones stay listed (with their error)
    until the retention sweep removes them; expired ones are gone at once."""
    now = timezone.now()
    return Checkpoint.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now)).select_related(
        "host", "sandbox"
    )


def checkpoints_of_teams(*, teams: QuerySet[Team], sandbox_id: str | None = None) -> QuerySet[Checkpoint]:
    """Newest first; with `sandbox_id` only that sandbox's (an id that names none: none)."""
    team_ids = list(teams.values_list("pk", flat=True))
    found = checkpoints_live().filter(team_id__in=team_ids)
    if sandbox_id is not None:
        pk = ids.db_id(sandbox_id)
        found = found.filter(sandbox_id=pk) if pk is not None else found.none()
    return found.order_by("-id")


def checkpoint_get(
    *, user: User, checkpoint_id: str, sandbox: Sandbox | None = None, write: bool = False
) -> Checkpoint:
    """A checkpoint of one of the user's teams (and of `sandbox` when given); anything
    else, malformed ids included, is 404."""
    checkpoint = None
    if (pk := ids.db_id(checkpoint_id)) is not None:
        found = checkpoints_live().filter(pk=pk, team__memberships__user=user)
        if sandbox is not None:
            found = found.filter(sandbox=sandbox)
        checkpoint = found.select_related("team", "template_version").first()
    if checkpoint is None:
        raise errors.NotFound(f"Checkpoint {checkpoint_id} not found.", code="checkpoint_not_found")
    if write:
        team_for_write(user=user, slug=checkpoint.team.slug)
    return checkpoint


def checkpoint_for_create(*, user: User, team_slug: str | None, selector: str) -> Checkpoint | None:
    """The checkpoint a create's `snapshot_id` (or a template string that names no
    template) means: an id, else the newest checkpoint of that name; in the team named, or
    in any team of the user when none is. Failed checkpoints are never chosen."""
    found = checkpoints_live().exclude(status=CheckpointStatus.FAILED).filter(team__memberships__user=user)
    if team_slug:
        found = found.filter(team__slug=team_slug)
    found = found.select_related("team", "template_version").order_by("-id")
    if (pk := ids.db_id(selector)) is not None and (checkpoint := found.filter(pk=pk).first()) is not None:
        return checkpoint
    return found.filter(name=selector).first() if selector else None

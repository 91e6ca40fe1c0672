"""Reads for sandboxes, always scoped to a team."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.db.models import Count, Sum
from django.db.models.functions import Coalesce

from sandboxes.models import RUNTIME_STATES, Sandbox
from teams.models import Team


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
        max_running_instances=pick(team.max_running_instances,
                                   settings.QUOTA_DEFAULT_MAX_RUNNING_INSTANCES),
        max_vcpu_count=pick(team.max_vcpu_count, settings.QUOTA_DEFAULT_MAX_VCPU_COUNT),
        max_memory_mb=pick(team.max_memory_mb, settings.QUOTA_DEFAULT_MAX_MEMORY_MB),
    )


def team_quota_usage(*, team: Team) -> QuotaUsage:
    """Resources held by the team's sandboxes in runtime states (one query)."""
    totals = Sandbox.objects.filter(team=team, state__in=RUNTIME_STATES).aggregate(
        running_instances=Count("id"),
        vcpu_count=Coalesce(Sum("cpu_count"), 0),
        memory_mb=Coalesce(Sum("memory_mb"), 0),
    )
    return QuotaUsage(**totals)


def team_quota(*, team: Team, reservation: QuotaReservation | None = None) -> Quota:
    return Quota(limits=team_quota_limits(team=team), usage=team_quota_usage(team=team),
                 reservation=reservation or QuotaReservation())


def _price(value: object) -> str | None:
    return None if value is None else str(value)


def sandbox_limits(*, team: Team) -> dict[str, object]:
    """What a team may ask for, what it costs, and its quota right now."""
    return {
        "team": team.slug,
        "fallback": {"cpu": settings.SANDBOX_FALLBACK_CPU,
                     "memory_mb": settings.SANDBOX_FALLBACK_MEMORY_MB},
        "allowed_cpu": list(settings.SANDBOX_ALLOWED_CPU),
        "memory_mb": {"min": settings.SANDBOX_MEMORY_MIN_MB,
                      "max": settings.SANDBOX_MEMORY_MAX_MB,
                      "increment": settings.SANDBOX_MEMORY_INCREMENT_MB},
        "max_timeout_seconds": settings.SANDBOX_MAX_TIMEOUT_SECONDS,
        "default_network_class": settings.SANDBOX_DEFAULT_NETWORK_CLASS,
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

"""Choosing the host a new VM runs on.

Capacity in use is derived from the sandboxes in runtime states on each host,
so there is no counter to drift. Callers place inside their transaction; the
host rows are locked in id order so concurrent placements queue instead of
both taking the last slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db.models import OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from sandboxes.models import RUNTIME_STATES, Host, HostState, PooledVm, SandboxState
from watasu import errors


@dataclass(frozen=True)
class HostRoom:
    host: Host
    free_cpu: int
    free_memory_mb: int


def heartbeating(prefix: str = "") -> Q:
    """Hosts a placement may use now: driven in-process, or their worker's heartbeat fresh (a
    worker that died is skipped at once, before the hosts sweep marks its host down)."""
    fresh = timezone.now() - timedelta(seconds=settings.HOST_DOWN_AFTER_SECONDS)
    return Q(**{f"{prefix}queue": ""}) | Q(**{f"{prefix}last_seen_at__gte": fresh})


def memory_limit_mb(host: Host) -> int:
    """Guest memory placement may hand out on ``host``: its capacity times the overcommit."""
    return host.memory_capacity_mb * settings.RUNTIME_MEMORY_OVERCOMMIT_PERCENT // 100


def hosts_with_room(states: tuple[str, ...] = (HostState.UP,), *, live_only: bool = False) -> list[HostRoom]:
    """Every host in `states` (up: those taking new sandboxes) with its free vCPU and memory
    (one query). Memory is also held by pauses kept in memory and by warm pool VMs; neither
    runs, so neither holds vCPUs."""
    in_runtime = Q(sandboxes__state__in=RUNTIME_STATES)
    in_memory = Q(sandboxes__state=SandboxState.STOPPED, sandboxes__paused_in_memory=True)
    pooled = (
        PooledVm.objects.filter(host=OuterRef("pk"))
        .values("host")
        .annotate(total=Sum("memory_mb"))
        .values("total")
    )
    hosts = Host.objects.filter(heartbeating() if live_only else Q(), state__in=states).annotate(
        used_cpu=Coalesce(Sum("sandboxes__cpu_count", filter=in_runtime), 0),
        used_memory=Coalesce(Sum("sandboxes__memory_mb", filter=in_runtime | in_memory), 0),
        pooled_memory=Coalesce(Subquery(pooled), 0),
    )
    return [
        HostRoom(h, h.cpu_capacity - h.used_cpu, memory_limit_mb(h) - h.used_memory - h.pooled_memory)
        for h in hosts
    ]


def measured_available_mb(host: Host) -> int:
    """The host's free memory as libvirt measures it (what guests really use, after page
    sharing): its worker's last heartbeat, or, driven in-process, asked now (0 when libvirt
    does not answer: the hosts sweep marks it down)."""
    from sandboxes.runtime import driver_for  # the runtime imports models; placement must not at import

    if host.queue:
        return host.memory_available_mb or 0
    try:
        return driver_for(host).memory_available_mb()
    except Exception:
        return 0


def _short_of_memory(host: Host) -> bool:
    """The host's measured free memory is below the floor placement keeps (the check behind
    memory overcommit)."""
    return measured_available_mb(host) < settings.HOST_MIN_AVAILABLE_MB


def host_place(
    *,
    cpu: int,
    memory_mb: int,
    among: list[int] | None = None,
    having: set[int] | frozenset[int] = frozenset(),
) -> Host:
    """The up host with the most free memory that fits the shape; locks the hosts.

    Must run inside a transaction; raises `Unavailable('sandbox_overloaded')`
    (HTTP 503, which the SDK raises as SandboxOverloadedException) when no
    host has room. `among` limits the choice to those host ids (where a volume or a
    checkpoint lives, or a template version not in the artifact store); the hosts in
    `having` already hold the template version's files and count as
    WATASU_PLACEMENT_LOCAL_BONUS_MB freer (elsewhere the start pulls them first). Between
    equals, the host placed on longest ago wins, so idle hosts take turns.
    """
    list(Host.objects.select_for_update().filter(state=HostState.UP).order_by("pk"))
    fitting = [
        r
        for r in hosts_with_room(live_only=True)
        if r.free_cpu >= cpu and r.free_memory_mb >= memory_mb and (among is None or r.host.pk in among)
    ]
    never = datetime.min.replace(tzinfo=UTC)

    def score(room: HostRoom) -> tuple[int, int, float]:
        bonus = settings.PLACEMENT_LOCAL_BONUS_MB if room.host.pk in having else 0
        placed = room.host.last_placed_at or never
        return (room.free_memory_mb + bonus, room.free_cpu, -placed.timestamp())

    for room in sorted(fitting, key=score, reverse=True):
        if not _short_of_memory(room.host):
            Host.objects.filter(pk=room.host.pk).update(last_placed_at=timezone.now())
            return room.host
    pinned = _pinned_host_away(among)
    if pinned is not None:
        raise errors.Unavailable(pinned, code="host_unavailable")
    message = _no_host_message(cpu, memory_mb)
    raise errors.Unavailable(message, code="sandbox_overloaded", reason={"message": message})


def _pinned_host_away(among: list[int] | None) -> str | None:
    """When the request must run on given hosts (its volumes' or checkpoint's, which never
    move) and none of them takes sandboxes now: which, and why."""
    if not among:
        return None
    pinned = list(Host.objects.filter(pk__in=among))
    if not pinned or any(
        h.state == HostState.UP and Host.objects.filter(heartbeating(), pk=h.pk).exists() for h in pinned
    ):
        return None
    names = ", ".join(f"{h.name} ({'draining' if h.state == HostState.DRAINING else 'down'})" for h in pinned)
    return (
        f"This sandbox must run on host {names}, where its volumes, checkpoint or template live "
        "(they do not move between hosts), and that host takes no new sandboxes now."
    )


def _no_host_message(cpu: int, memory_mb: int) -> str:
    """Why nothing was placed: full hosts clear soon; drained or down ones wait for an operator."""
    if Host.objects.filter(state=HostState.UP).exists():
        return f"No host has room for {cpu} vCPU and {memory_mb} MiB right now; retry later."
    return (
        "No host takes new sandboxes: every host is drained or down (an operator's drain lasts "
        "until they undrain it)."
    )


def host_has_room(*, host: Host, cpu: int, memory_mb: int) -> bool:
    """Whether `host` (locked here) can take the shape back; used to resume on the same host.

    A draining host still resumes its own sandboxes: a drain stops new placements, and the
    sandboxes it kept are not new. A down host takes nothing."""
    Host.objects.select_for_update().filter(pk=host.pk).first()
    rooms = hosts_with_room(states=(HostState.UP, HostState.DRAINING))
    room = next((r for r in rooms if r.host.pk == host.pk), None)
    return (
        room is not None
        and room.free_cpu >= cpu
        and room.free_memory_mb >= memory_mb
        and not (memory_mb and _short_of_memory(host))
    )


def host_disk_check(*, host: Host, needed_bytes: int, what: str) -> None:
    """507 `not_enough_space` when writing `needed_bytes` to the host's data disk would leave
    less than WATASU_HOST_MIN_FREE_GIB free: every sandbox's disk on the host shares it."""
    if host.queue:  # measured by its worker, with each heartbeat
        free = host.disk_free_bytes or 0
    else:
        stats = os.statvfs(host.data_dir)
        free = stats.f_bavail * stats.f_frsize
    reserve = settings.HOST_MIN_FREE_GIB * 2**30
    if free - needed_bytes < reserve:
        raise errors.InsufficientStorage(
            f"Host {host.name} has {free / 2**30:.1f} GiB free; {what} needs "
            f"{needed_bytes / 2**30:.1f} GiB and {settings.HOST_MIN_FREE_GIB} GiB stay free for "
            "running sandboxes. Delete checkpoints or retry later."
        )

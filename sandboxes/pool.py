"""Warm pools and the second tier of pauses: what keeps starts fast and host memory in check.

A warm pool holds, per (template version, shape, host), clones of the version's memory
snapshot restored ahead of time, warmed up (their agent given a secret of the pool's, a login shell
run, so QEMU has translated the code a create's first command runs) and suspended: on
their own disk, under their own QEMU uid (whose firewall rules
refuse everything until a create applies its sandbox's policy). A create takes one in its
placement transaction (`pool_claim`); `vm.start` then continues it (~20 ms) and gives it the
sandbox's identity through the agent: a new secret, clock, hostname, machine id, entropy
with a CRNG reseed, env vars. A create that finds none, or whose pooled VM fails to
continue, restores a clone as it would without a pool.

The `pool` sweep (every WATASU_SWEEP_POOL_INTERVAL_SECONDS, and right after a claim):
- drops pooled VMs whose version is no longer wanted (superseded, deleted, no demand),
  whose domain is not suspended any more (a host restart), or whose filler died;
- releases pooled VMs, oldest first, while a host's measured free memory is below
  WATASU_POOL_MIN_AVAILABLE_MB;
- fills each host up to its targets: WATASU_POOL_BASE_SIZE for the `base` template's
  current version at its default shape, and for every (version, shape) created from in the
  last WATASU_POOL_DEMAND_WINDOW_SECONDS as many as it had creates, at most
  WATASU_POOL_MAX_PER_SHAPE, and at most WATASU_POOL_MAX_MEMORY_MB of guest memory per host;
- moves pauses held in memory to disk (managed save) once they are older than
  WATASU_PAUSE_IN_MEMORY_SECONDS, or at once on a host short of memory.

Pooled VMs count against their host's memory in placement, belong to no team and are never
metered. Their libvirt names are `<prefix>pool-<id>`; reconciliation removes any such
domain no row (pooled VM or sandbox) owns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from sandboxes import placement
from sandboxes.hostcalls import host_step
from sandboxes.models import Host, HostState, PooledVm, PooledVmState, Sandbox, SandboxState
from sandboxes.placement import hosts_with_room
from sandboxes.runtime import driver_for, lifecycle, vm
from sandboxes.runtime.driver import RuntimeDriver
from templates_app import artifacts
from templates_app.models import Template, TemplateVersion, VersionStatus
from watasu import crypto
from watasu import sweeps as registry
from watasu.locks import try_flock

logger = logging.getLogger(__name__)

Key = tuple[int, int, int]  # (template version id, vCPUs, MiB)


def pool_enabled() -> bool:
    """Pools need a QEMU uid per VM: a pooled VM's network is its uid's firewall rules."""
    return settings.POOL_ENABLED and bool(settings.RUNTIME_QEMU_UID_BASE)


@dataclass(frozen=True)
class Claimed:
    """A pooled VM a create took: the sandbox row runs this domain from now on."""

    host: Host
    domain_name: str
    qemu_uid: int | None
    agent_port: int
    agent_secret_encrypted: str


def pool_claim(
    *, version: TemplateVersion, cpu: int, memory_mb: int, among: list[int] | None
) -> Claimed | None:
    """Take a ready pooled VM of this version and shape, on a host with the vCPUs for it
    (its memory is already counted), inside the caller's transaction; None when there is
    none. Hosts are locked in id order first, as placement does, so a claim and a placement
    never both take the last vCPUs."""
    if not pool_enabled():
        return None
    list(Host.objects.select_for_update().filter(state=HostState.UP).order_by("pk"))
    candidates = (
        PooledVm.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(
            template_version=version,
            cpu_count=cpu,
            memory_mb=memory_mb,
            state=PooledVmState.READY,
            host__state=HostState.UP,
        )
        .filter(placement.heartbeating("host__"))
    )
    if among:
        candidates = candidates.filter(host_id__in=among)
    ready = list(candidates.select_related("host").order_by("ready_at", "pk")[:8])
    room = {r.host.pk: r for r in hosts_with_room()} if ready else {}  # a create without one: no sums
    for pooled in ready:
        host_room = room.get(pooled.host_id)
        if host_room is None or host_room.free_cpu < cpu or pooled.agent_port is None:
            continue
        claimed = Claimed(
            pooled.host, pooled.domain_name, pooled.qemu_uid, pooled.agent_port, pooled.agent_secret_encrypted
        )
        pooled.delete()
        transaction.on_commit(_refill_soon)
        return claimed
    return None


def _refill_soon() -> None:
    """Queue a pool sweep so the VM just taken is replaced (best effort: beat runs it anyway)."""
    from sandboxes.tasks import sweep_task

    try:
        sweep_task.apply_async(args=["pool"], expires=float(settings.SWEEP_INTERVAL_SECONDS["pool"]))
    except Exception:
        logger.warning("could not queue a pool refill; the next pool sweep refills", exc_info=True)


# --- targets --------------------------------------------------------------------------------


def _latest_ready(template_ids: set[int]) -> dict[int, int]:
    """Template id -> id of its current version (newest ready, not deleted)."""
    latest: dict[int, int] = {}
    versions = (
        TemplateVersion.objects.filter(
            template_id__in=template_ids,
            status=VersionStatus.READY,
            deleted_at__isnull=True,
            template__deleted_at__isnull=True,
        )
        .order_by("template_id", "-built_at", "-pk")
        .values_list("template_id", "pk")
    )
    for template_id, pk in versions:
        latest.setdefault(template_id, pk)
    return latest


def pool_targets(host: Host, now: datetime) -> dict[Key, int]:
    """How many pooled VMs each (version, shape) should have on ``host``: the base size for
    `base`, the recent creates for the rest; only current versions whose snapshot lives on
    this host or travel through the artifact store."""
    wanted: dict[Key, int] = {}
    base = Template.objects.filter(team__isnull=True, slug="base", deleted_at__isnull=True).first()
    since = now - timedelta(seconds=settings.POOL_DEMAND_WINDOW_SECONDS)
    demand = (
        Sandbox.objects.filter(
            host=host, created_at__gte=since, restored_from__isnull=True, template_version__isnull=False
        )
        .values_list("template_version_id", "cpu_count", "memory_mb")
        .annotate(creates=Count("pk"))
    )
    for version_id, cpu, memory_mb, creates in demand:
        wanted[(version_id, cpu, memory_mb)] = min(settings.POOL_MAX_PER_SHAPE, creates)
    versions = TemplateVersion.objects.in_bulk({key[0] for key in wanted})
    latest = _latest_ready({v.template_id for v in versions.values()} | ({base.pk} if base else set()))
    if base is not None and base.pk in latest and settings.POOL_BASE_SIZE:
        version = TemplateVersion.objects.get(pk=latest[base.pk])
        key = (version.pk, version.cpu, version.memory_mb)
        wanted[key] = max(wanted.get(key, 0), min(settings.POOL_BASE_SIZE, settings.POOL_MAX_PER_SHAPE))
        versions[version.pk] = version
    return {
        key: n
        for key, n in wanted.items()
        if n > 0
        and key[0] in versions
        and latest.get(versions[key[0]].template_id) == key[0]
        and (versions[key[0]].host_id in (None, host.pk) or artifacts.portable(versions[key[0]]))
    }


# --- the sweep ------------------------------------------------------------------------------


@contextlib.contextmanager
def _host_lock(host: Host) -> Iterator[bool]:
    """One pool run per host at a time (beat and a refill may overlap); False: another holds it."""
    path = Path(settings.DATA_DIR) / f"pool-{host.pk}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with try_flock(path) as held:
        yield held


def _discard(driver: RuntimeDriver, pooled: PooledVm) -> bool:
    """Remove a pooled VM: its row first (so no create can take it), then its domain."""
    name = pooled.domain_name
    if not PooledVm.objects.filter(pk=pooled.pk, state=pooled.state).delete()[0]:
        return False  # taken by a create meanwhile
    driver.destroy(name)
    return True


def _drain(host: Host, driver: RuntimeDriver, targets: dict[Key, int], now: datetime) -> dict[str, int]:
    """Pooled VMs nobody wants any more, whose domain stopped, or whose filler died."""
    stale = now - timedelta(seconds=settings.SWEEP_STUCK_AFTER_SECONDS)
    statuses = driver.domain_statuses(f"{settings.RUNTIME_VM_PREFIX}pool-")
    kept: dict[Key, int] = {}
    counts = {"unwanted": 0, "stopped": 0, "abandoned": 0}
    for pooled in PooledVm.objects.filter(host=host).order_by("-ready_at", "-pk"):
        key = (pooled.template_version_id, pooled.cpu_count, pooled.memory_mb)
        if pooled.state == PooledVmState.FILLING:
            if pooled.created_at < stale and _discard(driver, pooled):
                counts["abandoned"] += 1
            continue
        if statuses.get(pooled.domain_name) != "suspended":
            counts["stopped"] += _discard(driver, pooled)
        elif kept.get(key, 0) >= targets.get(key, 0):
            counts["unwanted"] += _discard(driver, pooled)
        else:
            kept[key] = kept.get(key, 0) + 1
    return counts


def _release_for_memory(host: Host, driver: RuntimeDriver) -> int:
    """Oldest pooled VMs first, while the host's measured free memory is short."""
    released = 0
    for pooled in PooledVm.objects.filter(host=host, state=PooledVmState.READY).order_by("ready_at", "pk"):
        if driver.memory_available_mb() >= settings.POOL_MIN_AVAILABLE_MB:
            break
        released += _discard(driver, pooled)
    return released


def _fill_one(host: Host, driver: RuntimeDriver, version: TemplateVersion, cpu: int, memory_mb: int) -> bool:
    try:
        snapshot = vm.snapshot_for(version, cpu, memory_mb, host)
    except OSError:  # its files are gone (deleted meanwhile): nothing to fill from
        logger.warning("the snapshot of %s is unreadable; no warm VMs for it", version, exc_info=True)
        return False
    if snapshot is None:
        return False
    pooled = PooledVm.objects.create(host=host, template_version=version, cpu_count=cpu, memory_mb=memory_mb)
    try:
        parked = lifecycle.park_clone(
            driver,
            snapshot,
            pooled.domain_name,
            driver.state_dir,
            qemu_uid=pooled.qemu_uid,
            hostname=pooled.domain_name,
            env_vars=vm.guest_env(version, pooled.qemu_uid),
        )
    except Exception:
        logger.warning("could not fill the warm pool of %s on %s", version, host.name, exc_info=True)
        PooledVm.objects.filter(pk=pooled.pk).delete()
        return False
    if not PooledVm.objects.filter(pk=pooled.pk, state=PooledVmState.FILLING).update(
        state=PooledVmState.READY,
        agent_port=parked.port,
        agent_secret_encrypted=crypto.encrypt_text(parked.secret),
        ready_at=timezone.now(),
    ):
        driver.destroy(pooled.domain_name)  # discarded while it was restored
        return False
    return True


def _fill(host: Host, driver: RuntimeDriver, targets: dict[Key, int]) -> tuple[int, bool]:
    """Restore pooled VMs up to the targets, within the batch, the pool's memory and the
    host's room; returns how many, and whether more are due."""
    have = dict.fromkeys(targets, 0)
    held = 0
    for pooled in PooledVm.objects.filter(host=host).values("template_version_id", "cpu_count", "memory_mb"):
        key = (pooled["template_version_id"], pooled["cpu_count"], pooled["memory_mb"])
        have[key] = have.get(key, 0) + 1
        held += pooled["memory_mb"]
    versions = TemplateVersion.objects.in_bulk({key[0] for key in targets})
    filled = 0
    for key, target in sorted(targets.items(), key=lambda item: have.get(item[0], 0) - item[1]):
        version_id, cpu, memory_mb = key
        while have[key] < target:
            if filled >= settings.POOL_FILL_BATCH:
                return filled, True
            room = next((r for r in hosts_with_room() if r.host.pk == host.pk), None)
            if driver.memory_available_mb() < settings.POOL_MIN_AVAILABLE_MB or room is None:
                return filled, False
            if held + memory_mb > settings.POOL_MAX_MEMORY_MB or room.free_memory_mb < memory_mb:
                break  # this shape does not fit; a smaller one may
            if not _fill_one(host, driver, versions[version_id], cpu, memory_mb):
                break
            have[key] += 1
            held += memory_mb
            filled += 1
    return filled, False


def _pool_host(host: Host, now: datetime) -> registry.Result:
    driver = driver_for(host)
    with _host_lock(host) as mine:
        if not mine:
            return {"skipped": "another pool run holds this host"}
        targets = pool_targets(host, now) if pool_enabled() and host.state == HostState.UP else {}
        drained = _drain(host, driver, targets, now)
        released = _release_for_memory(host, driver)
        filled, more = _fill(host, driver, targets) if targets and not released else (0, False)
    return {
        "targets": sum(targets.values()),
        "ready": PooledVm.objects.filter(host=host, state=PooledVmState.READY).count(),
        "filled": filled,
        "released_for_memory": released,
        **drained,
        "more": more,
    }


def _to_disk(sandbox_pk: int, driver: RuntimeDriver) -> bool:
    """Save one in-memory pause to disk, holding its row: a resume waits for the save, then
    finds the memory on disk."""
    with transaction.atomic():
        sandbox = (
            Sandbox.objects.select_for_update(skip_locked=True)
            .filter(pk=sandbox_pk, state=SandboxState.STOPPED, paused_in_memory=True)
            .first()
        )
        if sandbox is None or driver.domain_status(sandbox.vm_name) != "suspended":
            return False  # resumed, or its memory was lost with its host (it resumes from disk)
        driver.pause(sandbox.vm_name)
        Sandbox.objects.filter(pk=sandbox.pk).update(paused_in_memory=False, updated_at=timezone.now())
    return True


def _memory_lost(host: Host, driver: RuntimeDriver) -> int:
    """In-memory pauses whose VM stopped (the host restarted, QEMU died): they hold no host
    memory any more, and their resume boots on their disk. Claimed by a conditional update,
    so a resume or a pause that moved the row meanwhile wins."""
    held = Sandbox.objects.filter(host=host, state=SandboxState.STOPPED, paused_in_memory=True)
    if not held.exists():
        return 0
    statuses = driver.domain_statuses(settings.RUNTIME_VM_PREFIX)
    lost = 0
    for sandbox in held.only("pk", "domain_name", "paused_at", "updated_at"):
        if statuses.get(sandbox.vm_name, "absent") in ("shutoff", "absent"):
            lost += Sandbox.objects.filter(
                pk=sandbox.pk,
                state=SandboxState.STOPPED,
                paused_in_memory=True,
                updated_at=sandbox.updated_at,
            ).update(
                paused_in_memory=False,
                memory_lost=True,
                last_error="Its memory was lost with its host while paused; it resumes on its disk.",
                updated_at=timezone.now(),
            )
    return lost


def _tier_down(host: Host, now: datetime) -> registry.Result:
    """In-memory pauses past their time (since the pause, whatever changed on the row
    since), or all of them on a host short of memory; and those whose memory was lost."""
    driver = driver_for(host)
    lost = _memory_lost(host, driver)
    due = Sandbox.objects.filter(host=host, state=SandboxState.STOPPED, paused_in_memory=True)
    if driver.memory_available_mb() >= settings.POOL_MIN_AVAILABLE_MB:
        since = now - timedelta(seconds=settings.PAUSE_IN_MEMORY_SECONDS)
        due = due.filter(Q(paused_at__lt=since) | Q(paused_at__isnull=True))
    saved = 0
    for pk in due.order_by("paused_at").values_list("pk", flat=True)[: settings.SWEEP_BATCH_SIZE]:
        try:
            saved += _to_disk(pk, driver)
        except Exception:
            logger.exception("sandbox %s: could not move its pause to disk", pk)
    return {"paused_to_disk": saved, "memory_lost": lost}


def pool_sweep(*, now: datetime | None = None) -> registry.Result:
    """Every up host's pools drained, released and refilled; due in-memory pauses to disk."""
    now = now or timezone.now()
    results: dict[str, registry.Result] = {}
    more = False
    for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING]):
        result = pool_host_run(host, now) or {"queued": True}  # None: queued to the host's worker
        results[host.name] = result
        more = more or bool(result.get("more"))
    return {"hosts": results, "more": more}


@host_step(wait=False, expires=int(settings.SWEEP_INTERVAL_SECONDS["pool"]))
def pool_host_run(host: Host, now: datetime) -> registry.Result:
    """One host's part of the pool sweep (on the host)."""
    result: registry.Result = {}
    for part, work in (("pool", _pool_host), ("paused_to_disk", _tier_down)):
        try:
            done = work(host, now)
            result.update(done if isinstance(done, dict) else {part: done})
        except Exception as exc:  # libvirt trouble: the hosts sweep deals with it
            logger.exception("the pool sweep's %s failed on host %s", part, host.name)
            result[f"{part}_error"] = str(exc)[:500]
    return result


def pooled_domains(names: list[str]) -> set[str]:
    """Of the VM names no sandbox owns, those of pooled VMs that still have a row."""
    prefix = f"{settings.RUNTIME_VM_PREFIX}pool-"
    ids = {name.removeprefix(prefix) for name in names if name.startswith(prefix)}
    rows = PooledVm.objects.filter(pk__in=[int(i) for i in ids if i.isdigit()]).values_list("pk", flat=True)
    return {f"{prefix}{pk}" for pk in rows}


def pause_in_memory_allowed(sandbox: Sandbox) -> bool:
    """Whether this pause may stay in memory: the tier is on, the team is under its cap of
    in-memory pauses, and the host is not short of memory."""
    if not settings.PAUSE_IN_MEMORY_SECONDS or sandbox.host is None:
        return False
    held = Sandbox.objects.filter(team_id=sandbox.team_id, state=SandboxState.STOPPED, paused_in_memory=True)
    if held.count() >= settings.PAUSE_IN_MEMORY_PER_TEAM:
        return False
    return placement.measured_available_mb(sandbox.host) >= settings.POOL_MIN_AVAILABLE_MB


@host_step
def pooled_domain_destroy(host: Host, name: str) -> None:
    """Remove a released pooled VM's domain and files (on its host)."""
    driver_for(host).destroy(name)

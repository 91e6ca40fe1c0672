"""Sweeps: the jobs that keep the platform's promises when nobody is calling it.

Each sweep is a function returning counts, safe to run twice at once and to rerun
after a crash: every state change is a conditional transition, every file deletion
is decided from the database at the moment of deletion. Each handles at most
``SWEEP_BATCH_SIZE`` items per call and says ``more`` when it stopped at that bound;
the `sweeps.run` task then queues itself again. Celery beat starts each on the
interval in `settings.SWEEP_INTERVAL_SECONDS`; operators run them from the admin
(`Sweep runs`) or with `manage.py sweep`.

- deadlines: ready sandboxes past their deadline -> `expired` (kill: VM and disk
  removed) or `stopped` (pause: memory and disk kept).
- stuck: sandboxes left creating/restoring/stopping/checkpointing by a process that
  died -> their true state as libvirt shows it, or `failed`.
- reconcile: each up host's domains against the rows, both ways: a domain no live
  row owns is removed; a ready/stopped sandbox whose VM vanished becomes `lost`.
- hosts: a host whose libvirt does not answer is `down` (placement skips it), and its
  sandboxes are reported; it is `up` again when libvirt answers.
- retention: purge disks of failed/lost sandboxes after the retention period and files
  no row owns, then every app's retention hook (the templates app: unused build layers,
  files of deleted template versions; the teams app: expired idempotency records).

Other apps' sweeps (the templates app's `builds`) and hooks live in those apps; the
registry of them all is `watasu.sweeps`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from sandboxes import hosts, network, services
from sandboxes.hostcalls import host_step
from sandboxes.models import Host, HostState, OnTimeout, Sandbox, SandboxState, SweepRun
from sandboxes.runtime import driver_for, lifecycle, vm
from sandboxes.runtime.driver import RuntimeDriver
from watasu import errors
from watasu import sweeps as registry

logger = logging.getLogger(__name__)

S = SandboxState
Result = registry.Result


def _batch() -> int:
    return settings.SWEEP_BATCH_SIZE


# --- deadlines ----------------------------------------------------------------------------


# A pause writes the guest's memory to disk (seconds each), so one call pauses fewer
# sandboxes than it expires; the rest wait for the call it queues next.
PAUSES_PER_CALL = 8


def deadline_sweep(*, now: datetime | None = None) -> Result:
    """Ready sandboxes past their deadline, oldest deadline first."""
    now = now or timezone.now()
    due = Sandbox.objects.filter(state=S.READY, deadline_at__lte=now).order_by("deadline_at")
    kill = list(due.exclude(on_timeout=OnTimeout.PAUSE).values_list("pk", flat=True)[: _batch()])
    pause = list(due.filter(on_timeout=OnTimeout.PAUSE).select_related("host")[:PAUSES_PER_CALL])
    expired = services.sandboxes_expire(ids=kill, now=now)
    paused = failed = 0
    for sandbox in pause:
        try:
            services.sandbox_pause(sandbox=sandbox, reason="timeout", due_by=now)
            paused += 1
        except errors.DomainError as exc:  # busy, or the pause failed (retried next sweep)
            logger.warning("timeout pause of sandbox %s: %s", sandbox.pk, exc)
            failed += 1
    return {
        "expired": len(expired),
        "stopped": paused,
        "errors": failed,
        "more": len(kill) == _batch() or (len(pause) == PAUSES_PER_CALL and paused > 0),
    }


# --- stuck transitional states ---------------------------------------------------------------


def _claim(sandbox: Sandbox, since: datetime) -> bool:
    """Take a stuck row for this sweep run: touch it if it is still as we listed it.
    Other runs then see it as recently changed and leave it for the claim's holder."""
    return bool(
        Sandbox.objects.filter(pk=sandbox.pk, state=sandbox.state, updated_at__lt=since).update(
            updated_at=timezone.now()
        )
    )


def _recover(sandbox: Sandbox, status: str, since: datetime) -> str:
    """Move one stuck sandbox to what libvirt says is true; returns the state chosen.

    Claim first, act second: the row moves (or is claimed) by a conditional update
    before any VM is touched, so a row that changed since the listing (its process
    was slow, not dead) keeps its VM.
    """
    state = sandbox.state

    def move(to: str, reason: str, *, claimed: bool = False, **fields: Any) -> bool:
        return bool(
            services.sandboxes_transition(
                ids=[sandbox.pk],
                from_states=[state],
                to_state=to,
                reason=reason,
                unchanged_since=None if claimed else since,
                **fields,
            )
        )

    now = timezone.now()
    first_start = state == S.RESTORING and sandbox.restored_from_id is not None and sandbox.started_at is None
    if state == S.CREATING or first_start:
        # The process that was creating it (or restoring a checkpoint into it) died holding
        # the new agent secret: the VM, if any, cannot be handed out. The create failed;
        # then its VM is removed.
        if not move(
            S.FAILED,
            "create interrupted",
            ended_at=now,
            last_error="The process creating this sandbox stopped before it was ready.",
        ):
            return "unchanged"
        services.sandbox_purge(sandbox)
        return S.FAILED
    if state in (S.STOPPING, S.RESTORING) and status == "saved":
        return (
            S.STOPPED
            if move(S.STOPPED, f"{state} interrupted; memory is saved", paused_in_memory=False)
            else "unchanged"
        )
    if state in (S.STOPPING, S.RESTORING) and status == "suspended":
        # a pause that suspended the VM, or a resume that never continued it
        moved = move(S.STOPPED, f"{state} interrupted; memory is held", paused_in_memory=True, paused_at=now)
        return S.STOPPED if moved else "unchanged"
    if status == "running" and state == S.RESTORING:
        return _recover_restoring(sandbox, since, move, now)
    if status == "running":
        return S.READY if move(S.READY, f"{state} interrupted; the VM runs") else "unchanged"
    if not move(S.LOST, f"{state} interrupted; the VM is gone", ended_at=now):
        return "unchanged"
    vm.forget(sandbox)
    return S.LOST


def _recover_restoring(sandbox: Sandbox, since: datetime, move: Callable[..., bool], now: datetime) -> str:
    """The guest runs but its resume never finished: finish it (resync), or give up on it."""
    if not _claim(sandbox, since):
        return "unchanged"
    try:
        lifecycle.resync(vm.agent_client(sandbox), sandbox.vm_name, timeout=10)
    except Exception:  # the guest does not answer: nothing to hand out
        if not move(S.FAILED, "resume interrupted; the guest did not answer", claimed=True, ended_at=now):
            return "unchanged"
        vm.forget(sandbox)
        return S.FAILED
    return (
        S.READY
        if move(
            S.READY,
            "resume interrupted; the VM runs",
            claimed=True,
            ready_at=now,
            deadline_at=now + timedelta(seconds=sandbox.timeout),
        )
        else "unchanged"
    )


def stuck_sweep(*, now: datetime | None = None) -> Result:
    """Sandboxes in a transitional state for longer than ``SWEEP_STUCK_AFTER_SECONDS``."""
    now = now or timezone.now()
    since = now - timedelta(seconds=settings.SWEEP_STUCK_AFTER_SECONDS)
    stuck = list(
        Sandbox.objects.filter(state__in=services.BUSY_STATES, updated_at__lt=since, host__state=HostState.UP)
        .select_related("host")
        .order_by("updated_at")[: _batch()]
    )
    outcomes: dict[str, int] = {}
    for sandbox in stuck:
        try:
            outcome = _recover(sandbox, vm.status(sandbox), since)
        except Exception:  # libvirt trouble: the hosts sweep deals with it; try again later
            logger.exception("could not recover stuck sandbox %s", sandbox.pk)
            outcome = "error"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"recovered": outcomes, "more": len(stuck) == _batch()}


# --- reconciliation ---------------------------------------------------------------------------


def _sandbox_pk(name: str) -> int | None:
    suffix = name.removeprefix(settings.RUNTIME_VM_PREFIX)
    return int(suffix) if suffix.isdigit() else None


def _rows_of(names: list[str]) -> dict[str, Sandbox]:
    """The rows owning these domain names: by id, or by the pooled domain a sandbox took."""
    pks = [pk for pk in map(_sandbox_pk, names) if pk is not None]
    others = [name for name in names if _sandbox_pk(name) is None]
    rows = Sandbox.objects.filter(Q(pk__in=pks) | Q(domain_name__in=others))
    return {row.vm_name: row for row in rows if row.vm_name in names}


def _reconcile_host(host: Host) -> Result:
    driver = driver_for(host)
    listed_at = timezone.now()
    domains = driver.domain_statuses(settings.RUNTIME_VM_PREFIX)
    # libvirt -> database: domains no live row owns.
    rows = _rows_of(list(domains))
    needed = registry.owned_domains([name for name in domains if name not in rows])  # build/pool VMs
    removed = kept_disks = 0
    for name in domains:
        row = rows.get(name)
        if row is None:
            if name in needed:
                continue
            driver.destroy(name)  # a VM no app needs, or a name we never give
            removed += 1
        elif row.host_id != host.pk or row.state in (S.DESTROYED, S.EXPIRED):
            driver.destroy(name)
            removed += 1
        elif row.state in (S.FAILED, S.LOST):
            driver.forget(name)  # stop it, keep the disk until the retention sweep
            kept_disks += 1
    # database -> libvirt: ready/stopped rows whose VM is not what they claim. Only rows
    # unchanged since the listing count: a row that moved meanwhile is judged next time.
    lost = saved = 0

    def listed(state: str) -> list[tuple[int, str, bool]]:
        """(id, domain status, paused in memory) of the host's rows in ``state``."""
        candidates = Sandbox.objects.filter(host=host, state=state, updated_at__lt=listed_at)
        rows = candidates.values_list("pk", "domain_name", "paused_in_memory", "memory_lost")
        return [
            (pk, domains.get(domain or f"{settings.RUNTIME_VM_PREFIX}{pk}", "absent"), in_memory or lost)
            for pk, domain, in_memory, lost in rows.iterator(chunk_size=2000)
        ]

    was_saved = [pk for pk, status, _ in listed(S.READY) if status == "saved"]
    for start in range(0, len(was_saved), _batch()):  # paused outside the platform: memory is kept
        saved += len(
            services.sandboxes_transition(
                ids=was_saved[start : start + _batch()],
                from_states=[S.READY],
                to_state=S.STOPPED,
                reason="the VM was saved outside the platform",
                unchanged_since=listed_at,
            )
        )
    stopped_running = [pk for pk, status, _ in listed(S.STOPPED) if status == "running"]
    resaved = sum(_save_again(driver, pk, listed_at) for pk in stopped_running[: _batch()])
    # A pause held in memory whose host restarted lost its memory, not its disk (synced at
    # the pause): it stays stopped and its resume boots on that disk.
    kept = {"running", "saved", "suspended"}
    for state in (S.READY, S.STOPPED):
        vanished = [
            pk
            for pk, status, in_memory in listed(state)
            if status not in kept and not (state == S.STOPPED and in_memory)
        ]
        for start in range(0, len(vanished), _batch()):
            moved = services.sandboxes_transition(
                ids=vanished[start : start + _batch()],
                from_states=[state],
                to_state=S.LOST,
                reason="the VM vanished",
                unchanged_since=listed_at,
                ended_at=timezone.now(),
                agent_port=None,
                last_error="The VM stopped existing outside the platform's control.",
            )
            for sandbox in moved:
                driver.forget(sandbox.vm_name)
            lost += len(moved)
    return {
        "domains": len(domains),
        "removed": removed,
        "stopped_for_retention": kept_disks,
        "lost": lost,
        "stopped": saved,
        "saved_again": resaved,
    }


def _save_again(driver: RuntimeDriver, pk: int, listed_at: datetime) -> bool:
    """A `stopped` sandbox whose VM runs (started outside the platform, or a resume that
    died after starting it) is unmetered and outside quota: save its memory again.
    Claimed first (STOPPED -> STOPPING), so a resume racing this sweep wins or waits."""
    claimed = services.sandboxes_transition(
        ids=[pk],
        from_states=[S.STOPPED],
        to_state=S.STOPPING,
        reason="running while stopped",
        unchanged_since=listed_at,
    )
    if not claimed:
        return False
    try:
        driver.pause(claimed[0].vm_name)
    except Exception:
        logger.exception("sandbox %s runs while stopped and could not be saved again", pk)
        services.sandboxes_transition(
            ids=[pk],
            from_states=[S.STOPPING],
            to_state=S.LOST,
            reason="running while stopped; could not save it",
            ended_at=timezone.now(),
            agent_port=None,
        )
        driver.forget(claimed[0].vm_name)
        return False
    services.sandboxes_transition(
        ids=[pk],
        from_states=[S.STOPPING],
        to_state=S.STOPPED,
        reason="running while stopped; memory saved again",
        paused_in_memory=False,
    )
    return True


QUEUED = "queued to its worker"


def _interval(name: str) -> int:
    """A sweep's part queued for a host's worker is dropped if still queued after this long
    (the next run queues another)."""
    return int(settings.SWEEP_INTERVAL_SECONDS[name])


@host_step(wait=False, expires=_interval("reconcile"))
def reconcile_host(host: Host) -> Result:
    """One host's libvirt domains and firewall against the database (on the host)."""
    try:
        result = _reconcile_host(host)
    except Exception as exc:  # the hosts sweep marks it down; never guess from a failed listing
        logger.exception("reconciliation of host %s failed", host.name)
        return {"error": str(exc)[:500]}
    try:
        result["network"] = network.reconcile(host)
    except Exception as exc:
        logger.exception("reconciliation of the network policies of host %s failed", host.name)
        result["network"] = {"error": str(exc)[:500]}
    return result


def reconcile_sweep(*, now: datetime | None = None) -> Result:
    """Every up host's libvirt domains against the database, both ways (each host's own
    worker does its part)."""
    results = {}
    for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING]):
        try:
            results[host.name] = reconcile_host(host) or QUEUED
        except Exception as exc:
            logger.exception("reconciliation of host %s failed", host.name)
            results[host.name] = {"error": str(exc)[:500]}
    return {"hosts": results, "more": False}


# --- host health: sandboxes/hosts.py ------------------------------------------------------


# --- retention ---------------------------------------------------------------------------


def old_enough_to_purge(path: Path, now: float) -> bool:
    """Whether a file no row claims is past the grace period (a file being made is younger)."""
    try:
        return now - path.lstat().st_mtime > settings.ORPHAN_FILE_GRACE_SECONDS
    except FileNotFoundError:
        return False


def _purge_retained(now: datetime) -> int:
    """Failed/lost sandboxes past the retention period (and any terminal row whose
    purge did not happen): VM definition, saved memory and disk removed."""
    cutoff = now - timedelta(seconds=settings.SANDBOX_DISK_RETENTION_SECONDS)
    due = (
        Sandbox.objects.filter(purged_at__isnull=True)
        .filter(Q(state__in=[S.FAILED, S.LOST], ended_at__lt=cutoff) | Q(state__in=[S.EXPIRED, S.DESTROYED]))
        .select_related("host")
        .order_by("pk")[: _batch()]
    )
    return services.sandboxes_purge(due)


@host_step(wait=False, expires=_interval("retention"))
def _orphan_sandbox_files(host: Host, now: float) -> int:
    """Disks and directories in the host's sandbox dir that no unpurged row owns."""
    state_dir = Path(host.data_dir) / "sandboxes"
    if not state_dir.is_dir():
        return 0
    owners: dict[Path, int | None] = {}
    for path in state_dir.iterdir():
        stem = path.name.removesuffix(".qcow2")
        owners[path] = _sandbox_pk(stem) if stem.startswith(settings.RUNTIME_VM_PREFIX) else None
    live = set(
        Sandbox.objects.filter(
            pk__in=[pk for pk in owners.values() if pk], purged_at__isnull=True
        ).values_list("pk", flat=True)
    )
    in_use = set(driver_for(host).domain_statuses(settings.RUNTIME_VM_PREFIX))
    removed = 0
    for path, pk in owners.items():
        if (
            pk is None
            or pk in live
            or path.name.removesuffix(".qcow2") in in_use
            or not old_enough_to_purge(path, now)
        ):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def retention_sweep(*, now: datetime | None = None) -> Result:
    """Purge retained disks and orphaned files, then run every app's retention hook."""
    now = now or timezone.now()
    purged = _purge_retained(now)
    files = sum(
        _orphan_sandbox_files(host, now.timestamp()) or 0  # None: queued to the host's worker
        for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING])
    )
    result: Result = {"sandboxes_purged": purged, "orphan_files": files, "more": purged == _batch()}
    for hook in registry.retention_hooks():
        counts = hook(now)
        result = {**result, **counts, "more": result["more"] or bool(counts.get("more"))}
    return result


SWEEPS = registry.SWEEPS  # every app's sweeps, by name


def register() -> None:
    """The sandboxes app's sweeps (called from its AppConfig.ready)."""
    for name, sweep in (
        ("deadlines", deadline_sweep),
        ("stuck", stuck_sweep),
        ("reconcile", reconcile_sweep),
        ("hosts", hosts.host_health_sweep),
        ("retention", retention_sweep),
    ):
        registry.register_sweep(name, sweep)
    from sandboxes.checkpoints import checkpoints_retention  # they build on this module
    from sandboxes.pool import pool_sweep, pooled_domains

    registry.register_retention(checkpoints_retention)
    registry.register_sweep("pool", pool_sweep)
    registry.register_domain_owner(pooled_domains)


def sweep_run(name: str, *, now: datetime | None = None) -> Result:
    """Run one sweep once, recording when and what it did (`SweepRun`)."""
    if name not in SWEEPS:
        raise errors.NotFound(f"No sweep named {name!r}; sweeps: {', '.join(SWEEPS)}.")
    started = timezone.now()
    SweepRun.objects.get_or_create(name=name)
    SweepRun.objects.filter(name=name).update(last_started_at=started)
    clock = time.monotonic()
    try:
        result = SWEEPS[name](now=now)
    except Exception as exc:
        SweepRun.objects.filter(name=name).update(
            last_error=f"{type(exc).__name__}: {exc}"[:2000], last_finished_at=timezone.now()
        )
        raise
    result["seconds"] = round(time.monotonic() - clock, 3)
    SweepRun.objects.filter(name=name).update(
        runs=F("runs") + 1, last_finished_at=timezone.now(), last_result=result, last_error=""
    )
    return result

"""Writes for hosts and sandboxes: the lifecycle state machine.

Every state change is a conditional update (`WHERE state IN (...)`) plus a
`SandboxEvent` in the same transaction, so two requests or workers can never
both act on one sandbox, and billing can meter the recorded transitions.
Slow runtime work (starting, pausing a VM) happens outside transactions,
bracketed by transitional states (`creating`, `stopping`, `restoring`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from billing import metering
from billing.selectors import team_require_active
from sandboxes import hostcalls, mcp, network, pool
from sandboxes.models import (
    RUNTIME_STATES,
    Checkpoint,
    CheckpointStatus,
    Host,
    HostState,
    Sandbox,
    SandboxEvent,
    SandboxState,
)
from sandboxes.placement import host_disk_check, host_has_room, host_place
from sandboxes.runtime import vm
from sandboxes.runtime.volumes import Attachment, MountRefused
from sandboxes.selectors import QuotaReservation, checkpoint_for_create, team_quota
from sandboxes.sessions import Session, session_mint
from sandboxes.specs import CreateSpec, Lifecycle
from teams.models import Team, User
from teams.selectors import team_for_write
from templates_app import artifacts, provider
from templates_app.models import TemplateVersion
from templates_app.selectors import template_version_by_id, template_version_resolve
from volumes.models import Volume
from volumes.services import volumes_claim, volumes_for_mounts, volumes_release, wait_for_detached_operations
from watasu import crypto, errors

logger = logging.getLogger(__name__)

S = SandboxState
BUSY_STATES = frozenset({S.CREATING, S.RESTORING, S.STOPPING, S.CHECKPOINTING})
TERMINAL_STATES = frozenset({S.EXPIRED, S.FAILED, S.LOST, S.DESTROYED})
# How long resume waits for an unfinished create/pause/restore before answering 409.
BUSY_WAIT_SECONDS = 120.0


# --- hosts ------------------------------------------------------------------------


def host_register_local() -> Host:
    """Register (or refresh) this machine as a host, from the runtime settings.

    Embedded mode calls this on every start. Capacity is taken from the
    settings at first registration only, so operators' edits in the admin last,
    and a draining host stays draining. In a host worker (`make host`), the host is
    registered as driven by that worker (sandboxes/hosts.py).
    """
    if settings.HOST_WORKER:
        from sandboxes.hosts import host_register_worker

        return host_register_worker()
    host, created = Host.objects.get_or_create(
        name=settings.RUNTIME_HOST_NAME,
        defaults={
            "libvirt_uri": settings.RUNTIME_LIBVIRT_URI,
            "data_dir": str(settings.RUNTIME_HOST_DATA_DIR),
            "cpu_capacity": settings.RUNTIME_HOST_CPU_CAPACITY,
            "memory_capacity_mb": settings.RUNTIME_HOST_MEMORY_CAPACITY_MB,
        },
    )
    if not created:
        # a host its own worker registered keeps its queue: this process (a management
        # command run on that machine) is not its driver
        Host.objects.filter(pk=host.pk).update(
            libvirt_uri=settings.RUNTIME_LIBVIRT_URI,
            data_dir=str(settings.RUNTIME_HOST_DATA_DIR),
            address=settings.RUNTIME_HOST_ADDRESS,
        )
        # A host found down comes back up (this process just reached its libvirt); an
        # operator's `draining` stays: builds and restarts call this and must not undo it.
        Host.objects.filter(pk=host.pk, state=HostState.DOWN).update(
            state=HostState.UP, last_seen_at=timezone.now()
        )
        host.refresh_from_db()
    return host


# --- state machine ------------------------------------------------------------------


def sandbox_transition(
    *,
    sandbox: Sandbox,
    from_states: Iterable[str],
    to_state: str,
    reason: str = "",
    where: Q | None = None,
    **fields: Any,
) -> bool:
    """Move the sandbox to `to_state` if it is in one of `from_states` (and matches `where`).

    Returns False (and changes nothing) when another request got there first.
    On success `sandbox` is refreshed and the transition is recorded as an event.
    """
    now = timezone.now()
    disk = _kept_disk_bytes([sandbox], to_state)
    with transaction.atomic():
        rows = Sandbox.objects.select_for_update().filter(pk=sandbox.pk, state__in=list(from_states))
        current = rows.filter(where or Q()).values_list("state", flat=True).first()
        if current is None:
            return False
        Sandbox.objects.filter(pk=sandbox.pk).update(state=to_state, updated_at=now, **fields)
        SandboxEvent.objects.create(
            sandbox_id=sandbox.pk, from_state=current, to_state=to_state, at=now, reason=reason[:200]
        )
        metering.sandboxes_moved(moves=[(sandbox.pk, current)], to_state=to_state, at=now, disk_bytes=disk)
    sandbox.refresh_from_db()
    return True


def _kept_disk_bytes(sandboxes: Iterable[Sandbox], to_state: str) -> dict[int, int]:
    """The size of each disk a transition to `to_state` keeps (billed as a stopped disk)."""
    if to_state not in metering.KEPT_DISK_STATES:
        return {}
    return {sandbox.pk: _disk_bytes_or_zero(sandbox) for sandbox in sandboxes if sandbox.host_id is not None}


def _disk_bytes_or_zero(sandbox: Sandbox) -> int:
    """The disk's size, or 0 when its host does not answer: a transition never waits on a
    silent host, and the disk is measured again at its next one."""
    try:
        return vm.disk_bytes(sandbox)
    except errors.Unavailable as exc:
        logger.warning("sandbox %s: its disk was not measured: %s", sandbox.pk, exc.message)
        return 0


def destroyed_message(sandbox_id: object) -> str:
    """What every route says of a destroyed sandbox (its record stays readable for a while)."""
    return f"Sandbox {sandbox_id} was destroyed; its files and processes are gone."


def sandbox_gone(sandbox_id: object) -> errors.NotFound:
    """The 404 of an action on a destroyed sandbox: it names the sandbox and that it is gone."""
    return errors.NotFound(destroyed_message(sandbox_id), code="sandbox_not_found")


def state_conflict(sandbox: Sandbox, action: str) -> errors.DomainError:
    sandbox.refresh_from_db(fields=["state"])
    state = sandbox.state
    if state == S.DESTROYED:
        return sandbox_gone(sandbox.pk)
    if state in (S.STOPPED, S.STOPPING) and action == "pause":
        return errors.Conflict(f"Sandbox {sandbox.pk} is already paused.", code="sandbox_already_paused")
    if state in BUSY_STATES:
        return errors.Conflict(f"Sandbox {sandbox.pk} is {state}; try again shortly.", code="sandbox_busy")
    if state in TERMINAL_STATES:
        return errors.Conflict(
            f"Sandbox {sandbox.pk} is {state} and cannot {action}.",
            code="sandbox_not_resumable" if action == "resume" else "sandbox_not_running",
        )
    return errors.Conflict(
        f"Sandbox {sandbox.pk} is {state}; cannot {action} it.", code="sandbox_not_running"
    )


# --- quota ----------------------------------------------------------------------------


def _quota_check(team: Team, cpu: int, memory_mb: int, *, exclude: Sandbox | None = None) -> None:
    """Raise 422 `sandbox_quota_exceeded` if the reservation does not fit.

    Callers hold the team row lock, so concurrent reservations are counted.
    """
    reservation = QuotaReservation(instances=1, vcpu_count=cpu, memory_mb=memory_mb)
    quota = team_quota(team=team, reservation=reservation)
    checks = [
        ("max_running_instances", quota.limits.max_running_instances, quota.usage.running_instances, 1),
        ("max_vcpu_count", quota.limits.max_vcpu_count, quota.usage.vcpu_count, cpu),
        ("max_memory_mb", quota.limits.max_memory_mb, quota.usage.memory_mb, memory_mb),
    ]
    for name, limit, used, asked in checks:
        if used + asked > limit:
            raise errors.Invalid(
                f"Sandbox quota exceeded for team {team.slug}: {name} {limit} "
                f"(in use {used}, requested {asked}).",
                code="sandbox_quota_exceeded",
                quota=quota.as_dict(),
            )


def _lock_team(team: Team) -> None:
    Team.objects.select_for_update().filter(pk=team.pk).first()


# --- create ---------------------------------------------------------------------------


def _resolve_version(team: Team, spec: CreateSpec) -> TemplateVersion:
    if spec.template_version_id is not None:
        return template_version_by_id(team=team, version_id=spec.template_version_id)
    selector = spec.template or (mcp.GATEWAY_TEMPLATE if spec.mcp is not None else "base")
    try:
        return template_version_resolve(team=team, selector=selector)
    except errors.Invalid as exc:
        if exc.code in ("template_not_found", "template_not_ready") and provider.is_provider_selector(
            team, selector
        ):
            raise provider.provider_not_ready(selector) from exc
        raise


def _hosts_for(version: TemplateVersion, volumes: list[Volume]) -> list[int]:
    """Where the sandbox may run (empty: anywhere). A volume stays on its host, so the
    sandbox goes there; a template version in the artifact store goes to any host (pulled
    on first use), one not yet in it only to the host that built it. A request whose pieces
    must live on different hosts is a 422."""
    hosts = {v.host_id for v in volumes}
    if len(hosts) > 1:
        raise errors.Invalid(
            "The volumes of this request are on different hosts; a sandbox mounts volumes of its "
            "own host only.",
            code="volume_host_mismatch",
        )
    if version.host_id and not artifacts.portable(version):
        if hosts and hosts != {version.host_id}:
            raise errors.Invalid(
                "The template and the volumes of this request are on different hosts; a sandbox "
                "mounts volumes of its own host only.",
                code="volume_host_mismatch",
            )
        hosts = {version.host_id}
    return sorted(hosts)


def _reserve(
    *,
    team: Team,
    user: User,
    version: TemplateVersion,
    spec: CreateSpec,
    volumes: list[Volume],
    checkpoint: Checkpoint | None = None,
) -> Sandbox:
    """Quota check, placement, the `creating` row (`restoring` from a checkpoint, on the
    checkpoint's host) and its volume claims, under the team and host locks."""
    cpu = spec.cpu_count or version.cpu
    memory_mb = spec.memory_mb or version.memory_mb
    among = _hosts_for(version, volumes)
    if checkpoint is not None:
        if among and among != [checkpoint.host_id]:
            raise errors.Invalid(
                "The checkpoint and the volumes of this request are on different hosts.",
                code="volume_host_mismatch",
            )
        among = [checkpoint.host_id]
    state = S.RESTORING if checkpoint is not None else S.CREATING
    with transaction.atomic():
        _lock_team(team)
        team_require_active(team)
        _quota_check(team, cpu, memory_mb)
        pooled = (
            pool.pool_claim(version=version, cpu=cpu, memory_mb=memory_mb, among=among or None)
            if checkpoint is None
            else None
        )
        host = (
            pooled.host
            if pooled
            else host_place(
                cpu=cpu, memory_mb=memory_mb, among=among or None, having=artifacts.hosts_with(version)
            )
        )
        sandbox = Sandbox.objects.create(
            team=team,
            created_by=user,
            host=host,
            domain_name=pooled.domain_name if pooled else "",
            runtime_uid=pooled.qemu_uid if pooled else None,
            agent_port=pooled.agent_port if pooled else None,
            agent_secret_encrypted=pooled.agent_secret_encrypted if pooled else "",
            state=state,
            restored_from=checkpoint,
            template=version.template,
            template_version=version,
            name=spec.name,
            metadata=spec.metadata,
            cpu_count=cpu,
            memory_mb=memory_mb,
            timeout=spec.timeout,
            on_timeout=spec.lifecycle.on_timeout,
            auto_resume=spec.lifecycle.auto_resume,
            env_vars_encrypted=crypto.encrypt_json(spec.env_vars) if spec.env_vars else "",
            network_policy=spec.network_policy,
            network_rules_encrypted=crypto.encrypt_json(spec.network_rules) if spec.network_rules else "",
            network_class=spec.network_policy.get("network_class") or settings.SANDBOX_DEFAULT_NETWORK_CLASS,
            volume_mounts=[mount.as_dict() for mount in spec.volume_mounts],
        )
        volumes_claim(sandbox=sandbox, volumes=volumes)
        reason = "create" if checkpoint is None else f"restore of checkpoint {checkpoint.pk}"
        SandboxEvent.objects.create(
            sandbox=sandbox, from_state="", to_state=state, at=sandbox.created_at, reason=reason
        )
        metering.sandboxes_moved(moves=[(sandbox.pk, "")], to_state=state, at=sandbox.created_at)
    return sandbox


def _fail_start(sandbox: Sandbox, exc: Exception) -> errors.DomainError:
    logger.exception("sandbox %s failed to start", sandbox.pk)
    if hostcalls.host_unavailable(exc):  # waiting on it again helps nobody: its worker removes the VM
        vm.destroy_later(sandbox)  # when it can; reconciliation there stops a VM of a failed row
    else:
        sandbox_purge(sandbox)
    sandbox_transition(
        sandbox=sandbox,
        from_states=[S.CREATING, S.RESTORING],
        to_state=S.FAILED,
        reason="start failed",
        last_error=str(exc)[:2000],
        ended_at=timezone.now(),
    )
    if hostcalls.host_unavailable(exc):
        return errors.Unavailable(f"Sandbox {sandbox.pk} failed to start: {exc}", code="host_unavailable")
    return errors.Unavailable(f"Sandbox {sandbox.pk} failed to start: {exc}", code="sandbox_start_failed")


def sandbox_create(*, user: User, spec: CreateSpec) -> tuple[Sandbox, Session]:
    """Create a sandbox and block until its data plane is usable.

    `snapshot_id`, or a template string that names no template but a checkpoint, creates
    from that checkpoint (`sandbox_restore`)."""
    if spec.snapshot_id is not None:
        checkpoint = checkpoint_for_create(user=user, team_slug=spec.team, selector=str(spec.snapshot_id))
        if checkpoint is None:
            raise errors.Invalid(f"Snapshot '{spec.snapshot_id}' not found.", code="template_not_found")
        return sandbox_restore(user=user, checkpoint=checkpoint, spec=spec)
    team = team_for_write(user=user, slug=spec.team)
    try:
        version = _resolve_version(team, spec)
    except errors.Invalid as exc:
        # Spec 6.4: a template string that names no template may name a checkpoint.
        if exc.code != "template_not_found" or spec.template_version_id is not None or not spec.template:
            raise
        checkpoint = checkpoint_for_create(user=user, team_slug=spec.team, selector=spec.template)
        if checkpoint is None:
            raise
        return sandbox_restore(user=user, checkpoint=checkpoint, spec=spec)
    # The template's own env (build_spec.env) is the default; the request's wins.
    env_vars = {**version.build_env(), **spec.env_vars}
    return _launch(user=user, team=team, version=version, spec=dataclasses.replace(spec, env_vars=env_vars))


def _launch(
    *,
    user: User,
    team: Team,
    version: TemplateVersion,
    spec: CreateSpec,
    checkpoint: Checkpoint | None = None,
) -> tuple[Sandbox, Session]:
    """Reserve, start (from the template's memory snapshot, or on a copy of the
    checkpoint's disk), mount the volumes; `ready` with a session, or `failed` and no VM."""
    volumes = volumes_for_mounts(user=user, team=team, mounts=spec.volume_mounts)
    if spec.mcp is not None:
        mcp.mcp_template_check(version)
    sandbox = _reserve(
        team=team, user=user, version=version, spec=spec, volumes=volumes, checkpoint=checkpoint
    )
    attachments = [
        Attachment(unit=unit, image=volume.image_path, path=mount.path)
        for unit, (mount, volume) in enumerate(zip(spec.volume_mounts, volumes, strict=True))
    ]
    try:
        wait_for_detached_operations(volumes)
        started = vm.start(
            sandbox,
            version,
            env_vars=spec.env_vars,
            attachments=attachments,
            checkpoint=checkpoint,
        )
        client = vm.agent_client_of(started, sandbox)
        mcp.mcp_after_start(sandbox, client, mcp=spec.mcp, checkpoint=checkpoint)
    except Exception as exc:  # any runtime failure: no VM left behind, row marked failed
        failure = _fail_start(sandbox, exc)
        if isinstance(exc, MountRefused):  # the request's fault, found only in the guest
            raise errors.Invalid(f"volume_mounts: {exc}", code="invalid_path") from exc
        if isinstance(exc, mcp.McpFailed):  # a server of the request's `mcp` did not start
            raise exc
        sandbox.refresh_from_db(fields=["state"])
        if sandbox.state == S.DESTROYED:  # destroyed while starting: that, not a failure
            raise sandbox_gone(sandbox.pk) from exc
        raise failure from exc
    now = timezone.now()
    if not sandbox_transition(
        sandbox=sandbox,
        from_states=[S.CREATING, S.RESTORING],
        to_state=S.READY,
        reason="started" if checkpoint is None else "restored",
        started_at=now,
        ready_at=now,
        deadline_at=now + timedelta(seconds=sandbox.timeout),
        agent_port=started.agent_port,
        agent_secret_encrypted=crypto.encrypt_text(started.agent_secret),
    ):
        vm.destroy(sandbox)  # destroyed while we were starting it
        raise state_conflict(sandbox, "start")
    return sandbox, session_mint(sandbox=sandbox)


# --- restore (a checkpoint into a new sandbox) ----------------------------------------------

NETWORK_KEYS = frozenset(
    {
        "allow_internet_access",
        "allow_package_registry_access",
        "allow_public_traffic",
        "allow_out",
        "deny_out",
        "egress_profile",
        "egress_profiles",
        "rules",
        "mask_request_host",
        "network_class",
        "network_policy",
    }
)


def checkpoint_wait_ready(checkpoint: Checkpoint, *, wait: float | None = None) -> Checkpoint:
    """The checkpoint once its capture has finished: 409 `checkpoint_not_ready` if it has
    not within `wait` (default WATASU_CHECKPOINT_WAIT_SECONDS), 422 `checkpoint_failed`
    if it failed, 409 `checkpoint_missing` if its file is gone."""
    limit = settings.CHECKPOINT_WAIT_SECONDS if wait is None else wait
    deadline = time.monotonic() + limit
    while checkpoint.status == CheckpointStatus.PENDING and time.monotonic() < deadline:
        time.sleep(0.1)
        if not Checkpoint.objects.filter(pk=checkpoint.pk).exists():
            raise errors.NotFound(f"Checkpoint {checkpoint.pk} not found.", code="checkpoint_not_found")
        checkpoint.refresh_from_db()
    if checkpoint.status == CheckpointStatus.PENDING:
        raise errors.Conflict(
            f"Checkpoint {checkpoint.pk} is still being captured; try again shortly.",
            code="checkpoint_not_ready",
        )
    if checkpoint.status == CheckpointStatus.FAILED:
        raise errors.Invalid(
            f"Checkpoint {checkpoint.pk} failed and cannot be restored: {checkpoint.error}",
            code="checkpoint_failed",
        )
    if checkpoint.local_state != "present":
        raise errors.Conflict(
            f"The disk of checkpoint {checkpoint.pk} is missing from host {checkpoint.host.name}.",
            code="checkpoint_missing",
        )
    return checkpoint


def restore_spec(checkpoint: Checkpoint, spec: CreateSpec | None) -> CreateSpec:
    """What a sandbox restored from `checkpoint` asks for: the source's shape (as
    captured), lifecycle, network policy, env and metadata, then whatever the request
    gave (`spec.given`): metadata and env merged over the source's, the rest replacing it.
    Volumes are never inherited (the source may still hold them): only the request's."""
    source = checkpoint.sandbox
    given = spec.given if spec is not None else frozenset()
    spec = spec or CreateSpec(timeout=source.timeout)
    source_env = crypto.decrypt_json(source.env_vars_encrypted) if source.env_vars_encrypted else {}
    if checkpoint.include_memory and (
        (spec.cpu_count or checkpoint.cpu_count, spec.memory_mb or checkpoint.memory_mb)
        != (checkpoint.cpu_count, checkpoint.memory_mb)
    ):
        message = (
            f"Checkpoint {checkpoint.pk} holds memory and restores at its own shape "
            f"({checkpoint.cpu_count} vCPU, {checkpoint.memory_mb} MB)."
        )
        raise errors.Invalid(message, code="invalid_resources", errors=[message])
    lifecycle = spec.lifecycle
    if not given & {"lifecycle", "auto_pause"}:
        lifecycle = Lifecycle(on_timeout=source.on_timeout, auto_resume=source.auto_resume)
    return dataclasses.replace(
        spec,
        team=checkpoint.team.slug,
        cpu_count=spec.cpu_count or checkpoint.cpu_count,
        memory_mb=spec.memory_mb or checkpoint.memory_mb,
        timeout=spec.timeout if "timeout" in given else source.timeout,
        lifecycle=lifecycle,
        env_vars={**source_env, **spec.env_vars},
        metadata={**source.metadata, **spec.metadata},
        network_policy=spec.network_policy if given & NETWORK_KEYS else dict(source.network_policy),
        network_rules=spec.network_rules if given & NETWORK_KEYS else network.rule_headers(source),
    )


def sandbox_restore(
    *, user: User, checkpoint: Checkpoint, spec: CreateSpec | None = None
) -> tuple[Sandbox, Session]:
    """A new sandbox on a copy of the checkpoint's disk, in the checkpoint's team (the
    source is untouched); blocks until usable, as a create does. Quota and placement are a
    create's; the sandbox runs on the checkpoint's host."""
    team = team_for_write(user=user, slug=checkpoint.team.slug)
    checkpoint = checkpoint_wait_ready(checkpoint)
    host_disk_check(host=checkpoint.host, needed_bytes=checkpoint.size_bytes, what="a copy of its disk")
    version = checkpoint.template_version
    if not version.artifact_dir:
        raise errors.Conflict(
            f"The template files checkpoint {checkpoint.pk} builds on are gone.", code="checkpoint_missing"
        )
    return _launch(
        user=user, team=team, version=version, spec=restore_spec(checkpoint, spec), checkpoint=checkpoint
    )


# --- pause / resume -------------------------------------------------------------------


def _runtime_step(
    sandbox: Sandbox, step: Callable[[Sandbox], None], *, what: str, during: str, back_to: str
) -> None:
    """Run a VM operation; on failure put the sandbox back where it was and answer 503.

    The VM operations used here leave the VM as it was when they fail (a failed
    managed save keeps it running, a failed start keeps the saved memory).
    """
    try:
        step(sandbox)
    except Exception as exc:
        away = hostcalls.host_unavailable(exc)  # its host did not answer: the sandbox is not at fault
        logger.exception("sandbox %s failed to %s", sandbox.pk, what)
        sandbox_transition(
            sandbox=sandbox,
            from_states=[during],
            to_state=back_to,
            reason=f"{what} failed" + ("; its host did not answer" if away else ""),
            last_error=sandbox.last_error if away else str(exc)[:2000],
        )
        code = "host_unavailable" if away else "service_unavailable"
        raise errors.Unavailable(f"Sandbox {sandbox.pk} could not {what}: {exc}", code=code) from exc


def sandbox_pause(
    *, sandbox: Sandbox, reason: str = "pause", due_by: datetime | None = None, to_disk: bool = False
) -> Sandbox:
    """Release the runtime, keeping memory and disk: suspended in host memory first (a
    resume takes milliseconds; `sandboxes.pool` saves it to disk later), or straight to disk
    (libvirt managed save) with ``to_disk``, past the team's cap of in-memory pauses, or on a
    host short of memory.

    With `due_by` (the deadline sweep) the pause happens only if the deadline is still
    at or before it when the row is claimed: a timeout extended meanwhile wins.
    """
    where = Q(deadline_at__lte=due_by) if due_by is not None else None
    if not sandbox_transition(
        sandbox=sandbox, from_states=[S.READY], to_state=S.STOPPING, reason=reason, where=where
    ):
        raise state_conflict(sandbox, "pause")
    in_memory = not to_disk and pool.pause_in_memory_allowed(sandbox)

    def step(sandbox: Sandbox) -> None:
        vm.pause(sandbox, in_memory=in_memory)

    _runtime_step(sandbox, step, what="pause", during=S.STOPPING, back_to=S.READY)
    if not sandbox_transition(
        sandbox=sandbox,
        from_states=[S.STOPPING],
        to_state=S.STOPPED,
        reason=f"{reason} (in memory)" if in_memory else reason,
        paused_in_memory=in_memory,
        paused_at=timezone.now(),
        memory_lost=False,
    ):
        vm.destroy(sandbox)  # destroyed while pausing
    return sandbox


def _wait_while_busy(sandbox: Sandbox, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sandbox.state in BUSY_STATES and time.monotonic() < deadline:
        time.sleep(0.1)
        sandbox.refresh_from_db()


def _claim_resume(sandbox: Sandbox) -> bool:
    """STOPPED -> RESTORING after the quota and host-capacity checks, under locks."""
    with transaction.atomic():
        _lock_team(sandbox.team)
        team_require_active(sandbox.team)
        _quota_check(sandbox.team, sandbox.cpu_count, sandbox.memory_mb)
        host = sandbox.placed_host
        if host.state == HostState.DOWN:
            raise hostcalls.unavailable(host, f"is down; sandbox {sandbox.pk} is kept there")
        sandbox.refresh_from_db(fields=["paused_in_memory"])
        held = sandbox.paused_in_memory  # its memory is counted already
        if not host_has_room(host=host, cpu=sandbox.cpu_count, memory_mb=0 if held else sandbox.memory_mb):
            message = f"Host {host.name} has no room to resume sandbox {sandbox.pk} now."
            raise errors.Unavailable(message, code="sandbox_overloaded", reason={"message": message})
        return sandbox_transition(
            sandbox=sandbox, from_states=[S.STOPPED], to_state=S.RESTORING, reason="resume"
        )


def _resume_failed(sandbox: Sandbox, exc: Exception) -> errors.DomainError:
    """After a failed resume the row must say what the VM is: its memory saved again
    (`stopped`, resumable), or nothing usable left (`lost`, VM removed, disk kept)."""
    logger.exception("sandbox %s failed to resume", sandbox.pk)
    if hostcalls.host_unavailable(exc):  # nothing known of its VM: kept as it was, never lost
        sandbox_transition(
            sandbox=sandbox,
            from_states=[S.RESTORING],
            to_state=S.STOPPED,
            reason="resume failed; its host did not answer",
            last_error=str(exc)[:2000],
        )
        return exc if isinstance(exc, errors.DomainError) else errors.Unavailable(str(exc))
    status = "unknown"
    try:
        status = vm.status(sandbox)
        if status == "running":  # started, but the agent never answered: save it again
            vm.pause(sandbox)
            status = vm.status(sandbox)
    except Exception:
        logger.exception("sandbox %s: could not save the VM again after a failed resume", sandbox.pk)
    message = f"Sandbox {sandbox.pk} could not resume: {exc}"
    if status == "suspended":
        sandbox_transition(
            sandbox=sandbox,
            from_states=[S.RESTORING],
            to_state=S.STOPPED,
            reason="resume failed; memory still held",
            last_error=str(exc)[:2000],
            paused_in_memory=True,
        )
        return errors.Unavailable(message)
    if status == "saved":
        sandbox_transition(
            sandbox=sandbox,
            from_states=[S.RESTORING],
            to_state=S.STOPPED,
            reason="resume failed; memory saved again",
            last_error=str(exc)[:2000],
        )
        return errors.Unavailable(message)
    if sandbox_transition(
        sandbox=sandbox,
        from_states=[S.RESTORING],
        to_state=S.LOST,
        reason="resume failed; the VM is not usable",
        ended_at=timezone.now(),
        agent_port=None,
        last_error=str(exc)[:2000],
    ):
        vm.forget(sandbox)
        volumes_release(sandbox_ids=[sandbox.pk])  # its VM is gone, its disk kept
    return errors.Unavailable(message, code="sandbox_lost")


def _restart(sandbox: Sandbox, timeout: int) -> None:
    try:
        rebooted = vm.resume(sandbox)
    except Exception as exc:
        raise _resume_failed(sandbox, exc) from exc
    now = timezone.now()
    agent: dict[str, Any] = {}  # booted on its disk: a new agent, at a new port
    if rebooted is not None:
        agent = {
            "agent_port": rebooted.agent_port,
            "agent_secret_encrypted": crypto.encrypt_text(rebooted.agent_secret),
        }
    if not sandbox_transition(
        sandbox=sandbox,
        from_states=[S.RESTORING],
        to_state=S.READY,
        reason="resumed" if rebooted is None else "resumed on its disk (its memory was lost with its host)",
        ready_at=now,
        deadline_at=now + timedelta(seconds=timeout),
        paused_in_memory=False,
        memory_lost=False,
        **agent,
    ):
        vm.destroy(sandbox)
        raise state_conflict(sandbox, "resume")


def sandbox_resume(
    *, sandbox: Sandbox, timeout: int | None = None, wait: float = BUSY_WAIT_SECONDS
) -> tuple[Sandbox, Session]:
    """Make the sandbox ready (restarting a paused one) and mint a fresh session.

    Waits for an unfinished create/pause/restore first. A paused sandbox's deadline
    becomes now + `timeout` (or its own timeout, the last `set_timeout`); a running
    one's becomes max(current deadline, that): resume and connect only extend.
    """
    team_require_active(sandbox.team)  # a suspended team's sandboxes are paused, and stay so
    _wait_while_busy(sandbox, wait)
    lifetime = timeout or sandbox.timeout
    if sandbox.state == S.STOPPED:
        if not _claim_resume(sandbox):  # another request is resuming it: wait for that one
            sandbox.refresh_from_db()
            return sandbox_resume(sandbox=sandbox, timeout=timeout, wait=wait)
        _restart(sandbox, lifetime)
    elif sandbox.state == S.READY:
        # Connecting never shortens a running sandbox's life: an SDK `connect()` sends the
        # create default (300 s) and would otherwise undo a longer `set_timeout`.
        wanted = Value(timezone.now() + timedelta(seconds=lifetime))
        if not Sandbox.objects.filter(pk=sandbox.pk, state=S.READY).update(
            deadline_at=Greatest(Coalesce("deadline_at", wanted), wanted), updated_at=timezone.now()
        ):
            raise state_conflict(sandbox, "resume")  # paused or expired since we looked
        sandbox.refresh_from_db()
    if sandbox.state != S.READY:
        raise state_conflict(sandbox, "resume")
    return sandbox, session_mint(sandbox=sandbox)


# --- timeout / destroy ----------------------------------------------------------------


def sandbox_set_timeout(*, sandbox: Sandbox, timeout: int) -> Sandbox:
    """Running: deadline = now + timeout (shorter or longer). Paused: the lifetime at the
    next resume. Either way `timeout` shows the last value set.

    One conditional update on the state read; if the state moved meanwhile (the
    deadline sweep expired or paused it), nothing changes and the caller hears why.
    """
    rows = Sandbox.objects.filter(pk=sandbox.pk)
    if sandbox.state in RUNTIME_STATES:
        changed = rows.filter(state__in=RUNTIME_STATES).update(
            deadline_at=timezone.now() + timedelta(seconds=timeout),
            timeout=timeout,
            updated_at=timezone.now(),
        )
    elif sandbox.state == S.STOPPED:
        changed = rows.filter(state=S.STOPPED).update(timeout=timeout, updated_at=timezone.now())
    else:
        changed = 0
    if not changed:
        raise state_conflict(sandbox, "change its timeout")
    sandbox.refresh_from_db()
    return sandbox


NETWORK_LIVE_STATES = (S.CREATING, S.RESTORING, S.READY, S.CHECKPOINTING)


def sandbox_set_network(
    *, sandbox: Sandbox, policy: dict[str, Any], headers: dict[str, dict[str, str]]
) -> Sandbox:
    """Replace the sandbox's network policy (atomically) and enforce it: at once on a
    running sandbox (without restarting it; its open connections carry on), at the next
    resume on a paused one. If the host cannot apply it now, the new policy stays recorded,
    shown as not yet in force, and a worker applies it (`sandboxes.tasks.network_apply`)."""
    if sandbox.state not in (*NETWORK_LIVE_STATES, S.STOPPED, S.STOPPING):
        raise state_conflict(sandbox, "change its network policy")
    changed = Sandbox.objects.filter(
        pk=sandbox.pk, state__in=(*NETWORK_LIVE_STATES, S.STOPPED, S.STOPPING)
    ).update(
        network_policy=policy,
        network_rules_encrypted=crypto.encrypt_json(headers) if headers else "",
        network_class=policy["network_class"],
        network_revision=F("network_revision") + 1,
        updated_at=timezone.now(),
    )
    if not changed:
        raise state_conflict(sandbox, "change its network policy")
    sandbox.refresh_from_db()
    if sandbox.state in NETWORK_LIVE_STATES and vm.qemu_uid(sandbox) is not None:
        try:
            network.apply(sandbox)
        except Exception:
            logger.warning("sandbox %s: network policy not applied now; queued", sandbox.pk, exc_info=True)
            from sandboxes.tasks import network_apply

            network_apply.apply_async(args=[sandbox.pk], countdown=1)
    return sandbox


def sandbox_network_retry(sandbox_id: int) -> bool:
    """Apply a recorded policy not yet in force (the worker's half of `sandbox_set_network`).
    True once in force or no longer needed."""
    sandbox = Sandbox.objects.filter(pk=sandbox_id).first()
    if sandbox is None or sandbox.state not in NETWORK_LIVE_STATES:
        return True
    if sandbox.network_applied_revision == sandbox.network_revision:
        return True
    network.apply(sandbox)
    return True


def sandbox_destroy(*, sandbox: Sandbox, reason: str = "destroy") -> Sandbox:
    """Destroy from any state; idempotent. Revokes every session token. A running sandbox
    holding volumes leaves them clean first (the next sandbox to mount them sees everything)."""
    live = [state for state in S.values if state != S.DESTROYED]
    freeze_volumes = vm.volume_freezer(sandbox)
    if sandbox_transition(
        sandbox=sandbox,
        from_states=live,
        to_state=S.DESTROYED,
        reason=reason,
        ended_at=Coalesce(F("ended_at"), timezone.now()),
        session_epoch=F("session_epoch") + 1,
        agent_port=None,
        agent_secret_encrypted="",
    ):
        freeze_volumes()
        sandbox_purge(sandbox)
    return sandbox


def sandbox_purge(sandbox: Sandbox) -> bool:
    """Remove the VM, saved memory and disk; record it (purged_at) if the runtime agreed."""
    return sandboxes_purge([sandbox]) == 1


def sandboxes_purge(sandboxes: Iterable[Sandbox]) -> int:
    """`sandbox_purge` for many: one VM removal each, one update for all that went."""
    purged = [sandbox.pk for sandbox in sandboxes if vm.destroy(sandbox)]
    now = timezone.now()
    with transaction.atomic():
        Sandbox.objects.filter(pk__in=purged).update(purged_at=now)
        metering.sandboxes_purged(ids=purged, at=now)
    volumes_release(sandbox_ids=purged)  # their VMs are gone: the volumes are free
    return len(purged)


# --- many at once (the sweeps) -------------------------------------------------------------


def sandboxes_transition(
    *,
    ids: Iterable[int],
    from_states: Iterable[str],
    to_state: str,
    reason: str,
    unchanged_since: datetime | None = None,
    where: Q | None = None,
    **fields: Any,
) -> list[Sandbox]:
    """`sandbox_transition` for a batch in one transaction: rows still in ``from_states``
    (and, with ``unchanged_since``, not updated since then; and matching ``where``) move;
    the others are left.

    Rows another transaction holds are skipped, not waited for. Returns the moved rows.
    """
    now = timezone.now()
    ids = list(ids)
    disk = _kept_disk_bytes(Sandbox.objects.filter(pk__in=ids).select_related("host"), to_state)
    with transaction.atomic():
        rows = Sandbox.objects.select_for_update(skip_locked=True).filter(
            pk__in=ids, state__in=list(from_states)
        )
        if unchanged_since is not None:
            rows = rows.filter(updated_at__lt=unchanged_since)
        moved = list(rows.filter(where or Q()).values_list("pk", "state"))
        if not moved:
            return []
        Sandbox.objects.filter(pk__in=[pk for pk, _ in moved]).update(
            state=to_state, updated_at=now, **fields
        )
        SandboxEvent.objects.bulk_create(
            SandboxEvent(sandbox_id=pk, from_state=state, to_state=to_state, at=now, reason=reason[:200])
            for pk, state in moved
        )
        metering.sandboxes_moved(moves=moved, to_state=to_state, at=now, disk_bytes=disk)
    return list(Sandbox.objects.filter(pk__in=[pk for pk, _ in moved]).select_related("host"))


def sandboxes_expire(*, ids: Iterable[int], now: datetime) -> list[Sandbox]:
    """Deadline passed with on_timeout kill: `expired`, sessions revoked, VM and disk removed.

    The deadline is checked again inside the transition: a `set_timeout` that landed
    after the sweep selected the row keeps the sandbox alive. Sandboxes holding volumes
    leave them clean before their VMs go.
    """
    ids = list(ids)
    holding = Sandbox.objects.filter(pk__in=ids, state=S.READY, deadline_at__lte=now).exclude(
        volume_mounts=[]
    )
    freezers = {sandbox.pk: vm.volume_freezer(sandbox) for sandbox in holding}
    expired = sandboxes_transition(
        ids=ids,
        from_states=[S.READY],
        to_state=S.EXPIRED,
        reason="timeout",
        ended_at=now,
        where=Q(deadline_at__lte=now),
        session_epoch=F("session_epoch") + 1,
        agent_port=None,
        agent_secret_encrypted="",
    )
    for sandbox in expired:
        freezers.get(sandbox.pk, lambda: None)()
    sandboxes_purge(expired)
    return expired

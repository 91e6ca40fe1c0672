"""Checkpoints (the API's "snapshots"): capture a running sandbox's disk, delete, retention.

A capture moves the sandbox `ready` -> `checkpointing` -> `ready` around the copy (its
data plane keeps working), under the team lock that also counts the team's checkpoints
against WATASU_CHECKPOINT_MAX_PER_TEAM and _MAX_TOTAL_GIB. The checkpoint row is `pending`
until the artifact is complete, then `ready`; a capture that fails leaves nothing (its
answer says why), one whose process died is `failed` for a while. Restores are lifecycle
operations: `services.sandbox_restore`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing import metering
from billing.models import IntervalKind
from sandboxes import selectors, services
from sandboxes.hostcalls import host_step
from sandboxes.models import Checkpoint, CheckpointStatus, Host, HostState, Sandbox, SandboxState
from sandboxes.placement import host_disk_check
from sandboxes.runtime import vm
from sandboxes.runtime.agent_client import AgentError
from sandboxes.sweeps import old_enough_to_purge
from teams.models import Team, User
from watasu import errors

logger = logging.getLogger(__name__)
S = SandboxState


def _quota_check(team: Team, adding_bytes: int) -> None:
    """422 `checkpoint_quota_exceeded` when the team has its maximum number of checkpoints,
    or their size would pass its maximum (expired and failed ones do not count). The caller
    holds the team lock."""
    held = selectors.checkpoints_live().filter(team=team).exclude(status=CheckpointStatus.FAILED)
    count = held.count()
    limit = settings.CHECKPOINT_MAX_PER_TEAM
    if count >= limit:
        raise errors.Invalid(
            f"Team {team.slug} has {count} checkpoints, its maximum (WATASU_CHECKPOINT_MAX_PER_TEAM "
            f"is {limit}); delete some first.",
            code="checkpoint_quota_exceeded",
        )
    total = held.aggregate(total=Coalesce(Sum("size_bytes"), 0))["total"]
    limit_bytes = settings.CHECKPOINT_MAX_TOTAL_GIB * 2**30
    if total + adding_bytes > limit_bytes:
        raise errors.Invalid(
            f"Team {team.slug}'s checkpoints take {total / 2**30:.1f} GiB and this one would add about "
            f"{adding_bytes / 2**30:.1f} GiB, past its maximum (WATASU_CHECKPOINT_MAX_TOTAL_GIB is "
            f"{settings.CHECKPOINT_MAX_TOTAL_GIB}); delete some first.",
            code="checkpoint_quota_exceeded",
        )


def checkpoint_create(
    *,
    user: User,
    sandbox: Sandbox,
    name: str = "",
    metadata: dict[str, str] | None = None,
    expires_at: datetime | None = None,
    quiesce_mode: str = "guest",
    include_memory: bool = False,
) -> Checkpoint:
    """Capture the running sandbox's root disk (and its memory with `include_memory`, our
    extension); returns the `ready` checkpoint.

    409 `sandbox_not_running`/`sandbox_busy` unless the sandbox is `ready`; 422
    `checkpoint_quota_exceeded`; 507 when the host's disk is short; 409
    `checkpoint_freeze_failed` when the guest refuses the freeze; 503 `checkpoint_failed`
    when the capture fails otherwise (the sandbox is `ready` again either way).
    """
    version_id = sandbox.template_version_id
    if version_id is None:  # only a row made by hand has none
        raise errors.Conflict(f"Sandbox {sandbox.pk} has no template version to checkpoint against.")
    if include_memory and sandbox.volume_mounts:
        # Its memory has the volumes mounted: a copy would write to filesystems it does not hold.
        raise errors.Invalid(
            f"Sandbox {sandbox.pk} has volumes mounted; a checkpoint with memory cannot hold "
            "them. Take a disk checkpoint (include_memory false).",
            code="checkpoint_memory_with_volumes",
        )
    # What the capture will write: what the sandbox wrote to its disk (and its memory).
    expected = vm.disk_bytes(sandbox) + (sandbox.memory_mb * 2**20 if include_memory else 0)
    with transaction.atomic():
        Team.objects.select_for_update().filter(pk=sandbox.team_id).first()
        if sandbox.state == S.READY:
            _quota_check(sandbox.team, expected)
            host_disk_check(host=sandbox.placed_host, needed_bytes=expected, what="this checkpoint")
        if not services.sandbox_transition(
            sandbox=sandbox, from_states=[S.READY], to_state=S.CHECKPOINTING, reason="checkpoint"
        ):
            raise services.state_conflict(sandbox, "checkpoint")
        checkpoint = Checkpoint.objects.create(
            team_id=sandbox.team_id,
            sandbox=sandbox,
            template_version_id=version_id,
            host=sandbox.placed_host,
            created_by=user,
            name=name,
            metadata=metadata or {},
            quiesce_mode=quiesce_mode,
            include_memory=include_memory,
            agent_secret_encrypted=sandbox.agent_secret_encrypted if include_memory else "",
            cpu_count=sandbox.cpu_count,
            memory_mb=sandbox.memory_mb,
            expires_at=expires_at,
        )
    try:
        size = vm.checkpoint(sandbox, checkpoint)
    except Exception as exc:
        # Nothing is kept of a capture that failed: the answer says why (a failed row is left
        # only by a capture whose process died, for the retention sweep to find).
        _unlink(checkpoint)
        Checkpoint.objects.filter(pk=checkpoint.pk).delete()
        _back_to_ready(sandbox, "checkpoint failed")
        sandbox.refresh_from_db(fields=["state"])
        if sandbox.state == S.DESTROYED:  # destroyed during the capture: that is the answer
            raise services.sandbox_gone(sandbox.pk) from exc
        if isinstance(exc, AgentError) and exc.status == 409:  # the guest refused the freeze
            detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
            raise errors.Conflict(
                f"Sandbox {sandbox.pk}'s guest could not freeze its root filesystem ({detail}): is it "
                "frozen already (fsfreeze -u /)? quiesce_mode crash needs no freeze.",
                code="checkpoint_freeze_failed",
            ) from exc
        logger.exception("checkpoint %s of sandbox %s failed", checkpoint.pk, sandbox.pk)
        raise errors.Unavailable(  # the details (host paths) are in the log, not the answer
            f"The checkpoint of sandbox {sandbox.pk} failed and was not kept; the sandbox runs "
            "on. Try again, or take it in quiesce_mode crash if the guest is not answering.",
            code="checkpoint_failed",
        ) from exc
    _back_to_ready(sandbox, "checkpoint taken")
    if not _mark_ready(checkpoint, size):
        _unlink(checkpoint)  # deleted while it was being captured
        raise errors.NotFound(
            f"Checkpoint {checkpoint.pk} was deleted while it was being captured.",
            code="checkpoint_not_found",
        )
    checkpoint.refresh_from_db()
    return checkpoint


def _mark_ready(checkpoint: Checkpoint, size: int) -> bool:
    """pending -> ready, and its storage billed from now on; False if deleted meanwhile."""
    now = timezone.now()
    with transaction.atomic():
        if not Checkpoint.objects.filter(pk=checkpoint.pk, status=CheckpointStatus.PENDING).update(
            status=CheckpointStatus.READY, size_bytes=size, ready_at=now
        ):
            return False
        metering.interval_open(
            team_id=checkpoint.team_id,
            kind=IntervalKind.CHECKPOINT,
            subject_id=checkpoint.pk,
            at=now,
            size=size,
        )
    return True


def _back_to_ready(sandbox: Sandbox, reason: str) -> None:
    """`checkpointing` -> `ready`; a sandbox destroyed meanwhile stays destroyed."""
    services.sandbox_transition(
        sandbox=sandbox, from_states=[S.CHECKPOINTING], to_state=S.READY, reason=reason
    )


def _unlink(checkpoint: Checkpoint) -> None:
    """Remove the checkpoint's files on its host (the row may be gone: they go by path). A
    host that does not answer keeps them until its retention sweep finds them unowned."""
    try:
        _remove_files(checkpoint.host, [checkpoint.path, checkpoint.memory_path])
    except errors.Unavailable:
        logger.warning(
            "checkpoint %s: its host did not answer; its retention removes the files", checkpoint.pk
        )


@host_step
def _remove_files(host: Host, paths: list[Path]) -> None:
    """Remove checkpoint files of ``host``: only inside its checkpoints directory."""
    home = (Path(host.data_dir) / "checkpoints").resolve()
    outside = [path for path in paths if path.resolve().parent != home]
    if outside:
        raise ValueError(f"refusing to remove {outside}: outside {home}")
    for path in paths:
        path.unlink(missing_ok=True)


def checkpoint_delete(*, checkpoint: Checkpoint) -> bool:
    """Delete the row and, once that is committed, the artifact (its storage is freed at
    once); False when another request deleted it first. A capture still running sees the
    row gone and removes what it wrote."""
    with transaction.atomic():
        deleted, _ = Checkpoint.objects.filter(pk=checkpoint.pk).delete()
        metering.interval_close(kind=IntervalKind.CHECKPOINT, subject_id=checkpoint.pk, at=timezone.now())
        if deleted:
            transaction.on_commit(lambda: _unlink(checkpoint))
    return bool(deleted)


# --- retention (a hook of the retention sweep) ------------------------------------------------


def checkpoints_retention(now: datetime) -> dict[str, int | bool]:
    """Expired checkpoints, failed ones past WATASU_CHECKPOINT_FAILED_RETENTION_SECONDS,
    captures whose process died (pending past the stuck threshold: failed, file removed)
    and artifact files no row owns."""
    batch = settings.SWEEP_BATCH_SIZE
    failed_cutoff = now - timedelta(seconds=settings.CHECKPOINT_FAILED_RETENTION_SECONDS)
    due = Checkpoint.objects.filter(
        Q(expires_at__lte=now) | Q(status=CheckpointStatus.FAILED, created_at__lt=failed_cutoff)
    ).select_related("host")
    removed = 0
    for checkpoint in due.order_by("pk")[:batch]:
        checkpoint_delete(checkpoint=checkpoint)
        removed += 1
    stuck_cutoff = now - timedelta(seconds=settings.SWEEP_STUCK_AFTER_SECONDS)
    interrupted = Checkpoint.objects.filter(
        status=CheckpointStatus.PENDING, created_at__lt=stuck_cutoff
    ).exclude(sandbox__state=S.CHECKPOINTING)
    abandoned = 0
    for checkpoint in interrupted.select_related("host")[:batch]:
        if Checkpoint.objects.filter(pk=checkpoint.pk, status=CheckpointStatus.PENDING).update(
            status=CheckpointStatus.FAILED, error="The process capturing this checkpoint stopped."
        ):
            _unlink(checkpoint)
            abandoned += 1
    orphans = sum(  # None: queued to the host's worker
        _orphan_files(host, now) or 0
        for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING])
    )
    return {
        "checkpoints_removed": removed,
        "checkpoints_abandoned": abandoned,
        "checkpoint_orphan_files": orphans,
        "more": removed == batch,
    }


@host_step(wait=False, expires=int(settings.SWEEP_INTERVAL_SECONDS["retention"]))
def _orphan_files(host: Host, now: datetime) -> int:
    """Files in the host's checkpoint directory that no row owns (a crash between a
    delete's commit and its unlink, a capture's temporary copy)."""
    directory = Path(host.data_dir) / "checkpoints"
    if not directory.is_dir():
        return 0
    pks = Checkpoint.objects.filter(host=host).values_list("pk", flat=True)
    owned = {f"{pk}{suffix}" for pk in pks for suffix in (".qcow2", ".save")}
    removed = 0
    for path in directory.iterdir():
        if path.name in owned or not old_enough_to_purge(path, now.timestamp()):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed

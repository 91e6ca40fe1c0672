"""Writes for volumes: create, delete, claims by sandboxes, detached file operations.

Who may touch an image, and when:

- a volume is held by at most one live sandbox (``Volume.holder``): a create claims it in
  the transaction that makes the sandbox row (``volumes_claim``), and it is released only
  once that sandbox's VM is gone (``volumes_release``, from the purge and the sweep);
- detached operations run under the volume's host-side lock (``_image_lock``) and re-read
  the holder under it, and a start takes the same lock before it hot-plugs the image: an
  operation that began before the claim finishes first, one that begins after sees the
  holder and is a 409 ``volume_attached``;
- the host reads and writes a detached image only through ``volumes.engine`` (e2fsprogs
  in a sandbox as an unprivileged user): the guest wrote it, so it is hostile input.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from billing import metering
from billing.models import IntervalKind
from billing.selectors import team_require_active
from sandboxes.hostcalls import host_step, value_type
from sandboxes.models import Host, HostState, Sandbox, SandboxState
from sandboxes.runtime.images import exclusive
from teams.models import Team, User
from teams.selectors import team_for_write
from volumes import engine
from volumes.models import Volume, VolumeState, VolumeUsage, name_problem
from volumes.mounts import Mount
from watasu import errors

logger = logging.getLogger(__name__)

value_type(engine.Entry)  # what detached operations answer, back from a volume's host

T = TypeVar("T")
GONE_STATES = (SandboxState.EXPIRED, SandboxState.FAILED, SandboxState.LOST, SandboxState.DESTROYED)
# How long a mount waits for a volume another request is creating right now.
CREATING_WAIT_SECONDS = 60.0
# An image file no row owns is removed once it is this old (a create in flight has no row
# for an instant only).
ORPHAN_IMAGE_AGE_SECONDS = 3600


# --- images on the host ------------------------------------------------------------------


def _image_lock(volume: Volume) -> contextlib.AbstractContextManager[None]:
    """The volume's host-side lock: detached operations and attaching exclude each other."""
    return _image_lock_at(volume.image_path)


def _image_lock_at(image: Path) -> contextlib.AbstractContextManager[None]:
    image.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(image.with_suffix(".lock"))


def _local_host() -> Host:
    """This machine's host row (registered by `make run` and the workers at start), read
    without the registration's writes."""
    host = Host.objects.filter(name=settings.RUNTIME_HOST_NAME).first()
    if host is not None:
        return host
    from sandboxes.services import host_register_local

    return host_register_local()


def _home_host() -> Host:
    """Where a new volume's image lives: this machine when it drives its VMs itself (one
    host), else the up host with the most free disk (its worker's last heartbeat). A volume
    stays on its host; sandboxes mounting it are placed there."""
    if settings.RUNTIME_IN_PROCESS and not settings.HOST_WORKER:
        local = Host.objects.filter(name=settings.RUNTIME_HOST_NAME).first()
        if local is not None and not local.queue:
            return local
    candidates = Host.objects.filter(state=HostState.UP).exclude(queue="")
    host = candidates.order_by(F("disk_free_bytes").desc(nulls_last=True), "pk").first()
    if host is None and not settings.RUNTIME_IN_PROCESS:
        raise errors.Unavailable("No host is up to hold a new volume; retry later.", code="host_unavailable")
    return host or _local_host()


def _make_image(volume: Volume) -> Volume:
    """Build the volume's filesystem image (on its host); the row says `ready`, or `failed` and why."""
    made = _make_image_on(volume)
    volume.refresh_from_db()
    return made


@host_step
def _make_image_on(volume: Volume) -> Volume:
    """Build the volume's filesystem image; the row says `ready`, or `failed` and why."""
    try:
        with _image_lock(volume):
            engine.create_image(volume.image_path, volume.size_bytes, label=volume.name[:16])
    except Exception as exc:
        logger.exception("could not make the image of volume %s", volume.pk)
        Volume.objects.filter(pk=volume.pk).update(
            state=VolumeState.FAILED, last_error=str(exc)[:2000], updated_at=timezone.now()
        )
        volume.refresh_from_db()
        raise errors.Unavailable(
            f"Volume {volume.name} could not be created: {exc}", code="volume_create_failed"
        ) from exc
    Volume.objects.filter(pk=volume.pk).update(state=VolumeState.READY, updated_at=timezone.now())
    volume.refresh_from_db()
    return volume


# --- create / delete ----------------------------------------------------------------------


def _quota_check(team: Team, adding: int) -> None:
    """422 `volume_quota_exceeded` when `adding` more volumes would pass the team's limits.
    Callers hold the team row lock."""
    size = settings.VOLUME_SIZE_GIB
    existing = Volume.objects.filter(team=team)
    count = existing.count()
    total_gib = (existing.aggregate(total=Sum("size_bytes"))["total"] or 0) // 2**30
    max_count, max_gib = settings.VOLUME_MAX_PER_TEAM, settings.VOLUME_MAX_TOTAL_GIB
    if count + adding > max_count:
        raise errors.Invalid(
            f"Volume quota exceeded for team {team.slug}: at most {max_count} volumes "
            f"(it has {count}, this adds {adding}).",
            code="volume_quota_exceeded",
        )
    if total_gib + adding * size > max_gib:
        raise errors.Invalid(
            f"Volume quota exceeded for team {team.slug}: at most {max_gib} GiB of volumes "
            f"(it has {total_gib} GiB, this adds {adding * size} GiB).",
            code="volume_quota_exceeded",
        )


def _new_row(team: Team, name: str, metadata: dict[str, str]) -> Volume:
    """The `creating` row, under the team lock with the quota checked; IntegrityError when
    the name is taken (also by a concurrent request)."""
    with transaction.atomic():
        Team.objects.select_for_update().filter(pk=team.pk).first()
        _quota_check(team, 1)
        volume = Volume.objects.create(
            team=team,
            name=name,
            metadata=metadata,
            size_bytes=settings.VOLUME_SIZE_GIB * 2**30,
            host=_home_host(),
        )
        metering.interval_open(
            team_id=team.pk,
            kind=IntervalKind.VOLUME,
            subject_id=volume.pk,
            at=volume.created_at,
            size=volume.size_bytes,
        )
        return volume


def volume_create(
    *, user: User, name: str, team: str | None = None, metadata: dict[str, str] | None = None
) -> Volume:
    """A new volume of the team (409 when the name is taken), its image made before return."""
    owner = team_for_write(user=user, slug=team)
    team_require_active(owner)
    problem = name_problem(name)
    if problem:
        raise errors.Invalid(f"name: {problem}", errors=[f"name: {problem}"])
    try:
        volume = _new_row(owner, name, metadata or {})
    except IntegrityError:
        raise errors.Conflict(
            f"Team {owner.slug} already has a volume named {name}.", code="volume_exists"
        ) from None
    return _make_image(volume)


@host_step
def _remove_image_of(host: Host, image: Path) -> None:
    """Remove a deleted volume's image (on its host)."""
    _remove_image(image)


def volume_delete(*, volume: Volume) -> None:
    """Delete the volume and its image; 409 while a sandbox holds it."""
    with transaction.atomic():
        row = Volume.objects.select_for_update().filter(pk=volume.pk).first()
        if row is None:
            raise errors.NotFound(f"Volume {volume.name} not found.", code="volume_not_found")
        if row.holder_id is not None:
            raise _attached(row, "deleted")
        row.delete()
        metering.interval_close(kind=IntervalKind.VOLUME, subject_id=volume.pk, at=timezone.now())
        # The image goes once the row is surely gone (a rolled-back delete keeps both).
        transaction.on_commit(
            lambda: _remove_image_of.queue(volume.host, volume.image_path)
        )  # not waited for


def _remove_image(image: Path) -> None:
    with _image_lock_at(image):  # an operation that started before waits to finish
        image.unlink(missing_ok=True)
    image.with_suffix(".lock").unlink(missing_ok=True)


def _attached(volume: Volume, action: str) -> errors.Conflict:
    return errors.Conflict(
        f"Volume {volume.name} is attached to sandbox {volume.holder_id}; it cannot be {action} "
        "while that sandbox exists (destroy it first).",
        code="volume_attached",
        sandbox_id=str(volume.holder_id),
    )


# --- mounts: claim and release -------------------------------------------------------------


def _ready(volume: Volume) -> Volume:
    """Wait for a volume another request is creating right now."""
    deadline = time.monotonic() + CREATING_WAIT_SECONDS
    while volume.state == VolumeState.CREATING and time.monotonic() < deadline:
        time.sleep(0.1)
        volume.refresh_from_db()
    if volume.state != VolumeState.READY:
        raise errors.Conflict(
            f"Volume {volume.name} is {volume.state}: {volume.last_error or 'not ready'}.",
            code="volume_not_ready",
        )
    return volume


def volumes_for_mounts(*, user: User, team: Team, mounts: Iterable[Mount]) -> list[Volume]:
    """The team's volume for each mount, in order; an unknown name is created (two creates
    racing for one new name make one volume: the loser reads the winner's). A name only
    another of the user's teams has is a 422, not a new empty volume: the SDK mounts a
    `Volume` object by its name, so that is what mounting another team's volume looks like."""
    found = []
    for mount in mounts:
        volume = Volume.objects.filter(team=team, name=mount.name).select_related("host").first()
        if volume is None:
            elsewhere = Volume.objects.filter(team__memberships__user=user, name=mount.name)
            owner = elsewhere.exclude(team=team).values_list("team__slug", flat=True).first()
            if owner is not None:
                raise errors.Invalid(
                    f"Volume {mount.name} belongs to team {owner}, not {team.slug}: a sandbox mounts "
                    f"volumes of its own team (create it with team={owner!r}).",
                    code="volume_in_other_team",
                )
            try:
                volume = _make_image(_new_row(team, mount.name, {}))
            except IntegrityError:
                volume = Volume.objects.select_related("host").get(team=team, name=mount.name)
        release_if_gone(volume)
        found.append(_ready(volume))
    return found


def volumes_claim(*, sandbox: Sandbox, volumes: Iterable[Volume]) -> None:
    """Make `sandbox` the holder of each volume, or raise 409 `volume_in_use` naming the
    holder. Runs inside the transaction that creates the sandbox row."""
    for volume in volumes:
        claimed = Volume.objects.filter(pk=volume.pk, holder__isnull=True, state=VolumeState.READY).update(
            holder=sandbox, updated_at=timezone.now()
        )
        if claimed:
            continue
        current = Volume.objects.filter(pk=volume.pk).first()
        if current is None:
            raise errors.NotFound(f"Volume {volume.name} was deleted.", code="volume_not_found")
        if current.holder_id is not None:
            raise errors.Conflict(
                f"Volume {volume.name} is in use by sandbox {current.holder_id}; a volume is "
                "mounted by one live sandbox at a time.",
                code="volume_in_use",
                sandbox_id=str(current.holder_id),
            )
        raise errors.Conflict(f"Volume {volume.name} is {current.state}.", code="volume_not_ready")


def wait_for_detached_operations(volumes: Iterable[Volume]) -> None:
    """Before hot-plugging: let a detached operation that began before the claim finish."""
    for volume in volumes:
        _wait_detached(volume)


@host_step
def _wait_detached(volume: Volume) -> None:
    with _image_lock(volume):
        pass


@host_step
def _give_back(volume: Volume) -> None:
    """The image back to the tools user (on its host) once no VM has it."""
    with contextlib.suppress(FileNotFoundError):
        engine.give_to_tools(volume.image_path)


def volumes_release(*, sandbox_ids: Iterable[int]) -> int:
    """The VMs of these sandboxes are gone: their volumes are free again, their images
    handed back to the tools user. Returns how many were released."""
    ids = list(sandbox_ids)
    held = list(Volume.objects.filter(holder_id__in=ids).select_related("host"))
    for volume in held:
        try:
            _give_back(volume)
        except errors.Unavailable:  # its host is away: the next mount there hands it over again
            logger.warning("volume %s: its host did not take the image back now", volume.pk)
    return Volume.objects.filter(pk__in=[v.pk for v in held], holder_id__in=ids).update(
        holder=None, updated_at=timezone.now()
    )


def release_if_gone(volume: Volume) -> bool:
    """Release a volume whose holder ended and whose VM is no longer on the host (a failed
    purge or a lost sandbox leaves it held until then)."""
    if volume.holder_id is None:
        return False
    holder = Sandbox.objects.select_related("host").filter(pk=volume.holder_id).first()
    if holder is None or holder.state not in GONE_STATES:
        return False
    from sandboxes.runtime import vm

    try:
        status = vm.status(holder)
    except Exception:
        logger.warning("volume %s: could not check the VM of sandbox %s", volume.pk, holder.pk, exc_info=True)
        return False
    if status != "absent":
        return False
    released = volumes_release(sandbox_ids=[holder.pk]) > 0
    volume.refresh_from_db()
    return released


# --- detached file operations -------------------------------------------------------------


def _engine_error(exc: engine.EngineError) -> errors.DomainError:
    """The engine's error as the API's: its status picks the class, its code is kept."""
    by_status: dict[int, type[errors.DomainError]] = {
        404: errors.NotFound,
        409: errors.Conflict,
        413: errors.TooLarge,
        422: errors.Invalid,
        507: errors.InsufficientStorage,
        502: errors.BadGateway,
    }
    kind = by_status.get(exc.status, errors.BadGateway)
    return kind(str(exc.message), code=exc.code)


# What a detached operation may run on an image (by name: the operation travels to the
# volume's host as its name and arguments).
OPERATIONS: dict[str, Callable[..., Any]] = {
    op.__name__: op
    for op in (
        engine.stat,
        engine.set_metadata,
        engine.remove,
        engine.list_dir,
        engine.make_dir,
        engine.read_file,
        engine.write_file,
        engine.usage,
    )
}


def detached(
    volume: Volume, operation: Callable[..., T], *args: Any, write: bool = False, **kwargs: Any
) -> T:
    """Run `operation(image, *args, **kwargs)` (one of the engine's OPERATIONS) on the
    volume's image, on its host, while no sandbox holds it (409 `volume_attached`
    otherwise), under the volume's lock. A suspended team reads, never writes."""
    if write:
        team_require_active(volume.team)
    name = operation.__name__
    if OPERATIONS.get(name) is not operation:
        raise ValueError(f"{name} is not a detached operation")
    return _detached_on(volume, name, list(args), kwargs, write)


@host_step
def _detached_on(volume: Volume, name: str, args: list[Any], kwargs: dict[str, Any], write: bool) -> Any:
    operation = OPERATIONS[name]
    with _image_lock(volume):
        current = Volume.objects.filter(pk=volume.pk).values_list("holder_id", "state").first()
        if current is None:
            raise errors.NotFound(f"Volume {volume.name} not found.", code="volume_not_found")
        holder_id, state = current
        if holder_id is not None:
            volume.holder_id = holder_id
            raise _attached(volume, "changed" if write else "read from outside it")
        if state != VolumeState.READY:
            raise errors.Conflict(f"Volume {volume.name} is {state}.", code="volume_not_ready")
        try:
            result = operation(volume.image_path, *args, **kwargs)
        except engine.EngineError as exc:
            raise _engine_error(exc) from exc
        if write:
            Volume.objects.filter(pk=volume.pk).update(updated_at=timezone.now())
        return result


# --- storage accounting ---------------------------------------------------------------------


def volume_measure(volume: Volume, *, now: datetime | None = None) -> VolumeUsage | None:
    """Record what the volume uses: bytes inside the filesystem (read while detached; a
    held volume keeps its last figure) and bytes its sparse image takes on the host (runs
    on the volume's host: the volumes sweep measures each host's volumes there)."""
    now = now or timezone.now()
    try:
        allocated = volume.image_path.stat().st_blocks * 512
    except FileNotFoundError:
        return None
    used = volume.used_bytes
    unchanged = volume.usage_measured_at is not None and volume.updated_at <= volume.usage_measured_at
    if volume.holder_id is None and not unchanged:  # a detached change bumps updated_at
        with contextlib.suppress(errors.DomainError):
            used = detached(volume, engine.usage)[0]
    Volume.objects.filter(pk=volume.pk).update(
        used_bytes=used, allocated_bytes=allocated, usage_measured_at=now
    )
    return VolumeUsage.objects.create(
        volume=volume,
        team_id=volume.team_id,
        volume_name=volume.name,
        size_bytes=volume.size_bytes,
        used_bytes=used,
        allocated_bytes=allocated,
        at=now,
    )


def volumes_sweep(*, now: datetime | None = None) -> dict[str, Any]:
    """Release volumes whose holders are gone, and measure every ready volume of this host."""
    now = now or timezone.now()
    released = 0
    stale = Volume.objects.filter(holder__state__in=GONE_STATES).select_related("host")
    for volume in stale[:200]:
        released += int(release_if_gone(volume))
    hosts: dict[str, Any] = {}
    for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING]):
        hosts[host.name] = volumes_host_sweep(host, now) or "queued to its worker"
    measured = sum(part.get("measured", 0) for part in hosts.values() if isinstance(part, dict))
    return {"released": released, "measured": measured, "hosts": hosts}


@host_step(wait=False, expires=int(settings.SWEEP_INTERVAL_SECONDS["volumes"]))
def volumes_host_sweep(host: Host, now: datetime) -> dict[str, int]:
    """One host's part: measure its ready volumes, remove image files no row owns."""
    measured = 0
    for volume in Volume.objects.filter(Q(state=VolumeState.READY), host=host).select_related("host"):
        measured += int(volume_measure(volume, now=now) is not None)
    return {"measured": measured, "orphan_images": _remove_orphan_images(host, now)}


def _remove_orphan_images(host: Host, now: datetime) -> int:
    """Image files of this host no volume row owns (a create whose transaction rolled back,
    a delete that crashed before the file went), once an hour old."""
    directory = Path(host.data_dir) / "volumes"
    if not directory.is_dir():
        return 0
    owned = {f"{pk}.img" for pk in Volume.objects.filter(host=host).values_list("pk", flat=True)}
    removed = 0
    for image in directory.glob("*.img"):
        with contextlib.suppress(FileNotFoundError):
            if image.name in owned or now.timestamp() - image.stat().st_mtime < ORPHAN_IMAGE_AGE_SECONDS:
                continue
            _remove_image(image)
            removed += 1
    return removed

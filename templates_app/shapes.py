"""Memory snapshots of a template version in shapes other than its baseline.

A memory image cannot change vCPUs or RAM, so without these a sandbox asking for another
shape than its version's snapshot cold-boots (~6 s under TCG) every time. The first create
of such a shape still cold-boots and queues the make of the shape's snapshot (a Celery task
on the `builds` queue): the version's snapshot disk is booted once in that shape, the
template's start command and ready check run as in its build, and the memory is saved under
``<artifact_dir>/shapes/<cpu>x<memory>/``. Later creates of the shape restore it
(``vm.snapshot_for``). Provider versions also get ``WATASU_SNAPSHOT_SHAPES`` once ready.

Everything lives in the version's artifact directory on the host that owns it, so the
version's files go with it and no row needs migrating. Per shape:

- ``<shape>/``: the snapshot, built in ``<shape>.tmp/`` and renamed, so whole or absent;
- ``<shape>.lock``: held (``flock``) by the one make running; the kernel lets go of it when
  its worker dies, which is how a later need tells a dead make from a running one;
- ``<shape>.json``: queued/started times, failed attempts, when the next may start, the
  last error. ``state.lock`` serialises the short read-modify-write of these files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from django.conf import settings

from sandboxes.runtime import driver_for, lifecycle
from sandboxes.runtime.buildvm import make_template_snapshot
from sandboxes.runtime.driver import MemorySnapshot
from templates_app.builds.ready import start_and_wait_ready
from templates_app.models import TemplateVersion, VersionStatus
from watasu.locks import try_flock

logger = logging.getLogger(__name__)

SHAPES_DIR = "shapes"
# A shape whose make failed this many times is not tried again (its sandboxes cold-boot);
# between failures the wait doubles from BACKOFF_SECONDS.
MAX_ATTEMPTS = 5
BACKOFF_SECONDS = 30.0
# A make queued this long ago that never started (its message was lost) is queued again.
QUEUED_STALE_SECONDS = 2 * 3600.0


@dataclass
class ShapeState:
    """Where one shape's make stands (``<shape>.json``); all times are epoch seconds."""

    queued_at: float | None = None
    started_at: float | None = None
    attempts: int = 0  # failed makes since the last success
    next_attempt_at: float = 0.0
    last_error: str = ""


def shape_name(cpu: int, memory_mb: int) -> str:
    return f"{cpu}x{memory_mb}"


def shapes_dir(version: TemplateVersion) -> Path:
    return Path(version.artifact_dir) / SHAPES_DIR


def vm_name(version_id: int, cpu: int, memory_mb: int) -> str:
    """The VM a make boots (reconciliation keeps it while its make runs)."""
    return f"{settings.RUNTIME_VM_PREFIX}shape-{version_id}-{shape_name(cpu, memory_mb)}"


def made(version: TemplateVersion, cpu: int, memory_mb: int) -> MemorySnapshot | None:
    """The shape's snapshot when it is complete on disk, else None."""
    try:
        snapshot = lifecycle.load_template_snapshot(shapes_dir(version) / shape_name(cpu, memory_mb))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    whole = snapshot.save_path.is_file() and snapshot.disk_path.is_file()
    return snapshot if whole and (snapshot.vcpus, snapshot.memory_mb) == (cpu, memory_mb) else None


def state(version: TemplateVersion, cpu: int, memory_mb: int) -> ShapeState:
    return _read(shapes_dir(version), shape_name(cpu, memory_mb))


def request(
    version: TemplateVersion, cpu: int, memory_mb: int, *, declared: bool = False, now: float | None = None
) -> bool:
    """Queue the make of the shape's snapshot unless one is queued or running, it failed
    lately (backing off) or too often, or the version already has WATASU_SNAPSHOT_SHAPES_MAX
    shapes (``declared`` shapes, the operator's, are not counted against it). Never raises:
    a shape without a snapshot only means a cold boot. Returns whether it queued one."""
    when = time.time() if now is None else now
    try:
        return _request(version, cpu, memory_mb, declared=declared, now=when)
    except Exception:
        logger.exception("version %s: the %s snapshot was not queued", version.pk, shape_name(cpu, memory_mb))
        return False


def _request(version: TemplateVersion, cpu: int, memory_mb: int, *, declared: bool, now: float) -> bool:
    if not version.artifact_dir:
        return False
    directory, name = shapes_dir(version), shape_name(cpu, memory_mb)
    directory.mkdir(exist_ok=True)
    with _state_lock(directory):
        current = _read(directory, name)
        if current.started_at is not None and not _making(directory, name):
            logger.warning("version %s: the %s snapshot's make died midway", version.pk, name)
            current = _failed(current, "the make died midway", now, backoff=False)
            _write(directory, name, current)
        queued = current.queued_at is not None and now - current.queued_at < QUEUED_STALE_SECONDS
        if current.started_at is not None or queued:
            return False
        if current.attempts >= MAX_ATTEMPTS or now < current.next_attempt_at:
            return False
        if not declared and len(_taken(directory) - {name}) >= settings.SNAPSHOT_SHAPES_MAX:
            return False
        current.queued_at = now
        _write(directory, name, current)
    if not _send(version.pk, cpu, memory_mb):
        with _state_lock(directory):
            current = _read(directory, name)
            current.queued_at = None
            _write(directory, name, current)
        return False
    return True


def _send(version_id: int, cpu: int, memory_mb: int) -> bool:
    from templates_app.tasks import shape_snapshot_task

    try:
        shape_snapshot_task.delay(version_id, cpu, memory_mb)
    except Exception:  # the broker is down: the next create of the shape asks again
        logger.warning("version %s: the shape make was not queued", version_id, exc_info=True)
        return False
    return True


def request_declared(version: TemplateVersion) -> int:
    """Queue the makes of WATASU_SNAPSHOT_SHAPES for a ready provider version (`base` too);
    returns how many were queued."""
    if version.template.team_id is not None or version.status != VersionStatus.READY:
        return 0
    baseline = (version.cpu, version.memory_mb)
    return sum(
        request(version, cpu, memory_mb, declared=True)
        for cpu, memory_mb in settings.SNAPSHOT_SHAPES
        if (cpu, memory_mb) != baseline and made(version, cpu, memory_mb) is None
    )


def make(version_id: int, cpu: int, memory_mb: int) -> str:
    """Make the shape's snapshot of a ready version, once: ``made``, or why not (``exists``,
    ``busy`` when another make holds it, ``gave_up``, ``failed``, ``gone``). A failure
    leaves no partial snapshot and backs the next try off."""
    version = (
        TemplateVersion.objects.select_related("host", "template")
        .filter(pk=version_id, status=VersionStatus.READY, deleted_at__isnull=True)
        .exclude(artifact_dir="")
        .first()
    )
    if version is None or version.host is None:
        return "gone"
    directory, name = shapes_dir(version), shape_name(cpu, memory_mb)
    directory.mkdir(exist_ok=True)
    with _make_lock(directory, name) as held:
        if not held:
            return "busy"
        with _state_lock(directory):
            current = _read(directory, name)
            if made(version, cpu, memory_mb) is not None:
                _clear(directory, name)
                return "exists"
            if current.attempts >= MAX_ATTEMPTS:
                return "gave_up"
            current.queued_at, current.started_at = None, time.time()
            _write(directory, name, current)
        try:
            _make(version, directory / name, cpu, memory_mb)
        except Exception as exc:
            shutil.rmtree(directory / f"{name}.tmp", ignore_errors=True)
            with _state_lock(directory):
                current = _failed(_read(directory, name), str(exc), time.time(), backoff=True)
                _write(directory, name, current)
            gave_up = current.attempts >= MAX_ATTEMPTS
            logger.warning(
                "version %s: the %s snapshot failed (attempt %s of %s%s): %s",
                version.pk,
                name,
                current.attempts,
                MAX_ATTEMPTS,
                "; its sandboxes keep cold-booting" if gave_up else "",
                exc,
            )
            return "failed"
        with _state_lock(directory):
            _clear(directory, name)
    logger.info("version %s: %s snapshot made", version.pk, name)
    return "made"


def _make(version: TemplateVersion, dest: Path, cpu: int, memory_mb: int) -> None:
    """Boot the version's snapshot disk in the shape, run what its build ran before saving
    (start command, ready check, with the build env), save its memory into ``dest``."""
    from sandboxes.runtime.vm import _image_of  # vm imports this module

    assert version.host is not None
    baseline = lifecycle.load_template_snapshot(version.artifact_dir)
    prepare = start_and_wait_ready(
        version.build_spec, version.build_env(), _ShapeLog(version.pk, shape_name(cpu, memory_mb))
    )
    make_template_snapshot(
        _image_of(baseline),
        dest,
        driver_for(version.host),
        vcpus=cpu,
        memory_mb=memory_mb,
        name=vm_name(version.pk, cpu, memory_mb),
        before_save=prepare,
    )


class _ShapeLog:
    """Where a make's ready check reports progress: the worker's log (the version's build
    log belongs to its build, which ended)."""

    def __init__(self, version_id: int, name: str) -> None:
        self.prefix = f"version {version_id}: {name} snapshot: "

    def add(self, message: str, level: str = "info") -> None:
        logger.log(logging.WARNING if level == "error" else logging.INFO, "%s%s", self.prefix, message)

    def flush(self) -> None:
        """Lines are logged as they come."""


def making(version: TemplateVersion, cpu: int, memory_mb: int) -> bool:
    """Whether a make of the shape runs now (on this host)."""
    return bool(version.artifact_dir) and _making(shapes_dir(version), shape_name(cpu, memory_mb))


def making_vms(names: list[str]) -> set[str]:
    """Of these VM names, those of shape makes still running (reconciliation keeps them)."""
    running = set()
    for name in names:
        match = re.fullmatch(r"shape-(\d+)-(\d+)x(\d+)", name.removeprefix(settings.RUNTIME_VM_PREFIX))
        if match is None:
            continue
        version = TemplateVersion.objects.filter(pk=int(match.group(1))).first()
        if version is not None and making(version, int(match.group(2)), int(match.group(3))):
            running.add(name)
    return running


def summary(version: TemplateVersion) -> str:
    """One line per shape for operators: made (and its size), queued, making, or failing."""
    directory = shapes_dir(version) if version.artifact_dir else None
    if directory is None or not directory.is_dir():
        return ""
    lines = []
    for name in sorted(_known(directory)):
        cpu, memory_mb = (int(part) for part in name.split("x"))
        snapshot, current = made(version, cpu, memory_mb), _read(directory, name)
        if snapshot is not None:
            size = sum(f.stat().st_blocks * 512 for f in (directory / name).iterdir() if f.is_file())
            lines.append(f"{name}: ready ({size / 2**20:.0f} MiB)")
        elif _making(directory, name):
            lines.append(f"{name}: being made")
        elif current.queued_at is not None:
            lines.append(f"{name}: queued")
        elif current.attempts:
            given_up = " (given up)" if current.attempts >= MAX_ATTEMPTS else ""
            lines.append(f"{name}: failed {current.attempts}x{given_up}: {current.last_error[:200]}")
    return "\n".join(lines)


# --- the files beside the snapshots -------------------------------------------------------


def _failed(current: ShapeState, error: str, now: float, *, backoff: bool) -> ShapeState:
    attempts = current.attempts + 1
    wait = BACKOFF_SECONDS * 2 ** (attempts - 1) if backoff else 0.0
    return ShapeState(attempts=attempts, next_attempt_at=now + wait, last_error=error[:2000])


def _known(directory: Path) -> set[str]:
    """Every shape with a snapshot or a state file."""
    return {
        path.name.removesuffix(".json")
        for path in directory.iterdir()
        if re.fullmatch(r"\d+x\d+(\.json)?", path.name)
    }


def _taken(directory: Path) -> set[str]:
    """Shapes that hold (or are about to hold) a snapshot: made, queued or being made."""
    taken = set()
    for name in _known(directory):
        current = _read(directory, name)
        if (directory / name).is_dir() or current.queued_at is not None or current.started_at is not None:
            taken.add(name)
    return taken


def _read(directory: Path, name: str) -> ShapeState:
    try:
        return ShapeState(**json.loads((directory / f"{name}.json").read_text()))
    except FileNotFoundError:
        return ShapeState()
    except (ValueError, TypeError):  # a torn or foreign file: start over
        return ShapeState()


def _write(directory: Path, name: str, current: ShapeState) -> None:
    tmp = directory / f"{name}.json.tmp"
    tmp.write_text(json.dumps(asdict(current)))
    tmp.replace(directory / f"{name}.json")


def _clear(directory: Path, name: str) -> None:
    (directory / f"{name}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _state_lock(directory: Path) -> Iterator[None]:
    with (directory / "state.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _make_lock(directory: Path, name: str) -> Iterator[bool]:
    """Hold the shape's make lock if no one else does; yields whether this holds it."""
    with try_flock(directory / f"{name}.lock") as held:
        yield held


def _making(directory: Path, name: str) -> bool:
    with _make_lock(directory, name) as held:
        return not held

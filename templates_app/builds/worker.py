"""The worker's part of a build: claim the version, run its steps in build VMs, take the snapshot.

The worker restores the parent template's snapshot as a build VM over a fresh overlay
(or boots the longest cached prefix of layers), runs each step through the guest agent
(logging its output), flattens the resulting disk into a standalone image, then boots
that image once, runs the start command and the ready check, and takes the memory
snapshot that sandboxes start from.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import metering
from billing.selectors import team_suspended
from sandboxes.models import Host
from sandboxes.runtime import driver_for, lifecycle
from sandboxes.runtime.buildvm import BuildVm, make_template_snapshot
from sandboxes.runtime.driver import MemorySnapshot
from sandboxes.runtime.images import BaseImage
from templates_app import artifacts, layers, shapes
from templates_app.builds.log import BuildLog
from templates_app.builds.ready import start_and_wait_ready
from templates_app.builds.spec import Step, build_steps, internet, parent_and_image
from templates_app.models import BuildLayer, Template, TemplateTag, TemplateVersion, VersionStatus
from templates_app.selectors import template_version_resolve

logger = logging.getLogger(__name__)

STEP_TIMEOUT = 1800.0
# How often a running build renews its lease, at most: also how soon its worker notices a
# cancellation (or the sweep failing it) while a long step runs.
STOP_CHECK_SECONDS = 5.0


class BuildStopped(Exception):
    """The version stopped being `building` under the worker: cancelled, or failed by the sweep."""


class BuildStepFailed(Exception):
    def __init__(self, step: Step, code: int, tail: str) -> None:
        super().__init__(f"step {step.name} failed with exit code {code}: {tail[-2000:]}")
        self.step = step


def _run_step(log: BuildLog, vm: BuildVm, step: Step, env: dict[str, str]) -> None:
    """One step in the build VM, its output streamed into the log as it comes."""
    tail = bytearray()

    def on_output(stream: str, data: bytes) -> None:
        tail.extend(data)
        del tail[:-4000]
        log.output(stream, data)

    if step.files:
        log.add(f"{step.name}: writing {len(step.files)} file(s)")
        vm.write_files(step.files, timeout=STEP_TIMEOUT)
    log.add(f"{step.name}: {step.command[:500]}")
    code = vm.run(step.command, on_output, env=env, timeout=STEP_TIMEOUT)
    log.end_output()
    if code != 0:
        raise BuildStepFailed(step, code, tail.decode(errors="replace").strip())


def _flatten(top: Path, dest: Path) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(top), str(dest)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    dest.chmod(0o444)


@dataclass
class _Plan:
    """What a build needs to know before it starts a VM."""

    parent: TemplateVersion
    snapshot: MemorySnapshot
    steps: list[Step]
    keys: list[str]
    env: dict[str, str]
    internet: bool


def planned_steps(version: TemplateVersion) -> tuple[TemplateVersion, list[Step], list[str]]:
    """The version built on, the steps, and each step's layer key."""
    spec = version.build_spec
    parent_slug, image = parent_and_image(spec)
    parent = template_version_resolve(team=version.template.team, selector=parent_slug)
    steps = build_steps(spec, image)
    keys = layers.step_keys(
        parent,
        [s.cache_text for s in steps],
        version.build_env(),
        internet(spec),
        version.template.team_id,
        env_free=sum(s.env_free for s in steps),
    )
    return parent, steps, keys


def _plan(version: TemplateVersion) -> _Plan:
    parent, steps, keys = planned_steps(version)
    return _Plan(
        parent,
        lifecycle.load_template_snapshot(parent.artifact_dir),
        steps,
        keys,
        version.build_env(),
        internet(version.build_spec),
    )


def _run_uncached_steps(
    version: TemplateVersion,
    host: Host,
    plan: _Plan,
    cached: list[BuildLayer],
    log: BuildLog,
    check: Callable[[], None],
) -> list[Path]:
    """Boot on the last cached layer (or restore the parent), run the remaining steps,
    turning each into a layer. Returns the layer files made, the last step's last."""
    directory = layers.layers_dir(host)
    name = build_vm_names(version.pk)[0]
    start = len(cached)
    top = directory / f"{plan.keys[start]}-{uuid.uuid4().hex[:8]}.qcow2"
    if cached:
        vm = BuildVm.boot(
            driver_for(host),
            plan.snapshot,
            Path(cached[-1].path),
            name,
            disk_path=top,
            internet=plan.internet,
        )
    else:
        vm = BuildVm.restore(driver_for(host), plan.snapshot, name, disk_path=top, internet=plan.internet)
    parent_layer = cached[-1] if cached else None
    registrable, produced = True, [top]
    try:
        for index in range(start, len(plan.steps)):
            check()
            step = plan.steps[index]
            _run_step(log, vm, step, {} if step.env_free else plan.env)
            finished = top
            if index + 1 < len(plan.steps):  # what the step wrote becomes a layer
                top = directory / f"{plan.keys[index + 1]}-{uuid.uuid4().hex[:8]}.qcow2"
                produced.append(top)
                vm.cut_layer(top)
            else:
                vm.stop()  # stopped frozen: the last layer is consistent
            if registrable:
                parent_layer = layers.register(
                    host=host,
                    key=plan.keys[index],
                    parent=parent_layer,
                    base_version=plan.parent,
                    step=step.name,
                    path=finished,
                )
                registrable = parent_layer is not None
    except BaseException:
        vm.destroy()
        _drop_unregistered(produced)
        raise
    return produced


def _drop_unregistered(paths: list[Path]) -> None:
    for path in paths:
        if not layers.is_registered(path):
            path.unlink(missing_ok=True)


def _build(version: TemplateVersion, host: Host, log: BuildLog, check: Callable[[], None]) -> Path:
    """Build into a fresh version directory and return its snapshot directory.

    The directory holds ``base.qcow2`` (the flattened disk) and ``snapshot/`` (the
    memory image and its overlay on ``base.qcow2``): everything the version needs and
    nothing another version needs.
    """
    plan = _plan(version)
    root = Path(host.data_dir) / "templates" / version.template.slug
    home = root / f"{version.version}-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    try:
        return _build_into(version, host, log, plan, home, check)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise


def _build_into(
    version: TemplateVersion, host: Host, log: BuildLog, plan: _Plan, home: Path, check: Callable[[], None]
) -> Path:
    spec = version.build_spec
    last_key = plan.keys[-1] if plan.keys else layers.base_key(plan.parent, version.template.team_id)
    key = layers.artifact_key(last_key, spec, plan.env, version.cpu, version.memory_mb)
    TemplateVersion.objects.filter(pk=version.pk).update(cache_key=key)

    hit = None if version.skip_cache else layers.cached_artifact(host, key)
    if hit is not None:
        log.add(
            f"cache hit: every step and the start/ready commands are unchanged since version "
            f"{hit.version} (build {hit.pk}); reusing its artifact"
        )
        return layers.link_artifact(Path(hit.artifact_dir), home)

    cached = [] if version.skip_cache else layers.cached_prefix(host, plan.keys)
    for step in plan.steps[: len(cached)]:
        log.add(f"{step.name}: cached")
    if version.skip_cache:
        log.add("skip_cache: every step runs")
    produced: list[Path] = []
    if len(cached) < len(plan.steps):
        produced = _run_uncached_steps(version, host, plan, cached, log, check)
        last = produced[-1]
    else:
        last = Path(cached[-1].path) if cached else plan.snapshot.disk_path
    disk = home / layers.BASE_DISK
    try:
        check()
        log.add("flattening the image")
        log.flush()
        _flatten(last, disk)
    finally:
        _drop_unregistered(produced)
    check()
    log.add("starting the template and taking its memory snapshot")
    log.flush()
    prepare = start_and_wait_ready(spec, plan.env, log)

    def checked_prepare(vm: BuildVm) -> None:
        check()
        prepare(vm)

    image = BaseImage(
        key="",
        directory=home,
        kernel=plan.snapshot.kernel,
        initrd=plan.snapshot.initrd,
        disk=disk,
        kernel_version="",
    )
    make_template_snapshot(
        image,
        home / layers.SNAPSHOT_DIR,
        driver_for(host),
        vcpus=version.cpu,
        memory_mb=version.memory_mb,
        name=build_vm_names(version.pk)[1],
        before_save=checked_prepare,
    )
    return home / layers.SNAPSHOT_DIR


def claim(version_id: int) -> TemplateVersion | None:
    """DRAFT -> BUILDING once, and only while no other build of the template runs.

    The template row lock serialises claims; a draft that finds its template busy stays
    a draft and is queued again when the running build ends (or by the builds sweep).
    """
    with transaction.atomic():
        version = (
            TemplateVersion.objects.select_related("template__team")
            .filter(pk=version_id, status=VersionStatus.DRAFT, deleted_at__isnull=True)
            .first()
        )
        if version is None:
            return None
        if version.template.team_id is not None and team_suspended(version.template.team_id):
            # queued before the suspension: it does not run on a suspended team's account
            TemplateVersion.objects.filter(pk=version_id, status=VersionStatus.DRAFT).update(
                status=VersionStatus.FAILED,
                last_error_message=f"Team '{version.template.team.slug}' is suspended (its prepaid balance "
                "is used up); top up and start the build again.",
            )
            return None
        Template.objects.select_for_update().filter(pk=version.template_id).first()
        if version.template.versions.filter(status=VersionStatus.BUILDING).exists():
            return None
        now = timezone.now()
        # Conditional: a template deletion that held the lock first retired this draft.
        if not TemplateVersion.objects.filter(
            pk=version_id, status=VersionStatus.DRAFT, deleted_at__isnull=True
        ).update(
            status=VersionStatus.BUILDING,
            build_started_at=now,
            lease_expires_at=now + timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS),
        ):
            return None
        metering.build_started(
            version_id=version.pk,
            team_id=version.template.team_id,
            cpu=version.cpu,
            memory_mb=version.memory_mb,
            at=now,
        )
    version.refresh_from_db()
    return version


class _Lease:
    """Renews a building version's lease from a thread while the build runs; a worker
    that dies stops renewing, and the builds sweep fails the version.

    A renewal that finds the version no longer `building` (cancelled, or failed by the
    sweep) marks the lease lost and destroys the build VMs, so a long step ends at once;
    the build's own failure path then cleans up. ``check`` raises BuildStopped between steps.
    """

    def __init__(self, version_id: int, host: Host) -> None:
        self.version_id, self.host = version_id, host
        self.stop, self.lost = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{version_id}", daemon=True)

    def _run(self) -> None:
        from django.db import connection

        lease = timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS)
        try:
            while not self.stop.wait(min(lease.total_seconds() / 4, STOP_CHECK_SECONDS)):
                renewed = TemplateVersion.objects.filter(
                    pk=self.version_id, status=VersionStatus.BUILDING
                ).update(lease_expires_at=timezone.now() + lease)
                if not renewed:
                    self.lost.set()
                    try:
                        destroy_build_vms(self.host, self.version_id)
                    except Exception:  # the build's failure path destroys them too
                        logger.warning("build %s: could not destroy its VMs", self.version_id, exc_info=True)
                    return
        finally:
            connection.close()

    def check(self) -> None:
        """Raise BuildStopped once the version is no longer this worker's to build."""
        still_building = TemplateVersion.objects.filter(
            pk=self.version_id, status=VersionStatus.BUILDING
        ).exists()
        if self.lost.is_set() or not still_building:
            self.lost.set()
            raise BuildStopped(stop_reason(self.version_id))

    def __enter__(self) -> _Lease:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def stop_reason(version_id: int) -> str:
    """Why a build stopped under its worker, for its log."""
    reasons = TemplateVersion.objects.filter(pk=version_id).values_list("last_error_message", flat=True)
    reason = reasons.first()
    return f"build stopped: {reason or 'the version is no longer building'}"


def destroy_build_vms(host: Host, version_id: int) -> None:
    driver = driver_for(host)
    for name in build_vm_names(version_id):
        driver.destroy(name)  # idempotent: a VM that is not there is nothing to do


def fail(version_id: int, message: str) -> int:
    """BUILDING -> FAILED with a reason; returns 1 if this call did it."""
    with transaction.atomic():
        failed = TemplateVersion.objects.filter(pk=version_id, status=VersionStatus.BUILDING).update(
            status=VersionStatus.FAILED, last_error_message=message[:4000], lease_expires_at=None
        )
        metering.build_ended(version_id=version_id, at=timezone.now())
    return failed


def queue_next_draft(template_id: int) -> None:
    from templates_app.tasks import template_build_task

    draft = (
        TemplateVersion.objects.filter(
            template_id=template_id, status=VersionStatus.DRAFT, deleted_at__isnull=True
        )
        .order_by("pk")
        .first()
    )
    if draft is not None:
        template_build_task.delay(draft.pk)


def template_build_run(*, version_id: int) -> None:
    """Build a claimed version on this worker's host; failures fail the version with a reason."""
    from sandboxes.services import host_register_local

    version = claim(version_id)
    if version is None:
        return
    host = host_register_local()
    log = BuildLog(version)
    log.add(f"building {version.template.slug}:{version.version}")
    lease = _Lease(version.pk, host)
    try:
        with lease:
            artifact = _build(version, host, log, lease.check)
    except Exception as exc:
        if lease.lost.is_set():  # cancelled or failed meanwhile: what broke is the VM we destroyed
            logger.info("build of version %s stopped: %s", version_id, exc)
            log.add(exc.args[0] if isinstance(exc, BuildStopped) else stop_reason(version.pk), "error")
        else:
            logger.exception("build of version %s failed", version_id)
            log.add(str(exc), "error")
        log.flush()
        fail(version.pk, str(exc))
        queue_next_draft(version.template_id)
        return
    size, now = (
        sum(f.stat().st_blocks * 512 for f in artifact.parent.rglob("*") if f.is_file()),
        timezone.now(),
    )
    with transaction.atomic():
        done = TemplateVersion.objects.filter(pk=version.pk, status=VersionStatus.BUILDING).update(
            status=VersionStatus.READY,
            host=host,
            artifact_dir=str(artifact),
            lease_expires_at=None,
            size_bytes=size,
            built_at=now,
        )
        metering.build_ended(version_id=version.pk, at=now)
        if done:
            metering.template_versions_ready(versions=[(version.pk, version.template.team_id, size)], at=now)
            for tag in version.build_spec.get("tags", []):
                TemplateTag.objects.update_or_create(
                    template=version.template, tag=tag, defaults={"version": version}
                )
    log.add(
        "ready" if done else "the build was failed while it ran (lease lost); result discarded",
        "info" if done else "error",
    )
    log.flush()
    if not done:
        shutil.rmtree(artifact, ignore_errors=True)
    else:
        version.refresh_from_db()
        artifacts.publish_or_log(version)
        shapes.request_declared(version)
    queue_next_draft(version.template_id)


def build_vm_names(version_id: int) -> tuple[str, str]:
    """The build VM running the steps, and the one taking the memory snapshot."""
    name = f"{settings.RUNTIME_VM_PREFIX}build-{version_id}"
    return name, f"{name}-final"

"""Writes for templates: the provider template `base` and its versions."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from billing import metering
from sandboxes.hostcalls import host_step
from sandboxes.models import RUNTIME_STATES, Host, Sandbox, SandboxState
from sandboxes.runtime import driver_for, images, lifecycle
from sandboxes.runtime.buildvm import make_template_snapshot
from sandboxes.services import host_register_local
from teams.models import User
from teams.selectors import team_for_write, teams_of_user
from templates_app import artifacts, shapes
from templates_app.models import Template, TemplateTag, TemplateVersion, VersionStatus
from templates_app.selectors import template_by_id_or_alias, template_version_for_target
from watasu import errors

logger = logging.getLogger(__name__)

BASE_SLUG = "base"
# A build that has not finished after this long belongs to a dead worker.
BUILD_LEASE = timedelta(minutes=30)


def artifact_ok(artifact_dir: str | Path) -> bool:
    """A complete artifact on disk: snapshot metadata, memory image, disk, boot files."""
    try:
        snapshot = lifecycle.load_template_snapshot(artifact_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(
        p.is_file() for p in (snapshot.save_path, snapshot.disk_path, snapshot.kernel, snapshot.initrd)
    ) and images.qcow2_ok(snapshot.disk_path)


def _artifact_root(host: Host, version: TemplateVersion) -> Path:
    return Path(host.data_dir) / "templates" / version.template.slug


def _existing_artifact(host: Host, version: TemplateVersion) -> Path | None:
    """A valid artifact already on the host for this version (e.g. after a database reset)."""
    root = _artifact_root(host, version)
    candidates = sorted(root.glob(f"{version.version}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if c.is_dir() and artifact_ok(c)), None)


def _claim_build(version: TemplateVersion) -> bool:
    """Move the version to `building` unless another worker holds a live claim."""
    stale = timezone.now() - BUILD_LEASE
    claimable = TemplateVersion.objects.filter(pk=version.pk).exclude(
        status=VersionStatus.BUILDING, build_started_at__gt=stale
    )
    return claimable.update(status=VersionStatus.BUILDING, build_started_at=timezone.now()) == 1


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _snapshot_into(version: TemplateVersion, image: images.BaseImage, host: Host) -> None:
    artifact = _existing_artifact(host, version)
    if artifact is None:
        # A fresh directory per build, never an overwrite: sandboxes started from
        # an older artifact keep their backing disk until retention removes it.
        artifact = _artifact_root(host, version) / f"{version.version}-{uuid.uuid4().hex[:8]}"
        make_template_snapshot(
            image, artifact, driver_for(host), vcpus=version.cpu, memory_mb=version.memory_mb
        )
    size, now = _dir_size(artifact), timezone.now()
    with transaction.atomic():
        TemplateVersion.objects.filter(pk=version.pk).update(
            status=VersionStatus.READY,
            host=host,
            artifact_dir=str(artifact),
            artifact_digest=image.key,
            size_bytes=size,
            built_at=now,
            last_error_message="",
        )
        metering.template_versions_ready(versions=[(version.pk, version.template.team_id, size)], at=now)


@host_step(timeout=1800)
def base_template_ensure_on(host: Host) -> TemplateVersion:
    """`base_template_ensure` run where ``host``'s files are: by its own worker, or here."""
    return base_template_ensure(host=host)


def base_template_ensure(*, host: Host | None = None) -> TemplateVersion:
    """The ready version of `base` for the current image inputs, built when missing.

    The guest image comes from the image cache (rebuilt when missing or
    corrupt); the memory snapshot is taken on `host`, or adopted when a valid
    one for this version is already there. A ready version whose artifact
    went missing or is damaged is snapshotted again, into a new directory.
    The makes of WATASU_SNAPSHOT_SHAPES it lacks are queued.
    """
    host = host or host_register_local()
    image = images.build_base_image(settings.RUNTIME_IMAGE_CACHE_DIR, settings.RUNTIME_APT_MIRROR or None)
    template, _ = Template.objects.get_or_create(
        team=None,
        slug=BASE_SLUG,
        defaults={"name": "Base", "description": "Debian 12 with python3 and the guest agent."},
    )
    with transaction.atomic():
        version, _ = TemplateVersion.objects.get_or_create(
            template=template,
            version=f"debian12-{images.base_snapshot_key(image)}",
            defaults={
                "cpu": settings.SANDBOX_FALLBACK_CPU,
                "memory_mb": settings.SANDBOX_FALLBACK_MEMORY_MB,
                "build_spec": {"image": "debian:bookworm", "kernel": image.kernel_version},
            },
        )
    if (
        version.status == VersionStatus.READY
        and version.host_id == host.pk
        and artifact_ok(version.artifact_dir)
    ):
        if not version.store_digest:  # built before the artifact store, or its publish failed
            artifacts.publish_or_log(version)
        shapes.request_declared(version)  # shapes declared since it was built
        return version
    if not _claim_build(version):
        raise errors.Conflict(
            f"Template {template.slug}:{version.version} is being built.", code="template_building"
        )
    try:
        _snapshot_into(version, image, host)
    except Exception as exc:
        TemplateVersion.objects.filter(pk=version.pk).update(
            status=VersionStatus.FAILED, last_error_message=str(exc)[:2000]
        )
        raise
    version.refresh_from_db()
    logger.info("template %s ready in %s", version, version.artifact_dir)
    artifacts.publish_or_log(version)
    shapes.request_declared(version)
    return version


# --- team templates and tags ---------------------------------------------------------------


def writable_template(user: User, template: Template) -> Template:
    """Provider templates are read-only to customers; viewers may not change a team's."""
    if template.team is None:  # no query when team_id is None
        raise errors.Forbidden(f"Template '{template.slug}' belongs to the platform and is read-only.")
    team_for_write(user=user, slug=template.team.slug)
    return template


def template_create(
    *,
    user: User,
    team_slug: str | None,
    slug: str,
    name: str = "",
    description: str = "",
    metadata: dict[str, str] | None = None,
) -> Template:
    """A team template without versions yet; the slug is unique within the team."""
    team = team_for_write(user=user, slug=team_slug)
    try:
        with transaction.atomic():
            return Template.objects.create(
                team=team, slug=slug, name=name or slug, description=description, metadata=metadata or {}
            )
    except IntegrityError:
        raise errors.Conflict(
            f"Team {team.slug} already has a template '{slug}'.", code="already_exists"
        ) from None


def template_tags_assign(*, user: User, target: str, tags: list[str]) -> TemplateVersion:
    """Point `tags` at the version `target` names (moving them off any other version)."""
    version = template_version_for_target(teams=teams_of_user(user=user), target=target)
    writable_template(user, version.template)
    if version.status != VersionStatus.READY:
        raise errors.Invalid(
            f"Template version '{target}' is {version.status}; only ready versions can be tagged.",
            code="template_not_ready",
        )
    with transaction.atomic():
        for tag in tags:
            TemplateTag.objects.update_or_create(
                template=version.template, tag=tag, defaults={"version": version}
            )
    return version


def template_tags_remove(*, user: User, name: str, tags: list[str]) -> None:
    template = writable_template(
        user, template_by_id_or_alias(teams=teams_of_user(user=user), value=name.partition(":")[0])
    )
    TemplateTag.objects.filter(template=template, tag__in=tags).delete()


def _holder(template: Template) -> Sandbox | None:
    """A sandbox that runs, or can resume, on one of the template's versions."""
    return (
        Sandbox.objects.filter(
            Q(template=template) | Q(template_version__template=template),
            state__in=[*RUNTIME_STATES, SandboxState.STOPPED],
        )
        .select_related("template_version")
        .order_by("pk")
        .first()
    )


def _version_name(sandbox: Sandbox) -> str:
    version = sandbox.template_version
    return f"version '{version.version}'" if version else "it"


def template_delete(*, user: User, template: Template) -> None:
    """Retire a team template and every version of it: none lists or resolves any more, the
    slug is free again, and the retention sweep removes the files once nothing references
    them. Refused while a build runs or while a sandbox runs (or is paused) on a version:
    deleting would pull its disk from under it."""
    writable_template(user, template)
    with transaction.atomic():
        # The row lock orders this against build claims, which take it too.
        Template.objects.select_for_update().filter(pk=template.pk).first()
        versions = TemplateVersion.objects.filter(template=template, deleted_at__isnull=True)
        if versions.filter(status=VersionStatus.BUILDING).exists():
            raise errors.Conflict(
                f"Template '{template.slug}' is being built; delete it once the build ends.",
                code="template_building",
            )
        if (holder := _holder(template)) is not None:
            raise errors.Conflict(
                f"Template '{template.slug}' is in use: sandbox {holder.pk} ({holder.state}) runs on "
                f"{_version_name(holder)}; kill it first.",
                code="template_in_use",
                sandbox_id=str(holder.pk),
            )
        now = timezone.now()
        metering.template_versions_retired(
            ids=list(versions.filter(deleted_at__isnull=True).values_list("pk", flat=True)), at=now
        )
        versions.update(deleted_at=now)
        TemplateTag.objects.filter(template=template).delete()
        Template.objects.filter(pk=template.pk).update(deleted_at=now)


def template_version_delete(*, user: User, version: TemplateVersion) -> None:
    """Retire a version: it stops resolving at once and loses its tags; its files are
    removed by the retention sweep once no sandbox and no build layer references them
    (stopped sandboxes still run on its disk)."""
    writable_template(user, version.template)
    with transaction.atomic():
        retired = (
            TemplateVersion.objects.filter(pk=version.pk, deleted_at__isnull=True)
            .exclude(status=VersionStatus.BUILDING)
            .update(deleted_at=timezone.now())
        )
        if retired:
            metering.template_versions_retired(ids=[version.pk], at=timezone.now())
        if not retired and TemplateVersion.objects.filter(pk=version.pk, deleted_at__isnull=True).exists():
            raise errors.Conflict(
                "This version is being built; delete it once the build ends.",
                code="template_version_building",
            )
        TemplateTag.objects.filter(version=version).delete()

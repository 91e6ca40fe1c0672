"""Provider templates beyond `base`: defined in this package, built by the template pipeline.

Each provider template is a module here exposing ``SLUG``, ``NAME``, ``DESCRIPTION``, ``CPU``,
``MEMORY_MB`` and ``build_spec()``: the same build spec a customer would send to
``POST /v1/templates`` (from ``base``, apt packages, files, setup, a start and ready command).
Programs that run inside the guest live in ``guest/`` and travel in the spec's ``files``.

A provider version's name is a digest of its spec, its shape and the ``base`` version it
builds on, so changing a guest program or a package list makes a new version, and an
unchanged spec never builds twice. ``provider_template_ensure`` returns the ready version
for the current inputs: the existing one, one adopted from an artifact already on the host
(a database reset loses the rows, not the files), or a new build through
``templates_app.builds`` — in this process (``wait=True``) or on a build worker.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from billing import metering
from sandboxes.models import Host
from templates_app import artifacts
from templates_app.builds.spec import validate_spec
from templates_app.models import Template, TemplateVersion, VersionStatus
from watasu import errors

logger = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent / "guest"

# slug -> module, in build order (nothing here depends on another provider template yet).
MODULES = {
    "code-interpreter": "templates_app.provider.code_interpreter",
    "mcp-gateway": "templates_app.provider.mcp_gateway",
}
SLUGS = tuple(MODULES)

# How long `wait=True` waits for a build another process runs.
WAIT_SECONDS = 3600


def provider_module(slug: str) -> ModuleType:
    if slug not in MODULES:
        raise errors.Invalid(f"'{slug}' is not a provider template.", code="template_not_found")
    return importlib.import_module(MODULES[slug])


def guest_file(name: str, path: str, mode: int = 0o644) -> dict[str, Any]:
    """A build-spec file entry carrying ``guest/<name>`` to ``path`` in the template."""
    content = (GUEST_DIR / name).read_bytes()
    return {"path": path, "content_b64": base64.b64encode(content).decode(), "mode": mode}


def provider_version_name(module: ModuleType, spec: dict[str, Any], base: TemplateVersion) -> str:
    """``p-<digest>``: changes with the spec, the shape and the base version built on."""
    inputs = {"spec": spec, "cpu": module.CPU, "memory_mb": module.MEMORY_MB, "base": base.version}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return f"p-{digest[:16]}"


def _versions(template: Template, name: str) -> Any:
    """This spec's versions: the first build and its retries (``<name>-retry-<hex>``)."""
    return template.versions.filter(
        Q(version=name) | Q(version__startswith=f"{name}-retry-"), deleted_at__isnull=True
    ).order_by("-pk")


def _adopt(template: Template, name: str, host: Host, spec: dict[str, Any], module: ModuleType) -> Any:
    """A ready row for a valid artifact of this spec already on the host, or None."""
    from templates_app.services import artifact_ok

    root = Path(host.data_dir) / "templates" / template.slug
    found = sorted(root.glob(f"{name}-*/snapshot"), key=lambda p: p.stat().st_mtime, reverse=True)
    artifact = next((path for path in found if artifact_ok(path)), None)
    if artifact is None:
        return None
    size = sum(f.stat().st_blocks * 512 for f in artifact.parent.rglob("*") if f.is_file())
    now = timezone.now()
    try:
        with transaction.atomic():
            version = TemplateVersion.objects.create(
                template=template,
                version=name,
                status=VersionStatus.READY,
                cpu=module.CPU,
                memory_mb=module.MEMORY_MB,
                build_spec={**spec, "env_keys": [], "tags": []},
                host=host,
                artifact_dir=str(artifact),
                size_bytes=size,
                built_at=now,
            )
            metering.template_versions_ready(versions=[(version.pk, None, size)], at=now)
    except IntegrityError:  # another process adopted or queued it first
        return None
    logger.info("provider template %s:%s adopted from %s", template.slug, name, artifact)
    artifacts.publish_or_log(version)
    return version


def _retire_superseded(template: Template, current: TemplateVersion) -> None:
    """Older ready versions stop resolving; the retention sweep removes their files once
    no sandbox runs (or is paused) on them."""
    older = template.versions.filter(
        status=VersionStatus.READY, deleted_at__isnull=True, built_at__lt=current.built_at
    )
    ids = list(older.values_list("pk", flat=True))
    if ids:
        now = timezone.now()
        TemplateVersion.objects.filter(pk__in=ids).update(deleted_at=now)
        metering.template_versions_retired(ids=ids, at=now)
        logger.info("provider template %s: retired %s superseded version(s)", template.slug, len(ids))


def _wait_built(version: TemplateVersion) -> TemplateVersion:
    deadline = time.monotonic() + WAIT_SECONDS
    while version.status in (VersionStatus.DRAFT, VersionStatus.BUILDING):
        if time.monotonic() > deadline:
            raise errors.Unavailable(
                f"Provider template {version.template.slug} is still building after {WAIT_SECONDS} s.",
                code="template_building",
            )
        time.sleep(2)
        version.refresh_from_db()
    return version


def provider_template_ensure(slug: str, *, host: Host | None = None, wait: bool = True) -> TemplateVersion:
    """The provider version for the current spec, built when missing.

    With ``wait`` the build runs in this process (or, if another process already runs it,
    is waited for) and the version returned is ready or failed (``last_error_message``
    says why). Without, a missing version is queued for a build worker and returned as a
    draft. A failed version is retried as ``<name>-retry-<hex>``.
    """
    from sandboxes.services import host_register_local
    from templates_app.builds.start import _queue
    from templates_app.builds.worker import template_build_run
    from templates_app.services import artifact_ok, base_template_ensure

    module = provider_module(slug)
    host = host or host_register_local()
    base = base_template_ensure(host=host)
    spec = validate_spec(module.build_spec())
    name = provider_version_name(module, spec, base)
    template, _ = Template.objects.get_or_create(
        team=None,
        slug=slug,
        deleted_at__isnull=True,
        defaults={"name": module.NAME, "description": module.DESCRIPTION},
    )
    current = _versions(template, name).first()
    if current is not None and current.status == VersionStatus.READY and artifact_ok(current.artifact_dir):
        _retire_superseded(template, current)
        return current
    if current is not None and current.status in (VersionStatus.DRAFT, VersionStatus.BUILDING):
        return _wait_built(current) if wait else current
    if current is None and (adopted := _adopt(template, name, host, spec, module)) is not None:
        return adopted
    # none yet, failed, or ready with its files gone: a new build
    version_name = name if current is None else f"{name}-retry-{uuid.uuid4().hex[:6]}"
    try:
        with transaction.atomic():
            version = _queue(
                template, version_name, spec, module.CPU, module.MEMORY_MB, [], False, enqueue=not wait
            )
    except IntegrityError:  # another process queued it first
        version = _versions(template, name).first()
        assert version is not None
        return _wait_built(version) if wait else version
    if wait:
        template_build_run(version_id=version.pk)
        version.refresh_from_db()
        if version.status == VersionStatus.READY:
            _retire_superseded(template, version)
    return version


def provider_templates_ensure(
    slugs: Iterable[str] = SLUGS, *, host: Host | None = None, wait: bool = False
) -> list[TemplateVersion]:
    """Every provider template (or those named), queued for a build worker unless `wait`."""
    return [provider_template_ensure(slug, host=host, wait=wait) for slug in slugs]


def is_provider_selector(team: Any, selector: str) -> bool:
    """Whether `selector` names a provider template for this team (no own template shadows it)."""
    return (
        selector in MODULES
        and not Template.objects.filter(team=team, slug=selector, deleted_at__isnull=True).exists()
    )


def provider_not_ready(slug: str) -> errors.Invalid:
    """The create error for a provider template with no ready version: a build is queued
    (a no-op when one is already queued or running) and the message says what to do."""
    from templates_app.tasks import provider_template_ensure_task

    transaction.on_commit(lambda: provider_template_ensure_task.delay(slug))
    failed = (
        TemplateVersion.objects.filter(
            template__team=None, template__slug=slug, status=VersionStatus.FAILED, deleted_at__isnull=True
        )
        .order_by("-pk")
        .first()
    )
    last = f" The last build failed: {failed.last_error_message[:300]}" if failed else ""
    return errors.Invalid(
        f"Template '{slug}' is a platform template that is being built on this installation "
        f"(a few minutes on first use); try again shortly.{last}",
        code="template_not_ready",
    )

"""Build requests: a version row queued for a worker, and the reads of its build."""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.db import IntegrityError, transaction

from billing.selectors import team_require_active
from teams.models import User
from teams.selectors import team_for_write, teams_of_user
from teams.services import audit_record
from templates_app.builds.log import BuildLog
from templates_app.builds.spec import parent_and_image, validate_spec
from templates_app.models import BuildLogEntry, Template, TemplateVersion, VersionStatus
from templates_app.selectors import template_by_id_or_alias, template_version_resolve
from watasu import crypto, errors, ids


def template_build_start(
    *,
    user: User,
    name: str,
    build_spec: Any,
    cpu: int,
    memory_mb: int,
    tags: list[str],
    team_slug: str | None,
    skip_cache: bool = False,
) -> TemplateVersion:
    """`POST /templates`: the template (alias) is created if new; a draft version is queued."""
    spec = validate_spec(build_spec)
    alias, _, tag = name.partition(":")
    team = team_for_write(user=user, slug=team_slug)
    _check_parent(team, spec)
    template, _ = Template.objects.get_or_create(
        team=team, slug=alias, deleted_at__isnull=True, defaults={"name": alias}
    )
    return _queue(
        template,
        f"build-{uuid.uuid4().hex[:10]}",
        spec,
        cpu,
        memory_mb,
        sorted({*tags, *([tag] if tag else [])}),
        skip_cache,
    )


def template_version_create(
    *,
    user: User,
    template: Template,
    version: str,
    build_spec: Any,
    cpu: int,
    memory_mb: int,
    skip_cache: bool = False,
) -> TemplateVersion:
    """`POST /sandbox_templates/{id}/versions`: a named draft version of an existing template."""
    from templates_app.services import writable_template

    writable_template(user, template)
    spec = validate_spec(build_spec)
    _check_parent(template.team, spec)
    if template.versions.filter(version=version).exists():
        raise errors.Conflict(f"Version '{version}' already exists.", code="template_version_exists")
    try:
        with transaction.atomic():
            return _queue(template, version, spec, cpu, memory_mb, [], skip_cache)
    except IntegrityError as exc:  # a concurrent request took the name
        raise errors.Conflict(f"Version '{version}' already exists.", code="template_version_exists") from exc


def _check_parent(team: Any, spec: dict[str, Any]) -> None:
    parent_slug, _ = parent_and_image(spec)
    template_version_resolve(team=team, selector=parent_slug)  # 422 now, not after queueing


def _queue(
    template: Template,
    version: str,
    spec: dict[str, Any],
    cpu: int,
    memory_mb: int,
    tags: list[str],
    skip_cache: bool,
    *,
    enqueue: bool = True,
) -> TemplateVersion:
    """A draft version row; unless `enqueue` is false (the caller builds it in process),
    a build task for it is sent once the transaction commits."""
    if template.team is not None:
        team_require_active(template.team)  # a build runs a VM: not for a suspended team
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    public = {key: value for key, value in spec.items() if key != "env"}
    row = TemplateVersion.objects.create(
        template=template,
        version=version,
        status=VersionStatus.DRAFT,
        cpu=cpu,
        memory_mb=memory_mb,
        skip_cache=skip_cache,
        build_spec={**public, "env_keys": sorted(env), "tags": tags},
        env_encrypted=crypto.encrypt_json(env) if env else "",
    )
    if enqueue:
        from templates_app.tasks import template_build_task

        transaction.on_commit(lambda: template_build_task.delay(row.pk))
    return row


def build_log_entries(*, version: TemplateVersion, offset: int) -> list[BuildLogEntry]:
    return list(version.log_entries.filter(index__gte=max(offset, 0)).order_by("index"))


def template_build_get(*, user: User, template_id: str, build_id: str) -> TemplateVersion:
    template = template_by_id_or_alias(teams=teams_of_user(user=user), value=template_id)
    pk = ids.db_id(build_id)
    version = template.versions.filter(pk=pk).first() if pk is not None else None
    if version is None:
        raise errors.NotFound(f"Build {build_id} not found.", code="template_build_not_found")
    return version


# --- cancel and retry ------------------------------------------------------------------------

# What a version's build_spec holds besides the spec as sent (without env values).
_RECORDED_KEYS = ("env_keys", "tags")
_RETRY_SUFFIX = re.compile(r"-retry-[0-9a-f]{6}$")


def build_cancel(*, user: User, version: TemplateVersion, source: str = "api") -> TemplateVersion:
    """Stop a queued or running build: the version is `failed` at once, with who cancelled it.

    A queued (draft) version is never claimed afterwards. A running one belongs to a worker,
    possibly on another host: its lease renewal (or its check between steps) finds the version
    no longer `building`, tears the build VMs down through the build's failure path and
    discards what it made. 409 `template_build_finished` for a build that already ended.
    """
    from templates_app.builds.worker import fail
    from templates_app.services import writable_template

    writable_template(user, version.template)
    reason = f"Cancelled by {user.email}."
    queued = TemplateVersion.objects.filter(
        pk=version.pk, status=VersionStatus.DRAFT, deleted_at__isnull=True
    ).update(status=VersionStatus.FAILED, last_error_message=reason)
    if queued:
        # No worker writes this log (only a draft's claim would start one), so no index clash.
        log = BuildLog(version)
        log.add(f"build cancelled before it started: {reason}", "error")
        log.flush()
    elif not fail(version.pk, reason):
        version.refresh_from_db(fields=["status"])
        raise errors.Conflict(
            f"Build {version.pk} is {version.status}; only a queued or running build can be cancelled.",
            code="template_build_finished",
        )
    audit_record(
        team=version.template.team,  # type: ignore[arg-type]  # writable: never a provider template
        actor=user,
        action="template.build_cancel",
        target=version.pk,
        source=source,
        template=version.template.slug,
        version=version.version,
        was="draft" if queued else "building",
    )
    version.refresh_from_db()
    return version


def build_retry(*, user: User, version: TemplateVersion, source: str = "api") -> TemplateVersion:
    """A new build of a failed (or cancelled) version: the same spec, env, shape, tags and
    cache choice, as a new draft version queued for a worker (402 for a suspended team).
    409 `template_build_not_failed` for a version that did not fail."""
    from templates_app.services import writable_template

    template = writable_template(user, version.template)
    if version.status != VersionStatus.FAILED:
        raise errors.Conflict(
            f"Build {version.pk} is {version.status}; only a failed or cancelled build can be retried.",
            code="template_build_not_failed",
        )
    recorded = version.build_spec
    spec = {key: value for key, value in recorded.items() if key not in _RECORDED_KEYS}
    if env := version.build_env():
        spec["env"] = env
    spec = validate_spec(spec)
    _check_parent(template.team, spec)
    base = _RETRY_SUFFIX.sub("", version.version)[:86]
    with transaction.atomic():
        retried = _queue(
            template,
            f"{base}-retry-{uuid.uuid4().hex[:6]}",
            spec,
            version.cpu,
            version.memory_mb,
            list(recorded.get("tags") or []),
            version.skip_cache,
        )
        audit_record(
            team=template.team,  # type: ignore[arg-type]
            actor=user,
            action="template.build_retry",
            target=retried.pk,
            source=source,
            template=template.slug,
            retry_of=version.pk,
            version=retried.version,
        )
    return retried

"""Reads for templates, from the point of view of a team."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from teams.models import Team
from templates_app.models import Template, TemplateVersion, VersionStatus
from watasu import errors, ids


def templates_visible(*, team: Team) -> QuerySet[Template]:
    """The team's own templates and the provider's (deleted ones are gone)."""
    return Template.objects.filter(Q(team=team) | Q(team__isnull=True), deleted_at__isnull=True)


def _template_by_slug(team: Team, slug: str) -> Template | None:
    # A team's own template shadows a provider template of the same slug.
    candidates = templates_visible(team=team).filter(slug=slug)
    return min(candidates, key=lambda t: t.team_id is None, default=None)


def _not_found(selector: str) -> errors.Invalid:
    # 422, not 404: the SDK reads a 404 on create as "sandbox not found".
    return errors.Invalid(f"Template '{selector}' not found.", code="template_not_found")


def _pinned(template: Template, pin: str, selector: str) -> TemplateVersion:
    """`pin` is a version string, a tag, or a version id, in that order."""
    versions = template.versions.filter(deleted_at__isnull=True)
    match = versions.filter(version=pin).first()
    if match is None:
        tag = template.tags.select_related("version").filter(tag=pin).first()
        match = tag.version if tag else None
    if match is None and (pk := ids.db_id(pin)) is not None:
        match = versions.filter(pk=pk).first()
    if match is None:
        raise _not_found(selector)
    return match


def _latest_ready(template: Template, selector: str) -> TemplateVersion:
    version = (
        template.versions.filter(status=VersionStatus.READY, deleted_at__isnull=True)
        .order_by("-built_at", "-pk")
        .first()
    )
    if version is None:
        raise errors.Invalid(f"Template '{selector}' has no ready version yet.", code="template_not_ready")
    return version


def _ready(version: TemplateVersion, selector: str) -> TemplateVersion:
    if version.status != VersionStatus.READY:
        raise errors.Invalid(
            f"Template version '{selector}' is {version.status}; only ready versions can run.",
            code="template_not_ready",
        )
    return version


def template_version_resolve(*, team: Team, selector: str) -> TemplateVersion:
    """`slug` → latest ready version; `slug:version`, `slug:<version id>` → that version."""
    slug, _, pin = selector.partition(":")
    template = _template_by_slug(team, slug)
    if template is None:
        raise _not_found(selector)
    if pin:
        return _ready(_pinned(template, pin, selector), selector)
    return _latest_ready(template, selector)


def templates_of_teams(*, teams: QuerySet[Team]) -> QuerySet[Template]:
    """Templates of these teams plus the provider's, for listings (deleted ones are gone)."""
    return Template.objects.filter(
        Q(team__in=teams) | Q(team__isnull=True), deleted_at__isnull=True
    ).select_related("team")


def template_get(*, teams: QuerySet[Team], template_id: str) -> Template:
    """A visible template by id; anything else (other teams', malformed ids) is 404."""
    template = None
    if (pk := ids.db_id(template_id)) is not None:
        template = templates_of_teams(teams=teams).filter(pk=pk).first()
    if template is None:
        raise errors.NotFound(f"Template {template_id} not found.", code="template_not_found")
    return template


def template_by_id_or_alias(*, teams: QuerySet[Team], value: str) -> Template:
    """`/templates/{id_or_alias}`: a visible template by id or slug (own before provider)."""
    visible = templates_of_teams(teams=teams)
    pk = ids.db_id(value)
    match = visible.filter(pk=pk).first() if pk is not None else None
    if match is None:
        match = min(visible.filter(slug=value), key=lambda t: t.team_id is None, default=None)
    if match is None:
        raise errors.NotFound(f"Template '{value}' not found.", code="template_not_found")
    return match


def template_version_get(*, template: Template, version_id: str) -> TemplateVersion:
    versions = template.versions.filter(deleted_at__isnull=True)
    pk = ids.db_id(version_id)
    version = versions.filter(pk=pk).first() if pk is not None else None
    if version is None:
        raise errors.NotFound(f"Template version {version_id} not found.", code="template_version_not_found")
    return version


def template_version_by_id(*, team: Team, version_id: int) -> TemplateVersion:
    version = (
        TemplateVersion.objects.select_related("template")
        .filter(pk=version_id, template__in=templates_visible(team=team), deleted_at__isnull=True)
        .first()
    )
    if version is None:
        raise _not_found(str(version_id))
    return _ready(version, str(version_id))


def template_version_for_target(*, teams: QuerySet[Team], target: str) -> TemplateVersion:
    """`alias` → latest ready version; `alias:tag`, `alias:version`, `alias:<id>` → that one."""
    slug, _, pin = target.partition(":")
    template = template_by_id_or_alias(teams=teams, value=slug)
    return _pinned(template, pin, target) if pin else _latest_ready(template, target)

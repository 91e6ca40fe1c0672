"""Reads for templates, from the point of view of a team."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from teams.models import Team
from templates_app.models import Template, TemplateVersion, VersionStatus
from watasu import errors


def templates_visible(*, team: Team) -> QuerySet[Template]:
    """The team's own templates and the provider's."""
    return Template.objects.filter(Q(team=team) | Q(team__isnull=True))


def _template_by_slug(team: Team, slug: str) -> Template | None:
    # A team's own template shadows a provider template of the same slug.
    candidates = templates_visible(team=team).filter(slug=slug)
    return min(candidates, key=lambda t: t.team_id is None, default=None)


def _not_found(selector: str) -> errors.Invalid:
    # 422, not 404: the SDK reads a 404 on create as "sandbox not found".
    return errors.Invalid(f"Template '{selector}' not found.", code="template_not_found")


def _pinned(template: Template, pin: str, selector: str) -> TemplateVersion:
    versions = template.versions.all()
    match = versions.filter(version=pin).first()
    if match is None and pin.isdigit():
        match = versions.filter(pk=int(pin)).first()
    if match is None:
        raise _not_found(selector)
    return match


def _latest_ready(template: Template, selector: str) -> TemplateVersion:
    version = template.versions.filter(status=VersionStatus.READY).order_by("-built_at", "-pk").first()
    if version is None:
        raise errors.Invalid(f"Template '{selector}' has no ready version yet.",
                             code="template_not_ready")
    return version


def _ready(version: TemplateVersion, selector: str) -> TemplateVersion:
    if version.status != VersionStatus.READY:
        raise errors.Invalid(
            f"Template version '{selector}' is {version.status}; only ready versions can run.",
            code="template_not_ready")
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


def template_version_by_id(*, team: Team, version_id: int) -> TemplateVersion:
    version = (TemplateVersion.objects.select_related("template")
               .filter(pk=version_id, template__in=templates_visible(team=team)).first())
    if version is None:
        raise _not_found(str(version_id))
    return _ready(version, str(version_id))

"""Template, volume and checkpoint pages.

Templates: the team's and the provider's, each template's versions and tags, one version's
build with its live log (htmx polling that stops with status 286 once the build is over),
and cancelling or retrying a build. Volumes: create, delete, and a read-only file browser
of a detached volume. Checkpoints: restore into a new sandbox, delete.

Every write calls the service the API calls and is recorded in the team's audit log.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.db.models import Prefetch, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET, require_POST

from dashboard.access import TeamAccess, team_page
from dashboard.actions import perform
from sandboxes import checkpoints as checkpoint_services
from sandboxes import selectors as sandbox_selectors
from sandboxes import services as sandbox_services
from sandboxes.models import Checkpoint
from teams.models import Team
from teams.services import audit_record
from templates_app import selectors as template_selectors
from templates_app import services as template_services
from templates_app.api.serializers import TAG
from templates_app.builds import build_cancel, build_log_entries, build_retry
from templates_app.models import BuildLogEntry, Template, TemplateVersion, VersionStatus
from volumes import engine
from volumes import services as volume_services
from volumes.api.serializers import PathQuerySerializer
from volumes.models import Volume
from volumes.selectors import volumes_of_teams
from watasu import errors, ids

T = TypeVar("T")

# The build log: the page shows its last lines, each poll at most this many new ones.
LOG_PAGE_LINES = 2000
LOG_POLL_LINES = 500
# After a build ends its worker may still write a few lines (the "ready" line, a cancelled
# build's teardown): polling stops after this many polls in a row brought nothing new.
QUIET_POLLS_TO_STOP = 10
RUNNING = (VersionStatus.DRAFT, VersionStatus.BUILDING)
READ_ONLY = "Your role in this team ({role}) is read-only."
TAG_RULE = "A tag is 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit."
PROVIDER_READ_ONLY = "Provider templates belong to the platform and are read-only."


def _team(access: TeamAccess) -> QuerySet[Team]:
    return Team.objects.filter(pk=access.team.pk)


def _found(lookup: Callable[[], T]) -> T:
    """A selector's 404 as the dashboard's (another team's object looks like none)."""
    try:
        return lookup()
    except errors.NotFound as exc:
        raise Http404(exc.message) from exc


def _audit(access: TeamAccess, action: str, target: object, **detail: object) -> None:
    audit_record(
        team=access.team, actor=access.user, action=action, target=target, source="dashboard", **detail
    )


def _done(request: HttpRequest, run: Callable[[], T], success: str) -> T | None:
    """`perform` for actions whose success message needs no result."""
    return perform(request, run, success=success)


# --- templates ------------------------------------------------------------------------------


def _versions_prefetch() -> Prefetch[Any]:
    """Live versions, newest first, without their (possibly large) specs, with their tags."""
    versions = (
        TemplateVersion.objects.filter(deleted_at__isnull=True)
        .defer("build_spec", "env_encrypted")
        .prefetch_related("tags")
        .order_by("-pk")
    )
    return Prefetch("versions", queryset=versions, to_attr="live_versions")


@dataclass(frozen=True)
class TemplateRow:
    template: Template
    latest: TemplateVersion | None  # the newest version, whatever its status
    ready: TemplateVersion | None  # the newest ready one: what a sandbox starts from
    tags: list[tuple[str, str]]  # (tag, version name)


def _template_row(template: Template) -> TemplateRow:
    versions: list[TemplateVersion] = template.live_versions  # type: ignore[attr-defined]
    names = {v.pk: v.version for v in versions}
    ready = next((v for v in versions if v.status == VersionStatus.READY), None)
    tags = [(t.tag, names.get(t.version_id, "?")) for t in template.tags.all()]
    return TemplateRow(template, versions[0] if versions else None, ready, tags)


def _template(access: TeamAccess, template_id: str) -> Template:
    return _found(lambda: template_selectors.template_get(teams=_team(access), template_id=template_id))


def _version(template: Template, version_id: str) -> TemplateVersion:
    return _found(lambda: template_selectors.template_version_get(template=template, version_id=version_id))


def _why_not_editable(access: TeamAccess, template: Template) -> str:
    """'' when the user may change the template, else why not (a disabled button's title)."""
    if template.team_id is None:
        return PROVIDER_READ_ONLY
    return "" if access.can_write else READ_ONLY.format(role=access.role)


def _duration(version: TemplateVersion) -> timedelta | None:
    """How long the build took, or has been running."""
    if version.build_started_at is None:
        return None
    if version.built_at is not None and version.status == VersionStatus.READY:
        return version.built_at - version.build_started_at
    if version.status == VersionStatus.BUILDING:
        return timezone.now() - version.build_started_at
    return None


def duration_text(delta: timedelta | None) -> str:
    if delta is None:
        return ""
    seconds = max(0, int(delta.total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


@team_page()
@require_GET
def templates(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    found = (
        template_selectors.templates_of_teams(teams=_team(access))
        .prefetch_related(_versions_prefetch(), "tags")
        .order_by("slug", "pk")
    )
    rows = [_template_row(t) for t in found]
    return render(request, "dashboard/templates/list.html", {"rows": rows})


@dataclass(frozen=True)
class VersionRow:
    version: TemplateVersion
    duration: str
    tags: list[str]


@team_page()
@require_GET
def template(request: HttpRequest, access: TeamAccess, template_id: str) -> HttpResponse:
    found = _template(access, template_id)
    versions = (
        found.versions.filter(deleted_at__isnull=True)
        .defer("build_spec", "env_encrypted")
        .prefetch_related("tags")
        .order_by("-pk")
    )
    rows = [VersionRow(v, duration_text(_duration(v)), sorted(t.tag for t in v.tags.all())) for v in versions]
    context = {
        "template": found,
        "rows": rows,
        "tags": list(found.tags.select_related("version")),
        "locked": _why_not_editable(access, found),
    }
    return render(request, "dashboard/templates/detail.html", context)


def _log_start(version: TemplateVersion) -> int:
    """Where the page's log starts: its last LOG_PAGE_LINES lines."""
    last = version.log_entries.order_by("-index").values_list("index", flat=True).first()
    return 0 if last is None else max(0, last + 1 - LOG_PAGE_LINES)


def _version_context(access: TeamAccess, version: TemplateVersion) -> dict[str, Any]:
    return {
        "template": version.template,
        "version": version,
        "running": version.status in RUNNING,
        "duration": duration_text(_duration(version)),
        "locked": _why_not_editable(access, version.template),
    }


@team_page()
@require_GET
def template_version(
    request: HttpRequest, access: TeamAccess, template_id: str, version_id: str
) -> HttpResponse:
    version = _version(_template(access, template_id), version_id)
    start = _log_start(version)
    entries = build_log_entries(version=version, offset=start)
    context = {
        **_version_context(access, version),
        "entries": entries,
        "skipped": start,
        "next_offset": entries[-1].index + 1 if entries else start,
        "quiet": 0,
        "polling": version.status in RUNNING,
    }
    return render(request, "dashboard/templates/version.html", context)


def _query_count(request: HttpRequest, name: str) -> int:
    return ids.count(request.GET.get(name, "0"), maximum=2**31 - 1) or 0


@team_page()
@require_GET
def template_version_log(
    request: HttpRequest, access: TeamAccess, template_id: str, version_id: str
) -> HttpResponse:
    """New log lines from `offset` on, appended by the page's poller, which this answer
    replaces (out of band) with one asking from the next offset. The status block is sent
    along when the status changed from the one the page shows (`status`). Once the build is
    over and QUIET_POLLS_TO_STOP polls brought nothing, the answer is 286: htmx stops polling."""
    version = _version(_template(access, template_id), version_id)
    offset, quiet = _query_count(request, "offset"), _query_count(request, "quiet")
    running = version.status in RUNNING  # read before the lines: none written before it is missed
    entries: list[BuildLogEntry] = build_log_entries(version=version, offset=offset)[:LOG_POLL_LINES]
    quiet = 0 if running or entries else quiet + 1
    stop = not running and quiet >= QUIET_POLLS_TO_STOP
    context = {
        **_version_context(access, version),
        "entries": entries,
        "next_offset": entries[-1].index + 1 if entries else offset,
        "quiet": quiet,
        "polling": not stop,
        "status_changed": request.GET.get("status") != version.status,
    }
    response = render(request, "dashboard/templates/_log_poll.html", context)
    if stop:
        response.status_code = 286
    return response


def _to_version(access: TeamAccess, version: TemplateVersion) -> HttpResponseRedirect:
    return redirect(
        "dashboard:template-version",
        team=access.team.slug,
        template_id=version.template_id,
        version_id=version.pk,
    )


def _to_template(access: TeamAccess, template_id: int) -> HttpResponseRedirect:
    return redirect("dashboard:template", team=access.team.slug, template_id=template_id)


@team_page(write=True)
@require_POST
def template_build_cancel(
    request: HttpRequest, access: TeamAccess, template_id: str, version_id: str
) -> HttpResponseRedirect:
    version = _version(_template(access, template_id), version_id)
    run = lambda: build_cancel(user=access.user, version=version, source="dashboard")  # noqa: E731
    _done(request, run, f"Build {version.version} cancelled.")
    return _to_version(access, version)


@team_page(write=True)
@require_POST
def template_build_retry(
    request: HttpRequest, access: TeamAccess, template_id: str, version_id: str
) -> HttpResponseRedirect:
    version = _version(_template(access, template_id), version_id)
    run = lambda: build_retry(user=access.user, version=version, source="dashboard")  # noqa: E731
    retried = perform(request, run)
    if retried is None:
        return _to_version(access, version)
    messages.success(request, f"Build {retried.version} queued: a retry of {version.version}.")
    return _to_version(access, retried)


@team_page(write=True)
@require_POST
def template_version_delete(
    request: HttpRequest, access: TeamAccess, template_id: str, version_id: str
) -> HttpResponseRedirect:
    version = _version(_template(access, template_id), version_id)

    def run() -> None:
        template_services.template_version_delete(user=access.user, version=version)
        _audit(access, "template.version_delete", version.pk, template=version.template.slug)

    _done(request, run, f"Version {version.version} deleted.")
    return _to_template(access, version.template_id)


@team_page(write=True)
@require_POST
def template_delete(request: HttpRequest, access: TeamAccess, template_id: str) -> HttpResponseRedirect:
    found = _template(access, template_id)

    def run() -> bool:
        template_services.template_delete(user=access.user, template=found)
        _audit(access, "template.delete", found.pk, template=found.slug)
        return True

    if not perform(request, run, success=f"Template {found.slug} deleted."):
        return _to_template(access, found.pk)
    return redirect("dashboard:templates", team=access.team.slug)


@team_page(write=True)
@require_POST
def template_tag_assign(request: HttpRequest, access: TeamAccess, template_id: str) -> HttpResponseRedirect:
    found = _template(access, template_id)
    tag = request.POST.get("tag", "").strip()
    version = _found(
        lambda: template_selectors.template_version_get(
            template=found, version_id=request.POST.get("version", "")
        )
    )
    if not re.fullmatch(TAG, tag):
        messages.error(request, TAG_RULE)
        return _to_template(access, found.pk)

    def run() -> None:
        # By id, then version name: never another template of the same slug.
        target = f"{found.pk}:{version.version}"
        template_services.template_tags_assign(user=access.user, target=target, tags=[tag])
        _audit(access, "template.tag_assign", found.pk, template=found.slug, tag=tag, version=version.version)

    _done(request, run, f"{found.slug}:{tag} now points at version {version.version}.")
    return _to_template(access, found.pk)


@team_page(write=True)
@require_POST
def template_tag_remove(request: HttpRequest, access: TeamAccess, template_id: str) -> HttpResponseRedirect:
    found = _template(access, template_id)
    tag = request.POST.get("tag", "")

    def run() -> None:
        template_services.template_tags_remove(user=access.user, name=str(found.pk), tags=[tag])
        _audit(access, "template.tag_remove", found.pk, template=found.slug, tag=tag)

    _done(request, run, f"Tag {tag} removed from {found.slug}.")
    return _to_template(access, found.pk)


# --- volumes --------------------------------------------------------------------------------


def _volume(access: TeamAccess, volume_id: str) -> Volume:
    pk = ids.db_id(volume_id)
    volume = (
        Volume.objects.select_related("team", "host", "holder").filter(team=access.team, pk=pk).first()
        if pk is not None
        else None
    )
    if volume is None:
        raise Http404("No such volume.")
    return volume


@team_page()
@require_GET
def volumes(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    context = {
        "volumes": list(volumes_of_teams(teams=_team(access))),
        "size_gib": settings.VOLUME_SIZE_GIB,
        "locked": "" if access.can_write else READ_ONLY.format(role=access.role),
    }
    return render(request, "dashboard/volumes/list.html", context)


@team_page(write=True)
@require_POST
def volume_create(request: HttpRequest, access: TeamAccess) -> HttpResponseRedirect:
    name = request.POST.get("name", "").strip()

    def run() -> Volume:
        volume = volume_services.volume_create(user=access.user, name=name, team=access.team.slug)
        _audit(access, "volume.create", volume.pk, name=volume.name)
        return volume

    created = perform(request, run, success=f"Volume {name} created.")
    if created is None:
        return redirect("dashboard:volumes", team=access.team.slug)
    return redirect("dashboard:volume", team=access.team.slug, volume_id=created.pk)


@team_page(write=True)
@require_POST
def volume_delete(request: HttpRequest, access: TeamAccess, volume_id: str) -> HttpResponseRedirect:
    volume = _volume(access, volume_id)

    def run() -> bool:
        volume_services.volume_delete(volume=volume)
        _audit(access, "volume.delete", volume.pk, name=volume.name)
        return True

    if not perform(request, run, success=f"Volume {volume.name} deleted."):
        return redirect("dashboard:volume", team=access.team.slug, volume_id=volume.pk)
    return redirect("dashboard:volumes", team=access.team.slug)


def volume_path_problem(raw: str) -> str | None:
    """Why `raw` is not a path inside a volume, in the API's words, or None."""
    query = PathQuerySerializer(data={"path": raw})
    if not query.is_valid():
        return f"path: {query.errors['path'][0]}"
    try:
        engine.split_path(raw)
    except engine.EngineError as exc:
        return str(exc.message)
    return None


@dataclass(frozen=True)
class EntryRow:
    name: str  # non-UTF-8 bytes shown as \xNN
    type: str
    size: int
    mode: str
    mtime: str
    query: str | None  # `path=...` to open a directory or download a file; None: not addressable


def _entry_row(entry: engine.Entry) -> EntryRow:
    shown = entry.as_dict()
    try:
        query: str | None = urlencode({"path": entry.path.encode("utf-8").decode()})
    except UnicodeEncodeError:  # a name that is not UTF-8 cannot travel in a URL intact
        query = None
    mtime = entry.mtime.replace("T", " ").removesuffix("Z")
    return EntryRow(str(shown["name"]), entry.type, entry.size, str(shown["mode"]), mtime, query)


def _crumbs(raw: str) -> list[tuple[str, str]]:
    """(name, `path=...`) for each directory from the root to `raw`."""
    crumbs, so_far = [("/", urlencode({"path": "/"}))], ""
    for part in engine.split_path(raw):
        so_far += "/" + part.decode("utf-8", "replace")
        crumbs.append((part.decode("utf-8", "replace"), urlencode({"path": so_far})))
    return crumbs


@team_page()
@require_GET
def volume(request: HttpRequest, access: TeamAccess, volume_id: str) -> HttpResponse:
    found = _volume(access, volume_id)
    raw = request.GET.get("path", "/")
    problem = volume_path_problem(raw)
    rows: list[EntryRow] = []
    crumbs = [("/", urlencode({"path": "/"}))]
    if problem is None:
        crumbs = _crumbs(raw)
        try:
            entries = volume_services.detached(found, engine.list_dir, raw, depth=1)
            rows = [_entry_row(e) for e in entries]
        except errors.DomainError as exc:
            problem = exc.message
    context = {
        "volume": found,
        "path": raw,
        "rows": rows,
        "crumbs": crumbs,
        "problem": problem,
        "max_file_bytes": settings.VOLUME_MAX_FILE_BYTES,
        "locked": "" if access.can_write else READ_ONLY.format(role=access.role),
    }
    return render(request, "dashboard/volumes/detail.html", context)


@team_page()
@require_GET
def volume_download(request: HttpRequest, access: TeamAccess, volume_id: str) -> HttpResponse:
    found = _volume(access, volume_id)
    raw = request.GET.get("path", "")
    problem = volume_path_problem(raw)
    if problem is None:
        limit = settings.VOLUME_MAX_FILE_BYTES
        try:
            data = volume_services.detached(found, engine.read_file, raw, max_bytes=limit)
        except errors.DomainError as exc:
            problem = exc.message
    if problem is not None:
        messages.error(request, problem)
        parent = raw.rsplit("/", 1)[0] or "/"
        parent = parent if volume_path_problem(parent) is None else "/"
        target = reverse("dashboard:volume", args=[access.team.slug, found.pk])
        return redirect(f"{target}?{urlencode({'path': parent})}")
    name = engine.split_path(raw)[-1].decode("utf-8", "replace")
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = content_disposition_header(True, name)
    return response


# --- checkpoints ----------------------------------------------------------------------------


def _checkpoint(access: TeamAccess, checkpoint_id: str) -> Checkpoint:
    pk = ids.db_id(checkpoint_id)
    found = (
        sandbox_selectors.checkpoints_of_teams(teams=_team(access))
        .select_related("team", "template_version")
        .filter(pk=pk)
        .first()
        if pk is not None
        else None
    )
    if found is None:
        raise Http404("No such checkpoint.")
    return found


@team_page()
@require_GET
def checkpoints(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    found = sandbox_selectors.checkpoints_of_teams(teams=_team(access)).select_related(
        "template_version__template"
    )
    context = {
        "checkpoints": list(found),
        "locked": "" if access.can_write else READ_ONLY.format(role=access.role),
    }
    return render(request, "dashboard/checkpoints/list.html", context)


@team_page(write=True)
@require_POST
def checkpoint_restore(request: HttpRequest, access: TeamAccess, checkpoint_id: str) -> HttpResponseRedirect:
    found = _checkpoint(access, checkpoint_id)

    def run() -> int:
        sandbox, _ = sandbox_services.sandbox_restore(user=access.user, checkpoint=found)
        _audit(access, "sandbox.restore", sandbox.pk, checkpoint=found.pk, source_sandbox=found.sandbox_id)
        return int(sandbox.pk)

    restored = perform(request, run)
    if restored is None:
        return redirect("dashboard:checkpoints", team=access.team.slug)
    messages.success(request, f"Checkpoint {found.pk} restored into sandbox {restored}.")
    return redirect("dashboard:sandbox", access.team.slug, restored)


@team_page(write=True)
@require_POST
def checkpoint_delete(request: HttpRequest, access: TeamAccess, checkpoint_id: str) -> HttpResponseRedirect:
    found = _checkpoint(access, checkpoint_id)

    def run() -> None:
        if not checkpoint_services.checkpoint_delete(checkpoint=found):
            raise errors.NotFound(f"Checkpoint {found.pk} was already deleted.")
        _audit(access, "checkpoint.delete", found.pk, sandbox=found.sandbox_id, name=found.name)

    _done(request, run, f"Checkpoint {found.name or found.pk} deleted.")
    return redirect("dashboard:checkpoints", team=access.team.slug)


urls = [
    path("templates", templates, name="templates"),
    path("templates/<str:template_id>", template, name="template"),
    path("templates/<str:template_id>/delete", template_delete, name="template-delete"),
    path("templates/<str:template_id>/tags", template_tag_assign, name="template-tag-assign"),
    path("templates/<str:template_id>/tags/remove", template_tag_remove, name="template-tag-remove"),
    path("templates/<str:template_id>/versions/<str:version_id>", template_version, name="template-version"),
    path(
        "templates/<str:template_id>/versions/<str:version_id>/log",
        template_version_log,
        name="template-version-log",
    ),
    path(
        "templates/<str:template_id>/versions/<str:version_id>/delete",
        template_version_delete,
        name="template-version-delete",
    ),
    path(
        "templates/<str:template_id>/versions/<str:version_id>/cancel",
        template_build_cancel,
        name="template-build-cancel",
    ),
    path(
        "templates/<str:template_id>/versions/<str:version_id>/retry",
        template_build_retry,
        name="template-build-retry",
    ),
    path("volumes", volumes, name="volumes"),
    path("volumes/new", volume_create, name="volume-create"),
    path("volumes/<str:volume_id>", volume, name="volume"),
    path("volumes/<str:volume_id>/delete", volume_delete, name="volume-delete"),
    path("volumes/<str:volume_id>/download", volume_download, name="volume-download"),
    path("checkpoints", checkpoints, name="checkpoints"),
    path("checkpoints/<str:checkpoint_id>/restore", checkpoint_restore, name="checkpoint-restore"),
    path("checkpoints/<str:checkpoint_id>/delete", checkpoint_delete, name="checkpoint-delete"),
]

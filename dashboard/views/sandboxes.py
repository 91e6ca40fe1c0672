"""Sandbox pages: the live list, one sandbox's page (state, events, metrics, actions),
its web terminal's ticket and its file browser.

Every write calls the service the API calls and is recorded in the team's audit log.
The terminal and the file browser reach inside the sandbox: like the API's data plane
(a write key's session, its signed download URLs), they are for roles that may write;
viewers see the sandbox from the outside only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import django_filters
from django import forms
from django.conf import settings
from django.contrib import messages
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from billing.selectors import team_require_active
from dashboard.access import TeamAccess, team_page
from dashboard.actions import perform
from sandboxes import checkpoints, selectors, services
from sandboxes.edge.routing import AGENT_PORT
from sandboxes.edge.signing import file_url_make
from sandboxes.filters import STATE_CHOICES, SandboxFilter
from sandboxes.models import Sandbox, SandboxEvent, SandboxState
from sandboxes.runtime import vm
from sandboxes.runtime.agent_client import DATAPLANE, AgentClient, AgentError, role_secret
from sandboxes.sessions import dashboard_ticket_mint, data_plane_url
from teams.models import Team
from teams.services import audit_record
from watasu import errors, ids

PAGE_SIZE = 50
EVENTS_SHOWN = 100
CHECKPOINTS_SHOWN = 20
FILES_TIMEOUT = 5.0
# Where the file browser opens when no directory is asked for: the first that exists.
DEFAULT_DIRECTORIES = ("/workspace", "/home/user", "/root", "/")
FILE_URL_TTL = 300
SERVING_STATES = (SandboxState.READY, SandboxState.CHECKPOINTING)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- the list ------------------------------------------------------------------------------


class DashboardSandboxFilter(SandboxFilter):
    """The API's filters (state, exact metadata) and the template the sandbox started from."""

    template = django_filters.CharFilter(field_name="template__slug", label="Template slug")


def _metadata_pairs(raw: list[str]) -> tuple[dict[str, str], str | None]:
    """`key=value` pairs, comma-separated, from each `metadata` parameter; or why not."""
    pairs: dict[str, str] = {}
    for text in raw:
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                return {}, f"metadata: write key=value (got {item!r})."
            pairs[key.strip()] = value.strip()
    return pairs, None


@dataclass(frozen=True)
class SandboxPage:
    rows: list[Sandbox]
    newer: int | None  # `after=` for the newer page, None on the first page
    older: int | None  # `before=` for the older page, None on the last


def _page(queryset: QuerySet[Sandbox], query: QueryDict) -> SandboxPage:
    """50 rows, newest first, by id keyset (`before=`/`after=`): fast at any depth."""
    before, after = ids.db_id(query.get("before", "")), ids.db_id(query.get("after", ""))
    if after is not None:
        rows = list(queryset.filter(pk__gt=after).order_by("id")[: PAGE_SIZE + 1])
        more_newer = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE][::-1]
        older = rows[-1].pk if rows else None
        return SandboxPage(rows, rows[0].pk if rows and more_newer else None, older)
    if before is not None:
        queryset = queryset.filter(pk__lt=before)
    rows = list(queryset.order_by("-id")[: PAGE_SIZE + 1])
    more_older = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    newer = rows[0].pk if rows and before is not None else None
    return SandboxPage(rows, newer, rows[-1].pk if rows and more_older else None)


def _query_without(query: QueryDict, *names: str) -> str:
    kept = query.copy()
    for name in names:
        kept.pop(name, None)
    return kept.urlencode()


@team_page()
@require_GET
def sandbox_list(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    query = request.GET
    metadata, problem = _metadata_pairs(query.getlist("metadata"))
    data = {"state": query.getlist("state"), "metadata": metadata, "template": query.get("template", "")}
    teams = Team.objects.filter(pk=access.team.pk)
    filterset = DashboardSandboxFilter(data, queryset=selectors.sandboxes_of_teams(teams=teams))
    problems = [problem] if problem else []
    if not problems and not filterset.is_valid():
        problems = [f"{name}: {message}" for name, found in filterset.errors.items() for message in found]
    page = SandboxPage([], None, None) if problems else _page(filterset.qs, query)
    filters = _query_without(query, "before", "after", "partial")
    context = {
        "page": page,
        "problems": problems,
        "filters": filters,
        "refresh": _query_without(query, "partial"),
        "state_choices": STATE_CHOICES,
        "chosen_states": query.getlist("state"),
        "metadata_text": ", ".join(query.getlist("metadata")),
        "template_slug": query.get("template", ""),
    }
    if query.get("partial"):
        return render(request, "dashboard/sandboxes/_rows.html", context)
    return render(request, "dashboard/sandboxes/list.html", context)


# --- one sandbox -----------------------------------------------------------------------------


def _sandbox(access: TeamAccess, sandbox_id: str) -> Sandbox:
    """The team's sandbox of that id; anything else (another team's too) is a 404."""
    try:
        sandbox = selectors.sandbox_get(user=access.user, sandbox_id=sandbox_id)
    except errors.NotFound as exc:
        raise Http404(exc.message) from exc
    if sandbox.team_id != access.team.pk:
        raise Http404("No such sandbox in this team.")
    return sandbox


def _events(sandbox: Sandbox) -> list[SandboxEvent]:
    newest = SandboxEvent.objects.filter(sandbox=sandbox).order_by("-at", "-pk")[:EVENTS_SHOWN]
    return list(newest)


def _port_preview(sandbox: Sandbox, raw: str) -> tuple[dict[str, object] | None, str]:
    if not raw:
        return None, ""
    number = ids.count(raw, maximum=65535)
    if not number:
        return None, "A port is a number between 1 and 65535."
    if number == AGENT_PORT:
        return None, f"Port {AGENT_PORT} is the platform's agent in the sandbox; preview any other port."
    if sandbox.state == SandboxState.DESTROYED:
        return None, services.destroyed_message(sandbox.pk)
    return selectors.sandbox_port(sandbox=sandbox, port=number), ""


@team_page()
@require_GET
def sandbox_detail(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponse:
    sandbox = _sandbox(access, sandbox_id)
    context: dict[str, Any] = {"sandbox": sandbox, "events": _events(sandbox)}
    if request.GET.get("partial") == "state":
        return render(request, "dashboard/sandboxes/_state.html", context)
    preview, port_problem = _port_preview(sandbox, request.GET.get("port", ""))
    teams = Team.objects.filter(pk=access.team.pk)
    context |= {
        "checkpoints": list(
            selectors.checkpoints_of_teams(teams=teams, sandbox_id=str(sandbox.pk))[:CHECKPOINTS_SHOWN]
        ),
        "preview": preview,
        "port_problem": port_problem,
        "port": request.GET.get("port", ""),
        "max_timeout": settings.SANDBOX_MAX_TIMEOUT_SECONDS,
        "live": sandbox.state != SandboxState.DESTROYED,
        "public_traffic": bool(sandbox.network_policy.get("allow_public_traffic", True)),
        "write_reason": "" if access.can_write else f"Your role ({access.role}) may not change sandboxes.",
    }
    return render(request, "dashboard/sandboxes/detail.html", context)


@team_page()
@require_GET
def sandbox_metrics(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> JsonResponse:
    """The VM's current sample (the page's chart polls it and keeps the history)."""
    sample = vm.metrics(_sandbox(access, sandbox_id))
    return JsonResponse({"metrics": [sample] if sample else []})


# --- actions ---------------------------------------------------------------------------------


class TimeoutForm(forms.Form):
    timeout = forms.IntegerField(min_value=1)

    def clean_timeout(self) -> int:
        value: int = self.cleaned_data["timeout"]
        if value > settings.SANDBOX_MAX_TIMEOUT_SECONDS:
            raise forms.ValidationError(f"at most {settings.SANDBOX_MAX_TIMEOUT_SECONDS} seconds.")
        return value


class CheckpointForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, strip=False)

    def clean_name(self) -> str:
        name: str = self.cleaned_data["name"]
        if _CONTROL.search(name):
            raise forms.ValidationError("must not contain control characters.")
        return name


def _form_problem(form: forms.Form) -> str:
    return "; ".join(f"{name}: {message}" for name, found in form.errors.items() for message in found)


def _act(
    request: HttpRequest,
    access: TeamAccess,
    sandbox: Sandbox,
    action: str,
    run: Callable[[], object],
    success: str,
    **detail: object,
) -> HttpResponseRedirect:
    """Run one service on the sandbox; a success is audited, a refusal shown as a message."""
    if perform(request, run, success=success) is not None:
        _audit(access, action, sandbox, **detail)
    return redirect("dashboard:sandbox", team=access.team.slug, sandbox_id=sandbox.pk)


def _audit(access: TeamAccess, action: str, sandbox: Sandbox, **detail: object) -> None:
    team, actor = access.team, access.user
    audit_record(team=team, actor=actor, action=action, target=sandbox.pk, source="dashboard", **detail)


def _not_destroyed(sandbox: Sandbox) -> None:
    if sandbox.state == SandboxState.DESTROYED:
        raise services.sandbox_gone(sandbox.pk)


@team_page(write=True)
@require_POST
def sandbox_pause(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponseRedirect:
    sandbox = _sandbox(access, sandbox_id)
    run = lambda: services.sandbox_pause(sandbox=sandbox)  # noqa: E731
    done = f"Sandbox {sandbox.pk} paused: its state is stopped, its memory and disk are kept."
    return _act(request, access, sandbox, "sandbox.pause", run, done)


@team_page(write=True)
@require_POST
def sandbox_resume(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponseRedirect:
    sandbox = _sandbox(access, sandbox_id)
    run = lambda: services.sandbox_resume(sandbox=sandbox)  # noqa: E731
    done = f"Sandbox {sandbox.pk} is running again (state ready)."
    return _act(request, access, sandbox, "sandbox.resume", run, done)


@team_page(write=True)
@require_POST
def sandbox_timeout(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponseRedirect:
    sandbox = _sandbox(access, sandbox_id)
    form = TimeoutForm(request.POST)
    if not form.is_valid():
        return _refused(request, access, sandbox, _form_problem(form))
    timeout = form.cleaned_data["timeout"]
    run = lambda: services.sandbox_set_timeout(sandbox=sandbox, timeout=timeout)  # noqa: E731
    success = f"Sandbox {sandbox.pk} now ends {timeout} s from now (or that long after its next resume)."
    return _act(request, access, sandbox, "sandbox.timeout", run, success, timeout=timeout)


@team_page(write=True)
@require_POST
def sandbox_checkpoint(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponseRedirect:
    sandbox = _sandbox(access, sandbox_id)
    form = CheckpointForm(request.POST)
    if not form.is_valid():
        return _refused(request, access, sandbox, _form_problem(form))
    name = form.cleaned_data["name"]

    def run() -> object:
        _not_destroyed(sandbox)
        return checkpoints.checkpoint_create(user=access.user, sandbox=sandbox, name=name)

    success = f"Checkpoint {name or '(unnamed)'} of sandbox {sandbox.pk} taken."
    return _act(request, access, sandbox, "sandbox.checkpoint", run, success, name=name)


@team_page(write=True)
@require_POST
def sandbox_kill(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponseRedirect:
    sandbox = _sandbox(access, sandbox_id)
    run = lambda: services.sandbox_destroy(sandbox=sandbox)  # noqa: E731
    return _act(request, access, sandbox, "sandbox.kill", run, f"Sandbox {sandbox.pk} destroyed.")


def _refused(
    request: HttpRequest, access: TeamAccess, sandbox: Sandbox, message: str
) -> HttpResponseRedirect:
    messages.error(request, message)
    return redirect("dashboard:sandbox", team=access.team.slug, sandbox_id=sandbox.pk)


# --- terminal ------------------------------------------------------------------------------------


@team_page(write=True)
@require_POST
def sandbox_terminal(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> JsonResponse:
    """A ticket for the page's terminal to open one process socket on the data plane."""
    sandbox = _sandbox(access, sandbox_id)
    if sandbox.state == SandboxState.DESTROYED:
        message = services.destroyed_message(sandbox.pk)
        return JsonResponse({"error": "sandbox_not_found", "message": message}, status=409)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=access.user)
    base = data_plane_url(sandbox).replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    _audit(access, "sandbox.terminal", sandbox)
    return JsonResponse(
        {
            "url": f"{base}/runtime/v1/process?{urlencode({'ticket': ticket})}",
            "expires_in": settings.DASHBOARD_TICKET_SECONDS,
        }
    )


# --- files --------------------------------------------------------------------------------------


def guest_path(raw: str) -> str:
    """An absolute guest path with no `.`/`..` segment, control character or empty segment
    (a trailing slash is dropped); ValueError saying what is wrong otherwise."""
    if not raw.startswith("/"):
        raise ValueError(f"{raw!r} is not an absolute path: start it with /.")
    if _CONTROL.search(raw):
        raise ValueError("A path may not contain NUL or other control characters.")
    segments = raw.rstrip("/").split("/")[1:]
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"{raw!r} has an empty, '.' or '..' segment; name the directory itself.")
    return "/" + "/".join(segments)


def _agent(sandbox: Sandbox) -> AgentClient:
    """The sandbox's agent with the data-plane credential, as the edge reaches it."""
    client = vm.agent_client(sandbox)  # on its host's address
    secret = role_secret(client.secret or "", DATAPLANE)
    return AgentClient(client.port, secret=secret, host=client.host, timeout=FILES_TIMEOUT)


def _listing(sandbox: Sandbox, directory: str) -> list[dict[str, Any]]:
    query = urlencode({"path": directory, "depth": 1})
    found = _agent(sandbox).request("GET", f"/runtime/v1/directories?{query}")
    entries = found.get("entries") if isinstance(found, dict) else None
    if not isinstance(entries, list):
        raise AgentError(502, {"message": "the agent's listing was not understood"})
    rows = [_entry_row(entry) for entry in entries if isinstance(entry, dict)]
    return sorted(rows, key=lambda row: (row["type"] != "dir", row["name"]))


def _readable(value: object) -> str:
    """Text as a page can show it: a name that is not UTF-8 (lone surrogates from the guest's
    bytes) gets U+FFFD where its bad bytes were, instead of breaking the page."""
    return str(value or "").encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _entry_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One listed entry, with `query` (`path=...`) only when its path can travel in a URL
    and be asked for again: UTF-8, no control characters (names the guest made can be
    anything; those are listed without a link)."""
    path = entry.get("path")
    try:
        query = (
            urlencode({"path": guest_path(path)}, safe="/")
            if isinstance(path, str) and path.isprintable()
            else None
        )
        if query is not None:
            query.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        query = None
    return {
        **entry,
        "name": _readable(entry.get("name")),
        "type": str(entry.get("type", "")),
        "symlink_target": _readable(entry.get("symlink_target")),
        "query": query,
    }


def _parent(directory: str) -> str | None:
    return None if directory == "/" else (directory.rsplit("/", 1)[0] or "/")


def _browse(sandbox: Sandbox, raw: str) -> tuple[str, list[dict[str, Any]]]:
    """The directory listed and its entries; a DomainError/ValueError/AgentError/OSError says why not."""
    if sandbox.state not in SERVING_STATES or not sandbox.agent_port:
        raise errors.Conflict(f"Sandbox {sandbox.pk} is {sandbox.state}; resume it to browse its files.")
    team_require_active(sandbox.team)
    if raw:
        directory = guest_path(raw)
        return directory, _listing(sandbox, directory)
    for candidate in DEFAULT_DIRECTORIES:
        try:
            return candidate, _listing(sandbox, candidate)
        except AgentError as exc:
            if exc.status != 404:
                raise
    raise errors.NotFound("None of the usual directories exists in this sandbox.")


def _agent_message(exc: AgentError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or f"The sandbox's agent answered {exc.status}.")


@team_page(write=True)
@require_GET
def sandbox_files(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponse:
    """The file browser's listing (an HTML fragment the page loads)."""
    sandbox = _sandbox(access, sandbox_id)
    raw = request.GET.get("path", "")
    directory, problem = raw, ""
    entries: list[dict[str, Any]] = []
    try:
        directory, entries = _browse(sandbox, raw)
    except ValueError as exc:
        problem = str(exc)
    except errors.DomainError as exc:
        problem = exc.message
    except AgentError as exc:
        problem = _agent_message(exc)
    except OSError as exc:
        problem = f"The sandbox's agent did not answer ({type(exc).__name__}); try again."
    context = {
        "sandbox": sandbox,
        "directory": directory,
        "parent": _parent(directory) if directory.startswith("/") and not problem else None,
        "entries": entries,
        "problem": problem,
    }
    return render(request, "dashboard/sandboxes/_files.html", context)


@team_page(write=True)
@require_GET
def sandbox_download(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> HttpResponse:
    """To a signed read URL of one file: the bytes stream from the edge, not through Django."""
    sandbox = _sandbox(access, sandbox_id)
    try:
        file_path = guest_path(request.GET.get("path", ""))
        _not_destroyed(sandbox)
    except (ValueError, errors.DomainError) as exc:
        return _refused(request, access, sandbox, getattr(exc, "message", str(exc)))
    url = file_url_make(sandbox, path=file_path, op="read", ttl=FILE_URL_TTL)
    return HttpResponseRedirect(url.url)


@team_page(write=True)
@require_POST
def sandbox_upload_url(request: HttpRequest, access: TeamAccess, sandbox_id: str) -> JsonResponse:
    """A signed write URL for one file of the current directory (the browser posts the file to it)."""
    sandbox = _sandbox(access, sandbox_id)
    name = request.POST.get("name", "")
    try:
        directory = guest_path(request.POST.get("directory", ""))
        if not name or "/" in name or name in (".", "..") or _CONTROL.search(name):
            raise ValueError("A file name may not be empty, '.', '..' or hold '/' or control characters.")
        _not_destroyed(sandbox)
    except ValueError as exc:
        return JsonResponse({"error": "invalid_path", "message": str(exc)}, status=422)
    except errors.DomainError as exc:
        return JsonResponse({"error": exc.code, "message": exc.message}, status=exc.status)
    target = f"{directory.rstrip('/')}/{name}"
    url = file_url_make(sandbox, path=target, op="write", ttl=FILE_URL_TTL)
    _audit(access, "sandbox.upload", sandbox, path=target)
    return JsonResponse({"url": url.url, "path": target})


urls = [
    path("sandboxes", sandbox_list, name="sandboxes"),
    path("sandboxes/<str:sandbox_id>", sandbox_detail, name="sandbox"),
    path("sandboxes/<str:sandbox_id>/metrics", sandbox_metrics, name="sandbox-metrics"),
    path("sandboxes/<str:sandbox_id>/pause", sandbox_pause, name="sandbox-pause"),
    path("sandboxes/<str:sandbox_id>/resume", sandbox_resume, name="sandbox-resume"),
    path("sandboxes/<str:sandbox_id>/timeout", sandbox_timeout, name="sandbox-timeout"),
    path("sandboxes/<str:sandbox_id>/checkpoint", sandbox_checkpoint, name="sandbox-checkpoint"),
    path("sandboxes/<str:sandbox_id>/kill", sandbox_kill, name="sandbox-kill"),
    path("sandboxes/<str:sandbox_id>/terminal", sandbox_terminal, name="sandbox-terminal"),
    path("sandboxes/<str:sandbox_id>/files", sandbox_files, name="sandbox-files"),
    path("sandboxes/<str:sandbox_id>/files/download", sandbox_download, name="sandbox-download"),
    path("sandboxes/<str:sandbox_id>/files/upload-url", sandbox_upload_url, name="sandbox-upload-url"),
]

"""API keys: the signed-in user's own keys (a key is the user's, not a team's).

A key acts in a team with the lesser of its scope and the user's role there: the API
checks the role on every write (teams.selectors.team_for_write), so a viewer's key is
read-only in that team whatever its scope, and a demotion takes effect at once. From a
team where the user is a viewer, the page does not offer (and the server refuses) a
write key.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST, require_safe

from dashboard.access import TeamAccess, team_page
from dashboard.actions import perform
from dashboard.forms import ApiKeyForm
from teams import selectors, services
from teams.models import ApiKey, Scope, User


def _page(
    request: HttpRequest,
    access: TeamAccess,
    *,
    form: ApiKeyForm | None = None,
    created: tuple[ApiKey, str] | None = None,
) -> HttpResponse:
    context = {
        "keys": selectors.api_keys_of_user(user=access.user),
        "form": form or ApiKeyForm(initial={"scope": Scope.WRITE if access.can_write else Scope.READ}),
        "now": timezone.now(),
        "new_key": created[0] if created else None,
        "new_secret": created[1] if created else "",
        # one per form shown: a resubmitted form (a reload of the page that showed a new
        # secret) is recognised instead of making a second key
        "form_token": secrets.token_urlsafe(16),
    }
    return render(
        request, "dashboard/keys/keys.html", context, status=400 if form is not None and form.errors else 200
    )


@team_page()
@require_safe
def keys(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return _page(request, access)


def _audit(user: User, action: str, key: ApiKey) -> None:
    """Keys are the user's: their events go to the user's personal team log."""
    services.audit_record(
        team=services.personal_team_ensure(user=user),
        actor=user,
        action=action,
        target=f"{key.prefix}… {key.name}".strip(),
        source="dashboard",
        scope=key.scope,
    )


@never_cache
@team_page()
@require_POST
def key_create(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    """Create a key and show its secret in this response only (it is never stored)."""
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        return _page(request, access, form=form)
    token, used = request.POST.get("form_token", ""), request.session.get("key_form_tokens", [])
    if token and token in used:
        messages.info(request, "That key was created already; its secret was shown once, when it was made.")
        return redirect("dashboard:keys", access.team.slug)
    if token:
        request.session["key_form_tokens"] = [*used[-19:], token]
    data = form.cleaned_data
    if data["scope"] == Scope.WRITE and not access.can_write:
        raise PermissionDenied(f"Your role in this team ({access.role}) is read-only: create a read key.")
    days = data["expires_days"]
    expires_at = timezone.now() + timedelta(days=days) if days else None
    created = perform(
        request,
        lambda: services.api_key_create(
            user=access.user, scope=data["scope"], name=data["name"], expires_at=expires_at
        ),
    )
    if created is None:
        return redirect("dashboard:keys", access.team.slug)
    _audit(access.user, "api_key.create", created[0])
    messages.success(request, "Key created. Copy it now: it is shown this once.")
    return _page(request, access, created=created)


@team_page()
@require_POST
def key_revoke(request: HttpRequest, access: TeamAccess, key_id: int) -> HttpResponse:
    key = selectors.api_keys_of_user(user=access.user).filter(pk=key_id).first()
    if key is None:
        raise Http404("No such key.")
    if key.revoked_at is None:
        services.api_key_revoke(api_key=key)
        _audit(access.user, "api_key.revoke", key)
        messages.success(request, f"Key {key.prefix}… was revoked; it no longer works.")
    return redirect("dashboard:keys", access.team.slug)


urls = [
    path("keys", keys, name="keys"),
    path("keys/new", key_create, name="key-create"),
    path("keys/<int:key_id>/revoke", key_revoke, name="key-revoke"),
]

"""The dashboard's entry: the user's team, and the team switcher."""

from __future__ import annotations

from typing import cast

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import path

from dashboard.access import team_access
from teams.models import Team, User


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The last team the user looked at (kept in the session), else the personal team."""
    user = cast(User, request.user)  # login_required
    slug = request.session.get("dashboard_team")
    if not slug or not user.memberships.filter(team__slug=slug).exists():
        team = (
            Team.objects.filter(personal_for=user).first()
            or Team.objects.filter(memberships__user=user).first()
        )
        if team is None:
            return redirect("dashboard:account")
        slug = team.slug
    return redirect("dashboard:sandboxes", slug)


@login_required
def switch_team(request: HttpRequest) -> HttpResponse:
    access = team_access(request.user, request.GET.get("team", ""))  # type: ignore[arg-type]
    request.session["dashboard_team"] = access.team.slug
    return redirect("dashboard:sandboxes", access.team.slug)


urls = [
    path("", home, name="home"),
    path("switch", switch_team, name="switch-team"),
]

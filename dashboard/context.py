"""Template context every team page gets: the team switcher and the money banners."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from billing.selectors import balance_of
from teams.models import Membership


def dashboard(request: HttpRequest) -> dict[str, Any]:
    access = getattr(request, "team_access", None)
    if access is None:
        return {}
    memberships = Membership.objects.select_related("team").filter(user=access.user).order_by("team__slug")
    return {
        "access": access,
        "team": access.team,
        "memberships": memberships,
        "balance": balance_of(access.team),
    }

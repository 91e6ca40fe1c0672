"""Who may see and do what in the dashboard: the team in the URL and the user's role in it.

Every team page is `/dashboard/t/<slug>/...`. `team_page` resolves the signed-in user's
membership of that team (none: 404, exactly like a team that does not exist) and refuses
what the role may not do (403). Objects are then always read through the team, so another
team's object is a 404 too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse

from teams.models import WRITER_ROLES, Membership, Role, Team, User

P = ParamSpec("P")


@dataclass(frozen=True)
class TeamAccess:
    """The signed-in user's standing in the team a page is about."""

    user: User
    membership: Membership

    @property
    def team(self) -> Team:
        return self.membership.team

    @property
    def role(self) -> str:
        return self.membership.role

    @property
    def can_write(self) -> bool:
        """Change the team's resources: sandboxes, templates, volumes, its own keys' use."""
        return self.role in WRITER_ROLES

    @property
    def can_manage(self) -> bool:
        """Members, invitations, money: owners and admins."""
        return self.role in (Role.OWNER, Role.ADMIN)

    @property
    def is_owner(self) -> bool:
        return self.role == Role.OWNER


def team_access(user: User, slug: str) -> TeamAccess:
    membership = Membership.objects.select_related("team").filter(user=user, team__slug=slug).first()
    if membership is None:
        raise Http404("No such team.")
    return TeamAccess(user=user, membership=membership)


def team_page(
    *, write: bool = False, manage: bool = False, owner: bool = False
) -> Callable[
    [Callable[Concatenate[HttpRequest, TeamAccess, P], HttpResponse]],
    Callable[..., HttpResponse],
]:
    """Decorate a view taking `(request, access, ...)`, routed with a `team` slug.

    `write`: members and up; `manage`: owners and admins; `owner`: owners only. A
    refusal is 403 (the page the user came from shows no control for it anyway).
    """

    def decorate(
        view: Callable[Concatenate[HttpRequest, TeamAccess, P], HttpResponse],
    ) -> Callable[..., HttpResponse]:
        @login_required
        @functools.wraps(view)
        def wrapper(request: HttpRequest, team: str, *args: Any, **kwargs: Any) -> HttpResponse:
            access = team_access(request.user, team)  # type: ignore[arg-type]
            if (write and not access.can_write) or (manage and not access.can_manage):
                raise PermissionDenied(f"Your role in this team ({access.role}) may not do this.")
            if owner and not access.is_owner:
                raise PermissionDenied("Only the team's owners may do this.")
            request.team_access = access  # type: ignore[attr-defined]
            return view(request, access, *args, **kwargs)

        return wrapper

    return decorate

"""The team page (members, roles, invitations, leaving, deleting) and the audit log.

Every rule (who may change whose role, the last owner, the personal team) lives in
teams.services; these views parse a form, call one service and show its error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST, require_safe

from dashboard.access import TeamAccess, team_page
from dashboard.actions import perform
from dashboard.forms import ConfirmSlugForm, InviteForm, RoleForm
from teams import selectors, services
from teams.models import Membership, Role
from watasu import errors

AUDIT_PAGE_SIZE = 50
T = TypeVar("T")


def _why_not(access: TeamAccess, member: Membership) -> str:
    """Why the signed-in user may not change this member ('' when they may)."""
    if not access.can_manage:
        return "Only owners and admins manage members."
    if member.role == Role.OWNER and not access.is_owner:
        return "Only owners may change or remove owners."
    if access.team.personal_for_id == member.user_id:
        return "The owner of a personal team stays its owner."
    return ""


@team_page()
@require_safe
def team(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    invitations = selectors.invitations_pending(team=access.team) if access.can_manage else []
    members = [(m, _why_not(access, m)) for m in selectors.members_of(team=access.team)]
    context = {
        "members": members,
        "invitations": invitations,
        "roles": Role.values,
        "now": timezone.now(),
        "invite_form": InviteForm(),
    }
    return render(request, "dashboard/team/team.html", context)


def _back(access: TeamAccess) -> HttpResponse:
    return redirect("dashboard:team", access.team.slug)


def _act(request: HttpRequest, action: Callable[[], T], *, success: str = "") -> T | None:
    """`perform`, except that another team's member or invitation is a 404 page."""
    try:
        result = action()
    except errors.NotFound as exc:
        raise Http404(exc.message) from None
    except errors.DomainError as exc:
        messages.error(request, exc.message)
        return None
    if success:
        messages.success(request, success)
    return result


@team_page(manage=True)
@require_POST
def member_role(request: HttpRequest, access: TeamAccess, membership_id: int) -> HttpResponse:
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles.")
        return _back(access)
    role = form.cleaned_data["role"]
    done = _act(
        request,
        lambda: services.membership_set_role(
            actor=access.user, team=access.team, membership_id=membership_id, role=role
        ),
    )
    if done is not None:
        messages.success(request, f"{done.user.email} is now {done.role}.")
    return _back(access)


@team_page(manage=True)
@require_POST
def member_remove(request: HttpRequest, access: TeamAccess, membership_id: int) -> HttpResponse:
    _act(
        request,
        lambda: services.membership_remove(actor=access.user, team=access.team, membership_id=membership_id),
        success="The member was removed.",
    )
    return _back(access)


@team_page(manage=True)
@require_POST
def invitation_create(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    form = InviteForm(request.POST)
    if not form.is_valid():
        for field_errors in form.errors.values():
            messages.error(request, " ".join(str(e) for e in field_errors))
        return _back(access)
    email, role = form.cleaned_data["email"], form.cleaned_data["role"]
    perform(
        request,
        lambda: services.invitation_create(actor=access.user, team=access.team, email=email, role=role),
        success=f"Invitation mailed to {email}.",
    )
    return _back(access)


@team_page(manage=True)
@require_POST
def invitation_revoke(request: HttpRequest, access: TeamAccess, invitation_id: int) -> HttpResponse:
    _act(
        request,
        lambda: services.invitation_revoke(actor=access.user, team=access.team, invitation_id=invitation_id),
        success="The invitation was withdrawn.",
    )
    return _back(access)


@team_page()
@require_POST
def team_leave(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    if perform(request, lambda: services.team_leave(user=access.user, team=access.team)) is None:
        return _back(access)
    messages.success(request, f"You left {access.team.name}.")
    request.session.pop("dashboard_team", None)
    return redirect("dashboard:home")


@team_page(owner=True)
@require_POST
def team_delete(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    form = ConfirmSlugForm(request.POST)
    confirm = form.cleaned_data["confirm"] if form.is_valid() else ""
    deleted = perform(
        request,
        lambda: services.team_delete(actor=access.user, team=access.team, confirm_slug=confirm),
    )
    if deleted is None:
        return _back(access)
    messages.success(request, f"The team {access.team.slug} was deleted.")
    request.session.pop("dashboard_team", None)
    return redirect("dashboard:home")


@team_page(manage=True)
@require_safe
def audit(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    """The team's audit log, newest first (owners and admins)."""
    paginator = Paginator(selectors.audit_events_of(team=access.team), AUDIT_PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    return render(request, "dashboard/team/audit.html", {"page": page})


urls = [
    path("team", team, name="team"),
    path("team/members/<int:membership_id>/role", member_role, name="member-role"),
    path("team/members/<int:membership_id>/remove", member_remove, name="member-remove"),
    path("team/invitations", invitation_create, name="invitation-create"),
    path("team/invitations/<int:invitation_id>/revoke", invitation_revoke, name="invitation-revoke"),
    path("team/leave", team_leave, name="team-leave"),
    path("team/delete", team_delete, name="team-delete"),
    path("audit", audit, name="audit"),
]

"""Reads for teams, always from the point of view of a user."""

from __future__ import annotations

import hashlib

from django.db.models import QuerySet

from teams.models import WRITER_ROLES, ApiKey, AuditEvent, Invitation, Membership, Role, Team, User
from watasu import errors, ids


def teams_of_user(*, user: User) -> QuerySet[Team]:
    return Team.objects.filter(memberships__user=user).order_by("-id")


def _membership(user: User, slug: str) -> Membership:
    membership = Membership.objects.select_related("team").filter(user=user, team__slug=slug).first()
    if membership is None:
        # Another team looks exactly like a team that does not exist.
        raise errors.NotFound(f"Team '{slug}' not found.", code="team_not_found")
    return membership


def team_for_read(*, user: User, slug: str | None) -> Team:
    """The team named by `slug`, or the user's personal team."""
    if slug:
        return _membership(user, slug).team
    return Team.objects.get(personal_for=user)


def teams_for_list(*, user: User, slug: str | None) -> QuerySet[Team]:
    """The team named by `slug`, or every team the user belongs to."""
    if slug:
        return Team.objects.filter(pk=_membership(user, slug).team_id)
    return teams_of_user(user=user)


def team_for_write(*, user: User, slug: str | None) -> Team:
    """The team a mutation acts on; viewers may not change anything."""
    if slug:
        membership = _membership(user, slug)
    else:
        membership = Membership.objects.select_related("team").get(user=user, team__personal_for=user)
    if membership.role not in WRITER_ROLES:
        raise errors.Forbidden(
            f"Your role in team '{membership.team.slug}' ({membership.role}) is read-only."
        )
    return membership.team


def api_keys_of_user(*, user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-id")


def api_key_of_user(*, user: User, key_id: str) -> ApiKey:
    pk = ids.db_id(key_id)
    key = ApiKey.objects.filter(user=user, pk=pk).first() if pk is not None else None
    if key is None:
        raise errors.NotFound("API key not found.", code="api_key_not_found")
    return key


def team_for_billing(*, user: User, slug: str | None) -> Team:
    """The team whose money a mutation moves (top-ups, alerts): owners and admins only."""
    membership = (
        _membership(user, slug)
        if slug
        else Membership.objects.select_related("team").get(user=user, team__personal_for=user)
    )
    if membership.role not in (Role.OWNER, Role.ADMIN):
        raise errors.Forbidden(
            f"Only owners and admins of team '{membership.team.slug}' may do this; you are {membership.role}."
        )
    return membership.team


def members_of(*, team: Team) -> QuerySet[Membership]:
    return Membership.objects.select_related("user").filter(team=team).order_by("user__email")


def invitations_pending(*, team: Team) -> QuerySet[Invitation]:
    """Invitations not accepted or withdrawn (expired ones included, marked by the page)."""
    return (
        Invitation.objects.select_related("invited_by")
        .filter(team=team, accepted_at=None, revoked_at=None)
        .order_by("-id")
    )


def invitation_by_token(*, raw_token: str) -> Invitation | None:
    digest = hashlib.sha256(raw_token.encode()).hexdigest()
    return Invitation.objects.select_related("team", "invited_by").filter(token_hash=digest).first()


def audit_events_of(*, team: Team) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(team=team).order_by("-id")

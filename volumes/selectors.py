"""Reads for volumes, always from the point of view of a user's teams."""

from __future__ import annotations

from django.db.models import QuerySet

from teams.models import Team, User
from teams.selectors import team_for_write
from volumes.models import Volume
from watasu import errors, ids


def volumes_of_teams(*, teams: QuerySet[Team]) -> QuerySet[Volume]:
    return Volume.objects.filter(team__in=teams).select_related("team", "host", "holder").order_by("-id")


def volume_get(*, user: User, id_or_name: str, team: str | None = None, write: bool = False) -> Volume:
    """A volume of one of the user's teams by id, or by name within them (or within `team`).

    Another team's volume is a 404 like one that does not exist. A name two of the user's
    teams both use is a 409 naming them: the caller picks one with `team`. With `write` the
    user's role in the volume's team must allow changes (403 otherwise).
    """
    visible = Volume.objects.select_related("team", "host", "holder").filter(team__memberships__user=user)
    if team:
        visible = visible.filter(team__slug=team)
    pk = ids.db_id(id_or_name)
    matches = list(visible.filter(pk=pk)) if pk is not None else list(visible.filter(name=id_or_name)[:2])
    if not matches:
        raise errors.NotFound(f"Volume {id_or_name} not found.", code="volume_not_found")
    if len(matches) > 1:
        slugs = sorted(v.team.slug for v in matches)
        raise errors.Conflict(
            f"Volume name {id_or_name} is used by more than one of your teams ({', '.join(slugs)}); "
            "name the team with ?team=.",
            code="volume_ambiguous",
        )
    volume = matches[0]
    if write:
        team_for_write(user=user, slug=volume.team.slug)
    return volume

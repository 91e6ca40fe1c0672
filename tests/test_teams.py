"""Team visibility with the owner / member / viewer / outsider roles."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from teams.models import Membership, Role, Team, User
from teams.selectors import team_for_write
from tests.conftest import Actor
from watasu.errors import Forbidden

pytestmark = pytest.mark.django_db


def test_every_user_has_a_personal_team_it_owns(outsider: Actor) -> None:
    team = outsider.personal_team

    assert Membership.objects.get(user=outsider.user, team=team).role == Role.OWNER
    assert team.slug == "outsider"


def test_owner_and_member_see_the_team_outsider_gets_404(
    owner: Actor, member: Actor, outsider: Actor
) -> None:
    assert owner.client().get("/v1/teams/acme").status_code == 200
    assert member.client().get("/v1/teams/acme").status_code == 200

    response = outsider.client().get("/v1/teams/acme")

    assert response.status_code == 404
    assert response.json() == {"error": "team_not_found", "message": "Team 'acme' not found."}


def test_unknown_team_looks_like_another_teams(outsider: Actor) -> None:
    unknown = outsider.client().get("/v1/sandbox_limits?team=nope")
    foreign = outsider.client().get("/v1/sandbox_limits?team=acme")

    assert unknown.status_code == foreign.status_code == 404
    assert unknown.json()["error"] == foreign.json()["error"] == "team_not_found"


def test_team_list_shows_only_own_teams(owner: Actor, outsider: Actor) -> None:
    slugs = [t["slug"] for t in owner.client().get("/v1/teams").json()["teams"]]

    assert sorted(slugs) == ["acme", "owner"]
    assert [t["slug"] for t in outsider.client().get("/v1/teams").json()["teams"]] == ["outsider"]


def test_creating_a_team_makes_the_caller_owner(member: Actor) -> None:
    response = member.client().post("/v1/teams", {"slug": "lab", "name": "Lab"}, format="json")

    assert response.status_code == 201
    team = Team.objects.get(slug="lab")
    assert Membership.objects.get(team=team, user=member.user).role == Role.OWNER


def test_taken_slug_is_a_409(owner: Actor, outsider: Actor) -> None:
    response = outsider.client().post("/v1/teams", {"slug": "acme"}, format="json")

    assert response.status_code == 409
    assert response.json()["error"] == "already_exists"


def test_viewer_reads_the_team_but_is_not_a_writer(viewer: Actor) -> None:
    assert viewer.client().get("/v1/sandbox_limits?team=acme").status_code == 200
    with pytest.raises(Forbidden):
        team_for_write(user=viewer.user, slug="acme")


def test_users_made_by_createsuperuser_get_a_personal_team(db: None) -> None:
    call_command("createsuperuser", "--noinput", "--email", "root@example.com", verbosity=0)

    user = User.objects.get(email="root@example.com")
    assert Team.objects.get(personal_for=user).slug == "root"
    assert Membership.objects.get(user=user).role == Role.OWNER


def test_a_user_owns_a_bounded_number_of_teams(member: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    # given a cap of two owned teams (the personal team and teams one only belongs to do not count)
    settings.MAX_TEAMS_PER_USER = 2
    client = member.client()
    made = [client.post("/v1/teams", {"slug": f"lab-{n}"}, format="json").status_code for n in range(2)]

    # when a third is created
    response = client.post("/v1/teams", {"slug": "lab-2"}, format="json")

    # then it is refused by name, and nothing was made
    assert made == [201, 201]
    assert response.status_code == 422
    assert response.json()["error"] == "team_quota_exceeded"
    assert not Team.objects.filter(slug="lab-2").exists()

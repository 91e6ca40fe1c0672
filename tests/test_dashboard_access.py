"""The dashboard's frame: sign-in required, the team in the URL, roles, and HTML errors."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import Actor

pytestmark = pytest.mark.django_db

TEAM_PAGES = ["sandboxes", "templates", "volumes", "checkpoints", "keys", "usage", "team"]


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def test_anonymous_callers_are_sent_to_sign_in() -> None:
    response = Client().get("/dashboard/t/acme/sandboxes")
    assert response.status_code == 302
    assert response["Location"].startswith("/dashboard/sign-in?next=")


def test_home_opens_the_personal_team(owner: Actor) -> None:
    response = signed_in(owner).get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"] == f"/dashboard/t/{owner.personal_team.slug}/sandboxes"


@pytest.mark.parametrize("page", TEAM_PAGES)
def test_every_team_page_renders_for_a_viewer(viewer: Actor, page: str) -> None:
    response = signed_in(viewer).get(f"/dashboard/t/acme/{page}")
    assert response.status_code == 200, response.content[:500]
    assert b"acme" in response.content


@pytest.mark.parametrize("page", TEAM_PAGES)
def test_another_teams_pages_are_an_html_404(outsider: Actor, acme: object, page: str) -> None:
    response = signed_in(outsider).get(f"/dashboard/t/acme/{page}")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    assert b"belongs to a team you are not in" in response.content


def test_the_api_keeps_its_json_404(owner: Actor) -> None:
    response = owner.client().get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_switching_team_remembers_it(owner: Actor, acme: object) -> None:
    client = signed_in(owner)
    assert client.get("/dashboard/switch?team=acme")["Location"] == "/dashboard/t/acme/sandboxes"
    assert client.get("/dashboard/")["Location"] == "/dashboard/t/acme/sandboxes"
    assert client.get("/dashboard/switch?team=someone-else").status_code == 404

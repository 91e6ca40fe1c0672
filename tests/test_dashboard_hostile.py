"""Every dashboard route, walked from the URL resolver: the anonymous caller is sent to
sign in, another team's member gets 404 whatever the ids, a viewer can change nothing,
and hostile ids are a 404 or a clear refusal, never a crash."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from tests.conftest import Actor

pytestmark = pytest.mark.django_db

TEAM_PREFIX = "/dashboard/t/<slug:team>/"
PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")
HOSTILE = ["0", "9" * 30, "%C2%B2", "..", "%2e%2e", "x%00y", "abc"]
# Routes a viewer may POST to: leaving the team and revoking their own keys are theirs to do.
VIEWER_POSTS = {"team-leave", "key-revoke"}


def _dashboard_routes() -> list[tuple[str, str]]:
    """(name, route template) of every dashboard route."""
    routes: list[tuple[str, str]] = []

    def walk(patterns: list[Any], prefix: str, namespace: str) -> None:
        for entry in patterns:
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, prefix + str(entry.pattern), entry.namespace or namespace)
            elif isinstance(entry, URLPattern) and prefix.startswith("/dashboard/"):
                routes.append((entry.name or "", prefix + str(entry.pattern)))

    walk(get_resolver().url_patterns, "/", "")
    return routes


ROUTES = _dashboard_routes()
TEAM_ROUTES = [(name, route) for name, route in ROUTES if route.startswith(TEAM_PREFIX)]


def _fill(route: str, team: str, value: str) -> str:
    return PARAM.sub(lambda m: team if m.group(2) == "team" else value, route)


def signed_in(actor: Actor) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(actor.user)
    return client


def test_there_are_team_routes_to_walk() -> None:
    assert len(TEAM_ROUTES) >= 20, TEAM_ROUTES


@pytest.mark.parametrize(("name", "route"), TEAM_ROUTES)
def test_anonymous_callers_are_sent_to_sign_in(name: str, route: str, acme: object) -> None:
    client = Client(raise_request_exception=False)
    for method in ("get", "post"):
        response = getattr(client, method)(_fill(route, "acme", "1"))
        assert response.status_code == 302, (method, route, response.status_code)
        assert response["Location"].startswith("/dashboard/sign-in"), (method, route)


@pytest.mark.parametrize(("name", "route"), TEAM_ROUTES)
def test_another_teams_routes_are_404_for_every_id(
    name: str, route: str, outsider: Actor, acme: object
) -> None:
    client = signed_in(outsider)
    for value in ["1", *HOSTILE]:
        for method in ("get", "post"):
            response = getattr(client, method)(_fill(route, "acme", value))
            assert response.status_code == 404, (method, route, value, response.status_code)


@pytest.mark.parametrize(("name", "route"), TEAM_ROUTES)
def test_hostile_ids_in_the_own_team_are_never_a_crash(
    name: str, route: str, owner: Actor, acme: object
) -> None:
    client = signed_in(owner)
    for value in HOSTILE:
        for method in ("get", "post"):
            response = getattr(client, method)(_fill(route, "acme", value))
            assert response.status_code < 500, (method, route, value, response.status_code)


@pytest.mark.parametrize(("name", "route"), [(n, r) for n, r in TEAM_ROUTES if n not in VIEWER_POSTS])
def test_a_viewer_cannot_post_anything(name: str, route: str, viewer: Actor) -> None:
    response = signed_in(viewer).post(_fill(route, "acme", "1"))
    # 403 where the role is refused, 404 where the object does not exist, 405 for pages
    # that only show; never a change (nothing exists to change) and never a crash
    assert response.status_code in (403, 404, 405), (route, response.status_code)

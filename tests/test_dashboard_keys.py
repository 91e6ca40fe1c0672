"""API keys in the dashboard: shown once, the user's own, and never more than the role allows."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from teams.models import ApiKey, AuditEvent, Membership, Team
from teams.services import api_key_create
from tests.conftest import Actor

pytestmark = pytest.mark.django_db


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def create_key(client: Client, team: str = "acme", **fields: object) -> tuple[object, str]:
    response = client.post(f"/dashboard/t/{team}/keys/new", {"name": "ci", "scope": "write", **fields})
    found = re.search(r'<pre class="secret" id="new-key-secret">(wsk_[^<]+)</pre>', response.content.decode())
    return response, found.group(1) if found else ""


def test_a_new_keys_secret_is_shown_once(member: Actor, acme: Team) -> None:
    client = signed_in(member)
    response, secret = create_key(client, expires_days="30")
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert secret
    assert 'data-copy="#new-key-secret"' in response.content.decode()  # type: ignore[attr-defined]
    assert "no-store" in response["Cache-Control"]  # type: ignore[index]
    key = ApiKey.objects.get(user=member.user, name="ci")
    assert (key.scope, key.expires_at is not None, secret.startswith(key.prefix)) == ("write", True, True)
    # the key works
    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api.get("/v1/teams").status_code == 200
    # and the list shows its prefix, never the secret again
    listing = client.get("/dashboard/t/acme/keys").content.decode()
    assert f"{key.prefix}…" in listing
    assert secret not in listing and "new-key-secret" not in listing


def test_the_list_is_the_users_own_keys(member: Actor, owner: Actor) -> None:
    listing = signed_in(member).get("/dashboard/t/acme/keys").content.decode()
    mine = ApiKey.objects.filter(user=member.user)
    theirs = ApiKey.objects.filter(user=owner.user)
    assert all(f'data-key="{k.prefix}"' in listing for k in mine)
    assert not any(f'data-key="{k.prefix}"' in listing for k in theirs)


def test_revoking_a_key_stops_it_and_is_audited(member: Actor) -> None:
    client = signed_in(member)
    _, secret = create_key(client)
    key = ApiKey.objects.get(user=member.user, name="ci")
    assert client.post(f"/dashboard/t/acme/keys/{key.pk}/revoke")["Location"] == "/dashboard/t/acme/keys"
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert Client(HTTP_AUTHORIZATION=f"Bearer {secret}").get("/v1/teams").status_code == 401
    assert 'class="badge revoked"' in client.get("/dashboard/t/acme/keys").content.decode()
    personal = member.personal_team
    logged = list(AuditEvent.objects.filter(team=personal).values_list("action", "source"))
    assert logged == [("api_key.revoke", "dashboard"), ("api_key.create", "dashboard")]


def test_another_users_key_cannot_be_revoked(member: Actor, owner: Actor) -> None:
    theirs = ApiKey.objects.filter(user=owner.user).first()
    assert theirs is not None
    assert signed_in(member).post(f"/dashboard/t/acme/keys/{theirs.pk}/revoke").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_a_viewer_cannot_make_a_write_key_from_the_teams_page(viewer: Actor) -> None:
    client = signed_in(viewer)
    page = client.get("/dashboard/t/acme/keys").content.decode()
    assert re.search(r'<option value="write" disabled title="You are a viewer in this team', page)
    before = ApiKey.objects.filter(user=viewer.user).count()
    response, _ = create_key(client, scope="write")
    assert response.status_code == 403  # type: ignore[attr-defined]
    assert ApiKey.objects.filter(user=viewer.user).count() == before
    ok, secret = create_key(client, scope="read")
    assert ok.status_code == 200 and secret  # type: ignore[attr-defined]


def test_the_api_records_key_creation_and_revocation_in_the_personal_log(member: Actor) -> None:
    api = member.client()
    created = api.post("/v1/api_keys", {"name": "bot", "scope": "read"}, format="json")
    assert created.status_code == 201
    api.delete(f"/v1/api_keys/{created.json()['api_key']['id']}")
    api.delete(f"/v1/api_keys/{created.json()['api_key']['id']}")  # twice: logged once
    events = list(
        AuditEvent.objects.filter(team=member.personal_team).values_list("action", "source", "actor")
    )
    assert events == [("api_key.revoke", "api", member.user.pk), ("api_key.create", "api", member.user.pk)]


def make_template(secret: str, slug: str) -> int:
    """A write that needs no VM and goes through the role check (team_for_write)."""
    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    response = api.post(
        "/v1/sandbox_templates?team=acme",
        {"sandbox_template": {"slug": slug}},
        content_type="application/json",
    )
    return response.status_code


def test_a_demoted_members_write_key_loses_write_in_that_team_at_once(owner: Actor, member: Actor) -> None:
    # Given a member's write key, made in the dashboard, that can write in acme
    _, secret = create_key(signed_in(member), scope="write")
    assert make_template(secret, "before") == 201
    # When an owner makes the member a viewer
    membership = Membership.objects.get(user=member.user, team__slug="acme")
    signed_in(owner).post(f"/dashboard/t/acme/team/members/{membership.pk}/role", {"role": "viewer"})
    # Then the same key is read-only in acme, but still reads, and still writes in the personal team
    assert make_template(secret, "after") == 403
    assert (
        Client(HTTP_AUTHORIZATION=f"Bearer {secret}").get("/v1/sandbox_templates?team=acme").status_code
        == 200
    )
    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    personal = api.post(
        "/v1/sandbox_templates",
        {"sandbox_template": {"slug": "mine"}, "team": member.personal_team.slug},
        content_type="application/json",
    )
    assert personal.status_code == 201


@pytest.mark.parametrize(
    ("method", "page"), [("get", "keys"), ("post", "keys/new"), ("post", "keys/1/revoke")]
)
def test_outsiders_get_404(owner: Actor, outsider: Actor, method: str, page: str) -> None:
    before = ApiKey.objects.count()
    response = getattr(signed_in(outsider), method)(f"/dashboard/t/acme/{page}", {"scope": "read"})
    assert response.status_code == 404
    assert ApiKey.objects.count() == before


def test_the_keys_page_takes_constant_queries(member: Actor) -> None:
    client = signed_in(member)

    def count() -> int:
        client.get("/dashboard/t/acme/keys")
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/dashboard/t/acme/keys").status_code == 200
        return len(queries)

    for _ in range(3):
        api_key_create(user=member.user, scope="read")
    few = count()
    for _ in range(30):
        api_key_create(user=member.user, scope="write")
    assert count() == few


def test_resubmitting_the_create_form_makes_no_second_key(owner: Actor, acme: Team) -> None:
    client = Client()
    client.force_login(owner.user)
    page = client.get("/dashboard/t/acme/keys").content.decode()
    token = page.split('name="form_token" value="', 1)[1].split('"', 1)[0]
    form = {"name": "laptop", "scope": "read", "form_token": token}
    before = ApiKey.objects.filter(user=owner.user).count()

    first = client.post("/dashboard/t/acme/keys/new", form)
    again = client.post("/dashboard/t/acme/keys/new", form, follow=True)  # the browser's "resubmit?"

    assert first.status_code == 200 and b'id="new-key-secret"' in first.content
    assert ApiKey.objects.filter(user=owner.user).count() == before + 1
    assert b"created already" in again.content and b'id="new-key-secret"' not in again.content

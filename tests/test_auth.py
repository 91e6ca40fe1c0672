"""API key authentication and scopes, through the URLs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from teams.models import ApiKey
from teams.services import api_key_create, api_key_hash
from tests.conftest import Actor

pytestmark = pytest.mark.django_db


def test_no_key_is_401_in_the_error_shape() -> None:
    response = APIClient().get("/v1/sandbox_limits")

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.json()["message"]
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer wsk_not-a-real-key", "Basic abc", "Bearer ", "wsk_x"])
def test_bad_key_or_scheme_is_401(header: str) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get("/v1/sandbox_limits")

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_revoked_key_is_401(owner: Actor) -> None:
    # given a key revoked through the API
    key_id = ApiKey.objects.get(key_hash=api_key_hash(owner.read_key)).pk
    assert owner.client().delete(f"/v1/api_keys/{key_id}").status_code == 200

    # when it is used
    response = owner.client("read").get("/v1/sandbox_limits")

    # then it is refused
    assert response.status_code == 401


def test_expired_key_is_401(owner: Actor) -> None:
    key, raw = api_key_create(user=owner.user, scope="write", expires_at=timezone.now() + timedelta(hours=1))
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")

    assert client.get("/v1/sandbox_limits").status_code == 401


def test_inactive_user_key_is_401(owner: Actor) -> None:
    owner.user.is_active = False
    owner.user.save()

    assert owner.client().get("/v1/sandbox_limits").status_code == 401


def test_read_key_reads_but_cannot_mutate(owner: Actor) -> None:
    client = owner.client("read")

    assert client.get("/v1/sandbox_limits").status_code == 200
    response = client.post("/v1/teams", {"slug": "newteam"}, format="json")

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert "read-only" in response.json()["message"]


def test_write_key_mutates(owner: Actor) -> None:
    response = owner.client("write").post("/v1/teams", {"slug": "newteam"}, format="json")

    assert response.status_code == 201
    assert response.json()["team"]["slug"] == "newteam"


def test_only_the_hash_and_a_prefix_are_stored(owner: Actor) -> None:
    key = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key))

    assert owner.write_key.startswith(key.prefix)
    assert len(key.prefix) == 12
    assert owner.write_key not in {key.key_hash, key.prefix, key.name}


def test_last_used_time_is_recorded(owner: Actor) -> None:
    key = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key))
    assert key.last_used_at is None

    owner.client().get("/v1/sandbox_limits")

    key.refresh_from_db()
    assert key.last_used_at is not None
    assert timezone.now() - key.last_used_at < timedelta(seconds=30)


def test_api_key_created_through_the_api_works_and_is_shown_once(owner: Actor) -> None:
    response = owner.client().post("/v1/api_keys", {"name": "ci", "scope": "read"}, format="json")
    assert response.status_code == 201
    raw = response.json()["key"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")

    listing = owner.client().get("/v1/api_keys").json()

    assert client.get("/v1/sandbox_limits").status_code == 200
    assert client.post("/v1/teams", {"slug": "x"}, format="json").status_code == 403
    assert all("key" not in item for item in listing["api_keys"])
    assert response.json()["api_key"]["scope"] == "read"


def test_another_users_api_key_is_404(owner: Actor, outsider: Actor) -> None:
    key_id = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key)).pk

    assert outsider.client().get(f"/v1/api_keys/{key_id}").status_code == 404
    assert outsider.client().delete(f"/v1/api_keys/{key_id}").status_code == 404
    assert ApiKey.objects.get(pk=key_id).revoked_at is None


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ({"name": "ci", "scop": "read"}, "scop", "scope"),
        ({"scope": "read", "expires_in": 1}, "expires_in", "expires_at"),
    ],
)
def test_a_misspelled_api_key_field_is_refused_never_a_write_key(
    owner: Actor, body: dict, field: str, hint: str
) -> None:
    # when a key is asked for with a misspelled field (a read key meant, an expiry meant)
    response = owner.client().post("/v1/api_keys", body, format="json")

    # then nothing is minted: the key is named with what was meant
    assert response.status_code == 422, response.content
    assert (response.json()["field"], response.json()["did_you_mean"]) == (field, hint)
    assert ApiKey.objects.filter(user=owner.user).count() == 2  # the fixture's write and read keys

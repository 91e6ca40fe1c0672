"""`limit` / `next_token` pagination on list endpoints."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from teams.models import ApiKey
from teams.services import api_key_create
from tests.conftest import Actor

pytestmark = pytest.mark.django_db


def _walk(actor: Actor, limit: int) -> list[list[int]]:
    pages, token = [], None
    while True:
        query = f"?limit={limit}" + (f"&next_token={token}" if token else "")
        body = actor.client().get("/v1/api_keys" + query).json()
        pages.append([item["id"] for item in body["api_keys"]])
        token = body["next_token"]
        if not token:
            return pages


def test_pages_cover_every_row_once_newest_first(owner: Actor) -> None:
    # given 7 keys (2 from the fixture + 5)
    for _ in range(5):
        api_key_create(user=owner.user)
    ids = list(ApiKey.objects.filter(user=owner.user).order_by("-id").values_list("id", flat=True))

    pages = _walk(owner, limit=3)

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == ids


def test_exact_multiple_has_no_empty_last_page(owner: Actor) -> None:
    api_key_create(user=owner.user)
    api_key_create(user=owner.user)

    assert [len(p) for p in _walk(owner, limit=2)] == [2, 2]


def test_limit_is_clamped_to_the_maximum(owner: Actor, settings) -> None:
    settings.API_PAGE_SIZE_MAX = 3
    for _ in range(5):
        api_key_create(user=owner.user)

    body = owner.client().get("/v1/api_keys?limit=1000").json()

    assert len(body["api_keys"]) == 3
    assert body["next_token"]


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=abc", "next_token=xyz"])
def test_bad_paging_parameters_are_422(owner: Actor, query: str) -> None:
    response = owner.client().get(f"/v1/api_keys?{query}")

    assert response.status_code == 422
    assert response.json()["error"] == "validation_failed"


def test_list_query_count_does_not_grow_with_rows(owner: Actor) -> None:
    client = owner.client()
    client.get("/v1/api_keys")  # warm: last_used_at write happens on first use
    with CaptureQueriesContext(connection) as few:
        client.get("/v1/api_keys?limit=5")
    for _ in range(30):
        api_key_create(user=owner.user)
    with CaptureQueriesContext(connection) as many:
        client.get("/v1/api_keys?limit=100")

    assert len(many) == len(few)

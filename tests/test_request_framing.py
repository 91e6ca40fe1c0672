"""A body the API cannot frame is refused, never read as empty.

DRF reads a request without Content-Length as having no body, so a chunked
`{"scope": "read"}` once minted a write key and a chunked create ignored its template,
timeout and network policy. The web process's entry refuses such bodies with a 411 before
anything reads them (and before Django spools them, unbounded, to disk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from teams.models import ApiKey
from tests.conftest import Actor

pytestmark = pytest.mark.django_db(transaction=True)


def _chunked(body: bytes) -> Iterator[bytes]:
    yield body[:5]
    yield body[5:]


def test_a_chunked_body_is_a_411_and_mints_nothing(edge, owner: Actor) -> None:  # type: ignore[no-untyped-def]
    # given a write key and the number of keys its user holds
    before = ApiKey.objects.filter(user=owner.user).count()
    body = json.dumps({"scope": "read", "name": "chunky"}).encode()

    # when a key is asked for with a chunked body
    answer = httpx.post(
        f"{edge.url}/v1/api_keys",
        content=_chunked(body),
        headers={"Authorization": f"Bearer {owner.write_key}", "Content-Type": "application/json"},
    )

    # then it is refused in the error shape, and no key was made
    assert answer.request.headers.get("transfer-encoding") == "chunked"
    assert answer.status_code == 411
    assert answer.json()["error"] == "length_required"
    assert "Content-Length" in answer.json()["message"]
    assert ApiKey.objects.filter(user=owner.user).count() == before


def test_the_same_body_with_a_content_length_is_read(edge, owner: Actor) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"scope": "read", "name": "framed"}).encode()

    answer = httpx.post(
        f"{edge.url}/v1/api_keys",
        content=body,
        headers={"Authorization": f"Bearer {owner.write_key}", "Content-Type": "application/json"},
    )

    assert answer.status_code == 201
    assert answer.json()["api_key"]["scope"] == "read"
    assert answer.json()["api_key"]["name"] == "framed"

"""Control-plane rate limits per API key: 429 in the error shape with Retry-After."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from tests.conftest import Actor

pytestmark = pytest.mark.django_db


def test_a_key_over_its_rate_gets_429_and_others_are_unaffected(
    owner: Actor, outsider: Actor, settings
) -> None:  # type: ignore[no-untyped-def]
    # given a limit of 3 requests a minute per key
    settings.API_RATE_LIMIT = "3/min"
    cache.clear()
    client = owner.client()

    # when one key makes a fourth request within the minute
    statuses = [client.get("/v1/sandbox_limits").status_code for _ in range(3)]
    refused = client.get("/v1/sandbox_limits")
    other = outsider.client().get("/v1/sandbox_limits")

    # then it is refused in the error shape with when to retry; another key still works
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert 1 <= int(refused["Retry-After"]) <= 61
    assert other.status_code == 200


def test_a_rate_limited_request_is_not_replayed_under_its_idempotency_key(owner: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    # given a key at its limit
    settings.API_RATE_LIMIT = "1/min"
    cache.clear()
    client = owner.client()
    assert client.get("/v1/sandbox_limits").status_code == 200

    # when a create under an Idempotency-Key is refused for the rate, then retried after the window
    refused = client.post("/v1/teams", {"slug": "lab"}, format="json", HTTP_IDEMPOTENCY_KEY="k-429")
    cache.clear()  # the window passed
    retried = client.post("/v1/teams", {"slug": "lab"}, format="json", HTTP_IDEMPOTENCY_KEY="k-429")

    # then the retry did the work instead of replaying the 429
    assert refused.status_code == 429
    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried

"""`Idempotency-Key`: replay, mismatch, in-flight, expiry, and concurrency on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from teams.models import ApiKey, IdempotencyRecord, IdempotencyState, Team
from teams.services import api_key_hash
from tests.conftest import Actor
from watasu.api.idempotency import Outcome, idempotency_claim

pytestmark = pytest.mark.django_db


def _post_team(actor: Actor, slug: str, key: str = "k-1"):
    return actor.client().post("/v1/teams", {"slug": slug}, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_same_key_same_body_replays_without_doing_the_work_again(owner: Actor) -> None:
    first = _post_team(owner, "alpha")
    second = _post_team(owner, "alpha")

    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second["Idempotent-Replayed"] == "true"
    assert Team.objects.filter(slug="alpha").count() == 1


def test_replay_keeps_the_first_error_too(owner: Actor, outsider: Actor) -> None:
    first = _post_team(outsider, "acme")  # taken by the fixture: 409
    second = _post_team(outsider, "acme")

    assert first.status_code == second.status_code == 409
    assert second.json() == first.json()


def test_same_key_different_body_is_422(owner: Actor) -> None:
    _post_team(owner, "alpha")

    response = _post_team(owner, "beta")

    assert response.status_code == 422
    assert response.json()["error"] == "idempotency_key_reused"
    assert not Team.objects.filter(slug="beta").exists()


def test_json_formatting_does_not_change_the_request(owner: Actor) -> None:
    client = owner.client()
    first = client.post(
        "/v1/teams",
        '{"slug": "alpha", "name": "A"}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    second = client.post(
        "/v1/teams", '{"name":"A","slug":"alpha"}', content_type="application/json", HTTP_IDEMPOTENCY_KEY="k"
    )

    assert second.status_code == 201
    assert second.content == first.content


def test_keys_are_scoped_to_the_api_key(owner: Actor, outsider: Actor) -> None:
    _post_team(owner, "alpha", key="shared")

    response = _post_team(outsider, "beta", key="shared")

    assert response.status_code == 201
    assert Team.objects.filter(slug__in=["alpha", "beta"]).count() == 2


def test_request_arriving_while_the_first_runs_is_409(owner: Actor) -> None:
    # given the first request has claimed the key and is still running
    api_key = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key))
    first = _post_team(owner, "alpha", key="warm")  # learn the fingerprint of this request
    record = IdempotencyRecord.objects.get(api_key=api_key, key="warm")
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        state=IdempotencyState.IN_PROGRESS, response_status=None, response_body=None
    )

    # when the retry arrives
    response = _post_team(owner, "alpha", key="warm")

    # then it is told to come back
    assert first.status_code == 201
    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_key_in_progress"
    assert response["Retry-After"] == "1"


def test_abandoned_in_flight_record_is_taken_over_after_its_lease(owner: Actor) -> None:
    # given a request that crashed after claiming the key (no response stored)
    api_key = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key))
    _post_team(owner, "alpha", key="crashed")
    Team.objects.filter(slug="alpha").delete()
    IdempotencyRecord.objects.filter(api_key=api_key, key="crashed").update(
        state=IdempotencyState.IN_PROGRESS, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = _post_team(owner, "alpha", key="crashed")

    assert response.status_code == 201
    assert Team.objects.filter(slug="alpha").count() == 1
    assert IdempotencyRecord.objects.get(api_key=api_key, key="crashed").state == "completed"


def test_expired_record_lets_the_key_run_again(owner: Actor) -> None:
    _post_team(owner, "alpha", key="old")
    IdempotencyRecord.objects.filter(key="old").update(expires_at=timezone.now())

    response = _post_team(owner, "beta", key="old")

    assert response.status_code == 201
    assert Team.objects.filter(slug="beta").exists()


def test_records_expire_after_24_hours(owner: Actor) -> None:
    _post_team(owner, "alpha", key="ttl")
    record = IdempotencyRecord.objects.get(key="ttl")

    assert record.expires_at - record.created_at == pytest.approx(
        timedelta(hours=24), abs=timedelta(seconds=5)
    )


def test_reads_and_unauthenticated_requests_are_not_recorded(owner: Actor) -> None:
    owner.client().get("/v1/teams", HTTP_IDEMPOTENCY_KEY="g")
    owner.client("read").post("/v1/teams", {"slug": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="r")

    assert IdempotencyRecord.objects.count() == 0


def test_overlong_key_is_422(owner: Actor) -> None:
    response = _post_team(owner, "alpha", key="x" * 256)

    assert response.status_code == 422
    assert not Team.objects.filter(slug="alpha").exists()


def test_claim_outcomes_in_order(owner: Actor) -> None:
    api_key = ApiKey.objects.get(key_hash=api_key_hash(owner.write_key))

    first = idempotency_claim(api_key=api_key, key="c", fingerprint="f1")
    again = idempotency_claim(api_key=api_key, key="c", fingerprint="f1")
    other = idempotency_claim(api_key=api_key, key="c", fingerprint="f2")

    assert (first.outcome, again.outcome, other.outcome) == (
        Outcome.STARTED,
        Outcome.IN_PROGRESS,
        Outcome.MISMATCH,
    )


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_have_one_effect(require_postgres: None, owner: Actor) -> None:
    # given 12 clients sending the same key-creating request with one key at once
    # (creating an API key is not unique by itself, so only idempotency limits it)
    barrier = threading.Barrier(12)
    responses: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def send() -> None:
        try:
            client = owner.client()
            barrier.wait()
            response = client.post(
                "/v1/api_keys", {"name": "race"}, format="json", HTTP_IDEMPOTENCY_KEY="race-key"
            )
            with lock:
                responses.append((response.status_code, response.content))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then one key was made; every answer is that first response or "in progress"
    assert ApiKey.objects.filter(user=owner.user, name="race").count() == 1
    assert len(responses) == 12
    created = {body for status, body in responses if status == 201}
    refused = [body for status, body in responses if status == 409]
    assert len(created) == 1
    assert len(created) + len(refused) <= 12
    assert all(b"idempotency_key_in_progress" in body for body in refused)
    assert {status for status, _ in responses} <= {201, 409}


def test_a_replayed_new_key_is_never_stored_in_clear(owner: Actor) -> None:
    # given a new API key minted under an Idempotency-Key
    first = owner.client().post(
        "/v1/api_keys", {"name": "ci", "scope": "read"}, format="json", HTTP_IDEMPOTENCY_KEY="mint-1"
    )
    assert first.status_code == 201, first.content
    secret = first.json()["key"]

    # when the request is retried
    replay = owner.client().post(
        "/v1/api_keys", {"name": "ci", "scope": "read"}, format="json", HTTP_IDEMPOTENCY_KEY="mint-1"
    )

    # then the caller gets the same key back, but the stored record never holds it in clear
    assert replay.content == first.content
    stored = bytes(IdempotencyRecord.objects.get(key="mint-1").response_body)
    assert secret.encode() not in stored
    assert b"wsk_" not in stored

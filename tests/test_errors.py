"""Every control-plane error has the shape {"error": code, "message": text}."""

from __future__ import annotations

import pytest

from tests.conftest import Actor

pytestmark = pytest.mark.django_db


def test_validation_error_is_422_with_errors_list(owner: Actor) -> None:
    response = owner.client().post("/v1/teams", {"slug": "not a slug!"}, format="json")

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["errors"] == [body["message"]]
    assert body["message"].startswith("slug: ")


def test_missing_field_and_bad_choice_are_listed_together(owner: Actor) -> None:
    response = owner.client().post("/v1/api_keys", {"scope": "admin", "expires_at": "soon"}, format="json")

    assert response.status_code == 422
    fields = sorted(line.split(":")[0] for line in response.json()["errors"])
    assert fields == ["expires_at", "scope"]


def test_malformed_json_is_400_bad_request(owner: Actor) -> None:
    response = owner.client().post("/v1/teams", "{not json", content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_unknown_url_is_json_404(owner: Actor) -> None:
    response = owner.client().get("/v1/no/such/thing")

    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "message": "No route for /v1/no/such/thing."}


def test_wrong_method_is_405_in_the_shape(owner: Actor) -> None:
    response = owner.client().delete("/v1/sandbox_limits")

    assert response.status_code == 405
    assert response.json() == {"error": "method_not_allowed", "message": 'Method "DELETE" not allowed.'}


def test_trailing_slash_is_not_redirected(owner: Actor) -> None:
    response = owner.client().get("/v1/sandbox_limits/")

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_non_numeric_id_is_404_not_400(owner: Actor) -> None:
    response = owner.client().get("/v1/api_keys/abc")

    assert response.status_code == 404
    assert response.json()["error"] == "api_key_not_found"


def test_expiry_in_the_past_is_422(owner: Actor) -> None:
    response = owner.client().post("/v1/api_keys", {"expires_at": "2000-01-01T00:00:00Z"}, format="json")

    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": "expires_at must be in the future."}

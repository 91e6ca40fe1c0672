"""The committed OpenAPI document matches what the code generates."""

from __future__ import annotations

import io
from pathlib import Path

from django.core.management import call_command
from rest_framework.test import APIClient

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"


def test_committed_schema_is_in_sync() -> None:
    out = io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", stdout=out)

    assert out.getvalue() == SCHEMA_FILE.read_text(), (
        "docs/openapi.yaml is stale: run `make schema` and commit the result")


def test_schema_is_served_without_a_key() -> None:
    response = APIClient().get("/v1/schema?format=json")

    assert response.status_code == 200
    assert "/v1/sandbox_limits" in response.json()["paths"]

"""The committed OpenAPI document matches what the code generates."""

from __future__ import annotations

import io
import re
from pathlib import Path

from django.contrib.staticfiles import finders
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


ASSET = re.compile(r'(?:src|href)="([^"]*)"')


def test_docs_page_is_served_without_a_key() -> None:
    # when
    response = APIClient().get("/v1/docs")

    # then
    assert response.status_code == 200
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert "/v1/schema" in response.content.decode()


def test_docs_page_loads_only_assets_the_platform_serves_itself() -> None:
    # when
    page = APIClient().get("/v1/docs").content.decode()

    # then: every script, stylesheet and icon is a static file of ours (no CDN, no other host)
    assets = ASSET.findall(page)
    assert sorted(assets) == [
        "/static/drf_spectacular_sidecar/swagger-ui-dist/favicon-32x32.png",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-standalone-preset.js",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css",
    ]
    assert all(finders.find(asset.removeprefix("/static/")) for asset in assets)
    assert "://" not in page


def test_docs_page_answers_other_methods_with_a_json_405() -> None:
    # when
    response = APIClient().post("/v1/docs")

    # then
    assert response.status_code == 405
    assert response.json() == {"error": "method_not_allowed", "message": 'Method "POST" not allowed.'}

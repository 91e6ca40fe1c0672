"""The committed OpenAPI document matches what the code generates."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from django.contrib.staticfiles import finders
from django.core.management import call_command
from rest_framework.test import APIClient

from watasu.api.views import ApiView

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"


def test_committed_schema_is_in_sync() -> None:
    out = io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", stdout=out)

    assert out.getvalue() == SCHEMA_FILE.read_text(), (
        "docs/openapi.yaml is stale: run `make schema` and commit the result"
    )


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
    # and Swagger UI's validator badge, which it would fetch from swagger.io, is off
    assert '"validatorUrl": null' in page


def test_docs_page_answers_other_methods_with_a_json_405() -> None:
    # when
    response = APIClient().post("/v1/docs")

    # then
    assert response.status_code == 405
    assert response.json() == {"error": "method_not_allowed", "message": 'Method "POST" not allowed.'}


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    ]


def _typed(schema: dict[str, Any], components: dict[str, Any]) -> bool:
    """A schema that says what is in the body: a component with properties, or an array of one."""
    if "$ref" in schema:
        return _typed(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if schema.get("type") == "array":
        return _typed(schema["items"], components)
    return bool(schema.get("properties"))


def test_every_operation_has_a_description_of_its_own() -> None:
    # given
    schema = APIClient().get("/v1/schema?format=json").json()
    generic = ApiView.__doc__.split("\n")[0]

    # then: no operation is left with nothing, or with the base view's sentence
    bare = [
        (method, path)
        for method, path, operation in _operations(schema)
        if not operation.get("summary")
        or len(operation.get("description", "")) < 20
        or generic in operation["description"]
    ]
    assert bare == []


def test_template_operations_have_typed_bodies() -> None:
    # given
    schema = APIClient().get("/v1/schema?format=json").json()
    components = schema["components"]["schemas"]

    # then: every request and response body of the template endpoints lists its fields
    untyped = []
    for method, path, operation in _operations(schema):
        if not path.startswith(("/v1/templates", "/v1/sandbox_templates")):
            continue
        bodies = [operation.get("requestBody", {}).get("content", {}).get("application/json")]
        bodies += [
            response.get("content", {}).get("application/json")
            for status, response in operation["responses"].items()
            if status != "204"
        ]
        untyped += [
            (method, path) for body in bodies if body is not None and not _typed(body["schema"], components)
        ]
    assert untyped == []

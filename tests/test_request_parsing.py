"""Request bodies are read by DRF serializers: numbers no field can take are a 422 wherever
they are, names must match as a whole, and the keys a create reads are its serializer's fields."""

from __future__ import annotations

from typing import Any

import pytest

from sandboxes.api.requests import create_keys
from sandboxes.models import Sandbox
from teams.models import Team
from templates_app.models import Template
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        ("/v1/sandboxes", b'{"timeout": 1e999}', "timeout: the number 1e999 is out of range."),
        ("/v1/sandboxes", b'{"timeout": -1e400}', "timeout: the number -1e400 is out of range."),
        (
            "/v1/sandboxes",
            b'{"metadata": {"k": [1, 2e308]}}',
            "metadata.k[1]: the number 2e308 is out of range.",
        ),
        (
            "/v1/sandboxes",
            b'{"timeout": ' + b"9" * 5000 + b"}",
            "timeout: the number " + "9" * 40 + "... is out of range.",
        ),
        (
            "/v1/templates",
            b'{"name": "img", "cpu_count": 1e999}',
            "cpu_count: the number 1e999 is out of range.",
        ),
        (
            "/v1/api_keys",
            b'{"name": "ci", "expires_at": 1e999}',
            "expires_at: the number 1e999 is out of range.",
        ),
        ("/v1/teams", b"1e400", "the body: the number 1e400 is out of range."),
    ],
)
def test_numbers_no_field_can_take_are_a_422_wherever_they_are(
    owner: Actor, url: str, body: bytes, message: str
) -> None:
    # when
    response = owner.client().generic("POST", url, body, content_type="application/json")

    # then
    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}
    assert not Sandbox.objects.exists()


def test_an_out_of_range_timeout_on_a_running_sandbox_is_a_422(owner: Actor) -> None:
    # given
    sandbox = SandboxFactory(team=owner.personal_team, timeout=300)

    # when
    response = owner.client().generic(
        "POST", f"/v1/sandboxes/{sandbox.pk}/timeout", b'{"timeout": 1e999}', content_type="application/json"
    )

    # then
    assert response.status_code == 422
    assert response.json()["message"] == "timeout: the number 1e999 is out of range."
    assert Sandbox.objects.get(pk=sandbox.pk).timeout == 300


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"timeout": 1.5}, "timeout must be a whole number of seconds."),
        ({"timeout": 1e300}, "timeout must be between 1 and 86400 seconds."),
        ({"timeout": True}, "timeout must be a whole number of seconds."),
        ({"timeout": "60"}, "timeout must be a whole number of seconds."),
    ],
)
def test_timeouts_that_are_not_whole_seconds_in_range_are_invalid_timeout(
    owner: Actor, body: dict[str, Any], message: str
) -> None:
    # when
    response = owner.client().post("/v1/sandboxes", body, format="json")

    # then
    assert response.status_code == 422
    assert response.json() == {"error": "invalid_timeout", "message": message, "errors": [message]}


@pytest.mark.parametrize(
    ("url", "body", "message"),
    [
        (
            "/v1/teams",
            {"slug": "lab\n"},
            "slug: Enter a valid “slug” consisting of letters, numbers, underscores or hyphens.",
        ),
        (
            "/v1/sandbox_templates",
            {"sandbox_template": {"slug": "lab\n"}},
            "sandbox_template.slug: must be lowercase letters, digits and dashes.",
        ),
        ("/v1/templates", {"name": "img\n"}, "name: must be 'alias' or 'alias:tag' in lowercase."),
        (
            "/v1/templates",
            {"name": "img", "tags": ["stable\n"]},
            "tags must be a non-empty list of lowercase tag names.",
        ),
    ],
)
def test_names_must_match_as_a_whole_so_a_trailing_newline_is_refused(
    owner: Actor, url: str, body: dict[str, Any], message: str
) -> None:
    # when
    response = owner.client().post(url, body, format="json")

    # then
    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}
    assert not Team.objects.filter(slug__startswith="lab").exists()
    assert not Template.objects.exists()


def test_a_version_name_with_a_trailing_newline_is_refused(owner: Actor, acme: Team) -> None:
    # given
    template = Template.objects.create(team=acme, slug="python-ci", name="Python CI")

    # when
    response = owner.client().post(
        f"/v1/sandbox_templates/{template.pk}/versions",
        {"sandbox_template_version": {"version": "v1\n"}},
        format="json",
    )

    # then
    message = "sandbox_template_version.version: must be letters, digits, dots, dashes and underscores."
    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}
    assert not template.versions.exists()


def test_the_create_keys_are_the_create_serializers_fields_and_the_schema_lists_them(owner: Actor) -> None:
    # when
    schema = owner.client().get("/v1/schema?format=json").json()

    # then: every key a create reads or knowingly ignores is documented, and nothing else
    listed = schema["components"]["schemas"]["SandboxCreateRequest"]["properties"]
    assert sorted(listed) == sorted(create_keys())
    assert {
        "template",
        "timeout",
        "lifecycle",
        "envs",
        "env_vars",
        "network_policy",
        "secure",
        "exposed_ports",
        "beta_create",
        "egress_profile",
        "allow_out",
    } <= set(create_keys())


@pytest.mark.parametrize(
    ("url", "body"),
    [("/v1/teams", {"slug": "labz", "name": "lab\n"}), ("/v1/api_keys", {"name": "abc\n", "scope": "read"})],
)
def test_a_display_name_is_kept_as_sent_so_a_trailing_newline_is_refused(
    owner: Actor, url: str, body: dict[str, Any]
) -> None:
    # when a name ends in a newline
    response = owner.client().post(url, body, format="json")

    # then it is refused, not trimmed into another name
    assert response.status_code == 422
    assert response.json()["error"] == "validation_failed"
    assert "control characters" in response.json()["message"]
    assert not Team.objects.filter(slug="labz").exists()

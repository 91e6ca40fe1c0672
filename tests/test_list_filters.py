"""List filters (one FilterSet per listable model): what they narrow, and 422 for values
they cannot read, in the API's error shape."""

from __future__ import annotations

import pytest
from django.utils import timezone

from sandboxes.models import SandboxState as S
from teams.models import ApiKey, Team
from templates_app.models import Template, TemplateVersion, VersionStatus
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db


def test_sandbox_state_filter_refuses_an_unknown_state_naming_the_choices(owner: Actor) -> None:
    # when
    response = owner.client().get("/v1/sandboxes?query[state][]=sleeping")

    # then
    assert response.status_code == 422
    message = (
        "state: Unknown state 'sleeping'; use one of creating, ready, restoring, checkpointing, "
        "stopping, stopped, expired, failed, lost, destroyed, running, paused."
    )
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}


def test_sandbox_metadata_filter_matches_keys_verbatim(owner: Actor, acme: Team) -> None:
    # given
    dotted = SandboxFactory(team=acme, state=S.READY, metadata={"a__b": "1"})
    SandboxFactory(team=acme, state=S.READY, metadata={"a": {"b": "1"}})

    # when
    response = owner.client().get("/v1/sandboxes?query[metadata][a__b]=1")

    # then
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["sandboxes"]] == [dotted.pk]


def test_template_list_filters_by_visibility(owner: Actor, acme: Team, base_version_row) -> None:
    # given
    Template.objects.create(team=acme, slug="python-ci", name="Python CI")

    # when
    team_only = owner.client().get("/v1/sandbox_templates?visibility=team")
    provider_only = owner.client().get("/v1/sandbox_templates?visibility=provider")

    # then
    assert [t["slug"] for t in team_only.json()["sandbox_templates"]] == ["python-ci"]
    assert [t["slug"] for t in provider_only.json()["sandbox_templates"]] == ["base"]


def test_template_list_refuses_an_unknown_visibility(owner: Actor) -> None:
    # when
    response = owner.client().get("/v1/sandbox_templates?visibility=public")

    # then
    assert response.status_code == 422
    message = "visibility: Select a valid choice. public is not one of the available choices."
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}


def test_template_version_list_filters_by_status(owner: Actor, acme: Team) -> None:
    # given
    template = Template.objects.create(team=acme, slug="python-ci", name="Python CI")
    ready = TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.READY, cpu=1, memory_mb=512
    )
    failed = TemplateVersion.objects.create(
        template=template, version="v2", status=VersionStatus.FAILED, cpu=1, memory_mb=512
    )
    TemplateVersion.objects.create(
        template=template, version="v3", status=VersionStatus.BUILDING, cpu=1, memory_mb=512
    )

    # when
    response = owner.client().get(f"/v1/sandbox_templates/{template.pk}/versions?status=ready&status=failed")
    bad = owner.client().get(f"/v1/sandbox_templates/{template.pk}/versions?status=done")

    # then
    assert response.status_code == 200
    assert [v["id"] for v in response.json()["sandbox_template_versions"]] == [failed.pk, ready.pk]
    assert bad.status_code == 422
    assert bad.json()["message"] == (
        "status: Select a valid choice. done is not one of the available choices."
    )


def test_api_key_list_filters_by_scope_and_revocation(owner: Actor) -> None:
    # given: the owner's write and read keys, and the read key revoked
    read_key = ApiKey.objects.get(user=owner.user, scope="read")
    ApiKey.objects.filter(pk=read_key.pk).update(revoked_at=timezone.now())
    client = owner.client()

    # when
    reads = client.get("/v1/api_keys?scope=read").json()["api_keys"]
    live = client.get("/v1/api_keys?revoked=false").json()["api_keys"]
    revoked = client.get("/v1/api_keys?revoked=true").json()["api_keys"]

    # then
    write_key = ApiKey.objects.get(user=owner.user, scope="write")
    assert [k["id"] for k in reads] == [read_key.pk]
    assert [k["id"] for k in live] == [write_key.pk]
    assert [k["id"] for k in revoked] == [read_key.pk]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("revoked=yes", "revoked: Select a valid choice. yes is not one of the available choices."),
        ("scope=admin", "scope: Select a valid choice. admin is not one of the available choices."),
    ],
)
def test_api_key_list_refuses_unreadable_filters(owner: Actor, query: str, message: str) -> None:
    # when
    response = owner.client().get(f"/v1/api_keys?{query}")

    # then
    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}


def test_team_list_filters_personal_teams(owner: Actor, acme: Team) -> None:
    # when
    personal = owner.client().get("/v1/teams?personal=true").json()["teams"]
    shared = owner.client().get("/v1/teams?personal=false").json()["teams"]

    # then
    assert [t["slug"] for t in personal] == [owner.personal_team.slug]
    assert [t["slug"] for t in shared] == ["acme"]

"""Template reads, team templates and tags (no builds involved)."""

from __future__ import annotations

import pytest

from templates_app.models import Template, TemplateVersion, VersionStatus
from templates_app.selectors import template_version_resolve
from tests.conftest import Actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme_template(acme, local_host) -> Template:  # type: ignore[no-untyped-def]
    template = Template.objects.create(team=acme, slug="python-ci", name="Python CI")
    for name in ("v1", "v2"):
        TemplateVersion.objects.create(template=template, version=name, status=VersionStatus.READY,
                                       cpu=2, memory_mb=1024, host=local_host, artifact_dir="/x")
    return template


def test_listing_shows_own_and_provider_templates_only(owner: Actor, outsider: Actor,
                                                       acme_template, base_version_row) -> None:
    mine = owner.client("read").get("/v1/sandbox_templates").json()["sandbox_templates"]
    theirs = outsider.client("read").get("/v1/sandbox_templates").json()["sandbox_templates"]

    assert [(t["slug"], t["visibility"]) for t in mine] == [("base", "provider"), ("python-ci", "team")]
    assert [t["slug"] for t in theirs] == ["base"]


def test_versions_carry_their_runtime_baseline(owner: Actor, acme_template) -> None:
    body = owner.client().get(f"/v1/sandbox_templates/{acme_template.pk}/versions").json()

    versions = body["sandbox_template_versions"]
    assert [(v["version"], v["runtime_baseline"], v["status"]) for v in versions] == [
        ("v2", {"cpu": 2, "memory_mb": 1024}, "ready"), ("v1", {"cpu": 2, "memory_mb": 1024}, "ready")]
    one = owner.client().get(f"/v1/sandbox_templates/{acme_template.pk}/versions/{versions[1]['id']}")
    assert one.json()["sandbox_template_version"]["version"] == "v1"


def test_other_teams_templates_are_404(outsider: Actor, acme_template) -> None:
    client = outsider.client()

    assert client.get(f"/v1/sandbox_templates/{acme_template.pk}").status_code == 404
    assert client.get(f"/v1/sandbox_templates/{acme_template.pk}/versions").status_code == 404
    assert client.get("/v1/templates/aliases/python-ci").status_code == 404
    assert client.get("/v1/templates/python-ci/tags").status_code == 404
    assert client.post("/v1/templates/tags", {"target": "python-ci:v1", "tags": ["x"]},
                       format="json").status_code == 404


def test_creating_a_team_template(owner: Actor, viewer: Actor) -> None:
    body = {"sandbox_template": {"team": "acme", "slug": "lab", "name": "Lab"}}

    created = owner.client().post("/v1/sandbox_templates", body, format="json")
    again = owner.client().post("/v1/sandbox_templates", body, format="json")
    as_viewer = viewer.client().post("/v1/sandbox_templates", body, format="json")
    as_reader = owner.client("read").post("/v1/sandbox_templates", body, format="json")

    assert created.status_code == 201
    assert created.json()["sandbox_template"]["team"] == "acme"
    assert (again.status_code, again.json()["error"]) == (409, "already_exists")
    assert as_viewer.status_code == as_reader.status_code == 403


def test_alias_lookup_sees_the_provider_base(owner: Actor, base_version_row) -> None:
    assert owner.client().get("/v1/templates/aliases/base").status_code == 200
    assert owner.client().get("/v1/templates/aliases/nope").status_code == 404


def test_tags_assign_list_pin_and_remove(owner: Actor, acme, acme_template) -> None:
    client = owner.client()

    assigned = client.post("/v1/templates/tags", {"target": "python-ci:v1", "tags": ["stable", "prod"]},
                           format="json")
    listed = client.get("/v1/templates/python-ci/tags").json()
    v1 = acme_template.versions.get(version="v1")

    assert assigned.json() == {"build_id": str(v1.pk), "tags": ["prod", "stable"]}
    assert [(t["tag"], t["build_id"]) for t in listed] == [("prod", str(v1.pk)), ("stable", str(v1.pk))]
    assert template_version_resolve(team=acme, selector="python-ci:stable") == v1
    assert template_version_resolve(team=acme, selector="python-ci").version == "v2"

    # moving a tag, then removing one
    client.post("/v1/templates/tags", {"target": "python-ci", "tags": ["stable"]}, format="json")
    assert template_version_resolve(team=acme, selector="python-ci:stable").version == "v2"
    removed = client.delete("/v1/templates/tags", {"name": "python-ci", "tags": ["prod"]}, format="json")
    assert removed.status_code == 204
    assert [t["tag"] for t in client.get(f"/v1/templates/{acme_template.pk}/tags").json()] == ["stable"]


def test_provider_templates_cannot_be_tagged(owner: Actor, base_version_row) -> None:
    response = owner.client().post("/v1/templates/tags", {"target": "base", "tags": ["mine"]},
                                   format="json")

    assert response.status_code == 403
    assert owner.client().get("/v1/templates/base/tags").json() == []


@pytest.mark.parametrize("body", [{"target": "python-ci"}, {"target": "python-ci", "tags": []},
                                  {"target": "python-ci", "tags": ["Bad Tag"]}, {"tags": ["x"]}])
def test_bad_tag_requests_are_422(owner: Actor, acme_template, body: dict) -> None:
    assert owner.client().post("/v1/templates/tags", body, format="json").status_code == 422

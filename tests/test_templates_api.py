"""Template reads, team templates and tags (no builds involved)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from templates_app.models import Template, TemplateVersion, VersionStatus
from templates_app.selectors import template_version_resolve
from tests.conftest import VM_TEST_PREFIX, Actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme_template(acme, local_host) -> Template:  # type: ignore[no-untyped-def]
    template = Template.objects.create(team=acme, slug="python-ci", name="Python CI")
    for name in ("v1", "v2"):
        TemplateVersion.objects.create(
            template=template,
            version=name,
            status=VersionStatus.READY,
            cpu=2,
            memory_mb=1024,
            host=local_host,
            artifact_dir="/x",
        )
    return template


def test_listing_shows_own_and_provider_templates_only(
    owner: Actor, outsider: Actor, acme_template, base_version_row
) -> None:
    mine = owner.client("read").get("/v1/sandbox_templates").json()["sandbox_templates"]
    theirs = outsider.client("read").get("/v1/sandbox_templates").json()["sandbox_templates"]

    assert [(t["slug"], t["visibility"]) for t in mine] == [("base", "provider"), ("python-ci", "team")]
    assert [t["slug"] for t in theirs] == ["base"]


def test_versions_carry_their_runtime_baseline(owner: Actor, acme_template) -> None:
    body = owner.client().get(f"/v1/sandbox_templates/{acme_template.pk}/versions").json()

    versions = body["sandbox_template_versions"]
    assert [(v["version"], v["runtime_baseline"], v["status"]) for v in versions] == [
        ("v2", {"cpu": 2, "memory_mb": 1024}, "ready"),
        ("v1", {"cpu": 2, "memory_mb": 1024}, "ready"),
    ]
    one = owner.client().get(f"/v1/sandbox_templates/{acme_template.pk}/versions/{versions[1]['id']}")
    assert one.json()["sandbox_template_version"]["version"] == "v1"


def test_other_teams_templates_are_404(outsider: Actor, acme_template) -> None:
    client = outsider.client()

    assert client.get(f"/v1/sandbox_templates/{acme_template.pk}").status_code == 404
    assert client.get(f"/v1/sandbox_templates/{acme_template.pk}/versions").status_code == 404
    assert client.get("/v1/templates/aliases/python-ci").status_code == 404
    assert client.get("/v1/templates/python-ci/tags").status_code == 404
    assert (
        client.post(
            "/v1/templates/tags", {"target": "python-ci:v1", "tags": ["x"]}, format="json"
        ).status_code
        == 404
    )


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

    assigned = client.post(
        "/v1/templates/tags", {"target": "python-ci:v1", "tags": ["stable", "prod"]}, format="json"
    )
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
    response = owner.client().post("/v1/templates/tags", {"target": "base", "tags": ["mine"]}, format="json")

    assert response.status_code == 403
    assert owner.client().get("/v1/templates/base/tags").json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"target": "python-ci"},
        {"target": "python-ci", "tags": []},
        {"target": "python-ci", "tags": ["Bad Tag"]},
        {"tags": ["x"]},
    ],
)
def test_bad_tag_requests_are_422(owner: Actor, acme_template, body: dict) -> None:
    assert owner.client().post("/v1/templates/tags", body, format="json").status_code == 422


def _version_body(version: str = "v3", **extra) -> dict:  # type: ignore[no-untyped-def]
    return {
        "sandbox_template_version": {
            "version": version,
            "source_kind": "package_spec",
            "build_spec": {"setup": ["echo hi"]},
            "runtime_baseline": {"cpu": 1, "memory_mb": 512},
            **extra,
        }
    }


def test_creating_a_version_queues_a_build(
    owner: Actor,
    viewer: Actor,
    outsider: Actor,
    acme_template,
    base_version_row,
    django_capture_on_commit_callbacks,
) -> None:
    url = f"/v1/sandbox_templates/{acme_template.pk}/versions"
    with django_capture_on_commit_callbacks() as callbacks:
        created = owner.client().post(url, _version_body(), format="json")

    assert created.status_code == 201, created.json()
    version = created.json()["sandbox_template_version"]
    assert (version["version"], version["status"], version["runtime_baseline"]) == (
        "v3",
        "draft",
        {"cpu": 1, "memory_mb": 512},
    )
    assert len(callbacks) == 1  # the build is queued once the row is committed
    assert owner.client().post(url, _version_body(), format="json").status_code == 409
    assert viewer.client().post(url, _version_body("v4"), format="json").status_code == 403
    assert outsider.client().post(url, _version_body("v4"), format="json").status_code == 404
    assert owner.client("read").post(url, _version_body("v4"), format="json").status_code == 403


@pytest.mark.parametrize(
    "override",
    [
        {"version": "no spaces"},
        {"source_kind": "oci_image"},
        {"runtime_baseline": {"cpu": 0}},
        {"build_spec": {"files": [{"path": "relative.txt", "content_b64": "aGk="}]}},
        {"build_spec": {"files": [{"path": "/x", "content_b64": "not base64!"}]}},
        {"build_spec": {"files": [{"path": "/x", "content_b64": "aGk=", "mode": "0755"}]}},
        {"build_spec": {"files": [{"path": "/x", "content_b64": "aGk=", "user": "root; rm -rf /"}]}},
        {"build_spec": {"setup": "echo not-a-list"}},
        {"build_spec": {"from_image": "ubuntu:24.04"}},
        {"build_spec": {"from_template": "nope"}},
    ],
)
def test_bad_version_requests_are_422(owner: Actor, acme_template, base_version_row, override) -> None:  # type: ignore[no-untyped-def]
    body = _version_body()
    body["sandbox_template_version"].update(override)

    response = owner.client().post(f"/v1/sandbox_templates/{acme_template.pk}/versions", body, format="json")

    assert response.status_code == 422, response.json()
    assert response.json()["error"]


def test_provider_templates_get_no_versions(owner: Actor, base_version_row) -> None:
    url = f"/v1/sandbox_templates/{base_version_row.template_id}/versions"
    assert owner.client().post(url, _version_body(), format="json").status_code == 403


def test_build_logs_page_from_an_offset(owner: Actor, acme_template) -> None:
    from django.utils import timezone

    from templates_app.models import BuildLogEntry

    version = acme_template.versions.get(version="v1")
    BuildLogEntry.objects.bulk_create(
        BuildLogEntry(version=version, index=i, at=timezone.now(), message=f"line {i}") for i in range(5)
    )
    url = f"/v1/sandbox_templates/{acme_template.pk}/versions/{version.pk}/build_logs"

    page = owner.client("read").get(url, {"offset": 3}).json()["sandbox_template_version_build_logs"]

    assert [e["message"] for e in page["entries"]] == ["line 3", "line 4"]
    assert (page["template_version_id"], page["status"], page["next_offset"]) == (version.pk, "ready", 5)
    assert owner.client().get(url, {"offset": "x"}).status_code == 422


def test_deleting_a_version_stops_it_resolving(owner: Actor, acme, acme_template) -> None:
    from templates_app.models import TemplateTag

    v1, v2 = acme_template.versions.get(version="v1"), acme_template.versions.get(version="v2")
    TemplateTag.objects.create(template=acme_template, version=v2, tag="stable")
    url = f"/v1/sandbox_templates/{acme_template.pk}/versions/{v2.pk}"

    assert owner.client().delete(url).status_code == 204

    assert owner.client().get(url).status_code == 404
    assert template_version_resolve(team=acme, selector="python-ci") == v1
    assert not TemplateTag.objects.filter(tag="stable").exists()
    TemplateVersion.objects.filter(pk=v1.pk).update(status=VersionStatus.BUILDING)
    building = f"/v1/sandbox_templates/{acme_template.pk}/versions/{v1.pk}"
    assert owner.client().delete(building).json()["error"] == "template_version_building"


def test_one_build_of_a_template_at_a_time(acme_template) -> None:
    from templates_app.builds.worker import claim

    first = TemplateVersion.objects.create(template=acme_template, version="b1", cpu=1, memory_mb=512)
    second = TemplateVersion.objects.create(template=acme_template, version="b2", cpu=1, memory_mb=512)

    assert claim(first.pk) is not None
    assert claim(second.pk) is None  # waits: the template is busy
    assert claim(first.pk) is None  # a second delivery of the same task does nothing
    TemplateVersion.objects.filter(pk=first.pk).update(status=VersionStatus.READY)
    assert claim(second.pk) is not None


def _build_vm(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from sandboxes.runtime.lifecycle import sandbox_spec

    driver.boot(
        sandbox_spec(
            name,
            driver.state_dir,
            vcpus=1,
            memory_mb=512,
            kernel=Path("/vmlinuz"),
            initrd=Path("/initrd.img"),
            cmdline="",
            backing=Path("/base.qcow2"),
        )
    )


def test_sweep_fails_builds_whose_lease_ran_out_and_requeues_drafts(
    acme_template, fake_driver, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from django.utils import timezone

    from templates_app import builds, tasks

    # given a build whose lease ran out, one still renewing its lease (both with their VMs),
    # and a draft nobody picked up for an hour
    now = timezone.now()
    lost = TemplateVersion.objects.create(
        template=acme_template,
        version="b1",
        cpu=1,
        memory_mb=512,
        status=VersionStatus.BUILDING,
        lease_expires_at=now,
    )
    alive = TemplateVersion.objects.create(
        template=acme_template,
        version="b2",
        cpu=1,
        memory_mb=512,
        status=VersionStatus.BUILDING,
        lease_expires_at=now + timedelta(minutes=2),
    )
    waiting = TemplateVersion.objects.create(template=acme_template, version="b3", cpu=1, memory_mb=512)
    TemplateVersion.objects.filter(pk=waiting.pk).update(created_at=now - timedelta(hours=1))
    for name in (*builds.build_vm_names(lost.pk), builds.build_vm_names(alive.pk)[0]):
        _build_vm(fake_driver, name)
    queued: list[int] = []
    monkeypatch.setattr(tasks, "template_build_task", SimpleNamespace(delay=queued.append))

    # when the builds sweep runs
    result = builds.builds_sweep(now=now + timedelta(seconds=1))

    # then the lost build is failed and its VMs are gone, the live one keeps its VM, the draft is queued
    assert result == {"failed": 1, "queued": 1}
    lost.refresh_from_db()
    alive.refresh_from_db()
    assert lost.status == VersionStatus.FAILED and "lease expired" in lost.last_error_message
    assert alive.status == VersionStatus.BUILDING
    assert fake_driver.list_domains(VM_TEST_PREFIX) == [builds.build_vm_names(alive.pk)[0]]
    assert queued == [waiting.pk]
    assert lost.log_entries.filter(level="error").exists()


def test_build_env_is_stored_encrypted_and_never_shown(owner: Actor, acme_template, base_version_row) -> None:
    # given a version whose build env carries a secret
    url = f"/v1/sandbox_templates/{acme_template.pk}/versions"
    body = _version_body(build_spec={"setup": ["echo hi"], "env": {"PIP_TOKEN": "s3cret-value"}})

    # when it is created and then read back through the API
    created = owner.client().post(url, body, format="json")
    listed = owner.client("read").get(url)

    # then the API shows the names only, the row holds no value in clear, and the build gets it
    assert created.status_code == 201, created.json()
    version = TemplateVersion.objects.get(pk=created.json()["sandbox_template_version"]["id"])
    assert "s3cret-value" not in created.content.decode() + listed.content.decode()
    assert created.json()["sandbox_template_version"]["build_spec"]["env_keys"] == ["PIP_TOKEN"]
    assert "s3cret-value" not in json.dumps(version.build_spec) and "s3cret" not in version.env_encrypted
    assert version.build_env() == {"PIP_TOKEN": "s3cret-value"}


# --- templates behave like the images they name -----------------------------------------------


def _build(client, build_spec: dict, name: str = "img"):  # type: ignore[no-untyped-def]
    return client.post("/v1/templates", {"name": name, "build_spec": build_spec}, format="json")


@pytest.mark.parametrize(
    ("image", "available"),
    [
        ("python:3.12", "python:3.11"),
        ("python:3.13-slim", "python:3.11-slim"),
        ("node:22", "node:18"),
        ("node:20-bookworm-slim", "node:lts"),
        ("debian:trixie", "debian:bookworm"),
    ],
)
def test_an_image_version_debian_12_lacks_is_refused_at_request_time(
    owner: Actor, base_version_row, image: str, available: str
) -> None:
    # when a build asks for a version of an image that Debian 12 does not provide
    response = _build(owner.client(), {"from_image": image})

    # then it is a 422 now (no version queued) naming the tag and listing what is available
    body = response.json()
    assert (response.status_code, body["error"]) == (422, "image_version_unavailable")
    assert f"'{image}'" in body["message"] and body["requested"] == image
    assert available in body["available"] and available in body["message"]
    assert not TemplateVersion.objects.filter(template__slug="img").exists()


@pytest.mark.parametrize(
    "image",
    [
        "python:3",
        "python:3.11",
        "python:3.11-slim",
        "python:3.11-bookworm",
        "python:latest",
        "python",
        "docker.io/library/python:3.11",
        "node:18",
        "node:18-bookworm-slim",
        "node:lts",
        "node:latest",
        "debian:bookworm",
        "debian:12",
        "debian:latest",
        "debian:stable",
    ],
)
def test_image_tags_meaning_what_debian_12_provides_are_accepted(
    owner: Actor, base_version_row, image: str, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks():
        response = _build(owner.client(), {"from_image": image})

    assert response.status_code == 201, response.json()


def test_images_we_do_not_build_stay_refused_as_imports(owner: Actor, base_version_row) -> None:
    for image in ("ubuntu:24.04", "oven/bun:latest", "ghcr.io/acme/python:3.11", "python@sha256:abc"):
        response = _build(owner.client(), {"from_image": image})
        assert (response.status_code, response.json()["error"]) == (422, "oci_image_import_disabled"), image


@pytest.mark.parametrize(
    ("spec", "field", "hint"),
    [
        ({"setpu": ["echo hi"]}, "build_spec.setpu", "setup"),
        ({"start_command": "sleep 1"}, "build_spec.start_command", "start_cmd"),
        ({"packages": {"pip3": ["six"]}}, "build_spec.packages.pip3", "pip"),
        (
            {"files": [{"path": "/x", "contents_b64": "aGk="}]},
            "build_spec.files[0].contents_b64",
            "content_b64",
        ),
        ({"fromimage": "python:3.11"}, "build_spec.fromimage", "from_image"),
    ],
)
def test_unknown_build_spec_keys_are_named_at_every_level(
    owner: Actor, acme_template, base_version_row, spec: dict, field: str, hint: str
) -> None:
    # when a build spec carries a key we do not know, through either build API
    via_sdk_api = _build(owner.client(), spec)
    via_versions = owner.client().post(
        f"/v1/sandbox_templates/{acme_template.pk}/versions", _version_body(build_spec=spec), format="json"
    )

    # then both refuse it, naming it and its closest known spelling
    for response in (via_sdk_api, via_versions):
        body = response.json()
        assert (response.status_code, body["field"], body["did_you_mean"]) == (422, field, hint), body
        assert f"'{field}'" in body["message"] and f"'{hint}'" in body["message"]


@pytest.mark.parametrize(
    ("url", "body", "field", "hint"),
    [
        (
            "/v1/templates",
            {"name": "img", "build_spec": {"setup": ["true"]}, "skip_cahce": True},
            "skip_cahce",
            "skip_cache",
        ),
        (
            "/v1/templates",
            {"name": "img", "build_spec": {"setup": ["true"]}, "memroy_mb": 2048},
            "memroy_mb",
            "memory_mb",
        ),
        (
            "versions",
            {"sandbox_template_version": {**_version_body()["sandbox_template_version"], "build_spce": {}}},
            "sandbox_template_version.build_spce",
            "build_spec",
        ),
        (
            "versions",
            _version_body(runtime_baseline={"cpu": 1, "memory": 1024}),
            "sandbox_template_version.runtime_baseline.memory",
            "memory_mb",
        ),
    ],
)
def test_misspelled_keys_around_a_build_spec_are_named(
    owner: Actor, acme_template, base_version_row, url: str, body: dict, field: str, hint: str
) -> None:
    # when a build request misspells one of its own keys (the shape or the cache flag)
    if url == "versions":
        url = f"/v1/sandbox_templates/{acme_template.pk}/versions"
    response = owner.client().post(url, body, format="json")

    # then it is refused, naming the key and what was meant, rather than building the default
    assert response.status_code == 422, response.content
    assert (response.json()["field"], response.json()["did_you_mean"]) == (field, hint)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"from_image": "python:3.11", "from_template": "my-ci"}, "both from_image and from_template"),
        ({"from_image": "python:3.11", "base": "my-ci"}, "both from_image and from_template"),
        ({"env": {"A": None}}, "the value of 'A' must be a string"),
        ({"env": {"B": {"x": 1}}}, "the value of 'B' must be a string"),
        ({"env": {"1bad key": "v"}}, "'1bad key' is not a valid variable name"),
        ([], "build_spec must be an object"),
        ("setup", "build_spec must be an object"),
    ],
)
def test_a_build_spec_that_cannot_mean_one_thing_is_refused(
    owner: Actor, base_version_row, spec, problem: str
) -> None:
    response = _build(owner.client(), spec)

    assert response.status_code == 422, response.content
    assert problem in response.json()["message"]


def test_every_key_the_sdks_send_is_accepted(
    owner: Actor, base_version_row, django_capture_on_commit_callbacks
) -> None:
    from tests.sdk import run_scenario

    # given the build specs the real Python SDK makes with every builder method, and the
    # TypeScript SDK's spelling of the parent (`base`)
    specs = [
        json.loads(line)
        for line in run_scenario(
            "build_specs", api_url="http://127.0.0.1:9/v1", api_key="unused"
        ).splitlines()
    ]
    specs.append({"base": "base", "setup": ["echo hi"]})

    # when each is sent as a build
    with django_capture_on_commit_callbacks():
        responses = [_build(owner.client(), spec, name=f"sdk-{index}") for index, spec in enumerate(specs)]

    # then none is refused, and `base` is stored as `from_template`
    assert [r.status_code for r in responses] == [201] * len(specs), [r.json() for r in responses]
    ts = TemplateVersion.objects.get(template__slug=f"sdk-{len(specs) - 1}")
    assert ts.build_spec["from_template"] == "base" and "base" not in ts.build_spec
    assert _build(owner.client(), {"base": "base", "from_template": "other"}).status_code == 422


# --- deleting a template ---------------------------------------------------------------------


def test_a_team_deletes_a_template_and_its_versions(
    owner: Actor, acme, acme_template, base_version_row, django_capture_on_commit_callbacks
) -> None:
    from templates_app.models import TemplateTag

    # given a template with two versions and a tag
    v1 = acme_template.versions.get(version="v1")
    TemplateTag.objects.create(template=acme_template, version=v1, tag="stable")
    url = f"/v1/sandbox_templates/{acme_template.pk}"

    # when its team deletes it
    response = owner.client().delete(url)

    # then it is gone from every read, its versions are retired, and the slug is free again
    assert response.status_code == 204
    assert owner.client().get(url).status_code == 404
    assert owner.client().get(f"{url}/versions").status_code == 404
    assert owner.client().get("/v1/templates/aliases/python-ci").status_code == 404
    listed = owner.client().get("/v1/sandbox_templates").json()["sandbox_templates"]
    assert "python-ci" not in [t["slug"] for t in listed]
    assert not TemplateVersion.objects.filter(template=acme_template, deleted_at__isnull=True).exists()
    assert not TemplateTag.objects.filter(template=acme_template).exists()
    with pytest.raises(Exception, match="not found"):
        template_version_resolve(team=acme, selector="python-ci:stable")
    with django_capture_on_commit_callbacks():
        rebuilt = _build(owner.client(), {"setup": ["echo again"]}, name="python-ci")
    assert rebuilt.status_code == 201
    assert rebuilt.json()["template_build"]["template_id"] != str(acme_template.pk)
    assert owner.client().delete(url).status_code == 404  # deleting again: it is gone


def test_who_may_delete_a_template(
    owner: Actor, viewer: Actor, outsider: Actor, acme_template, base_version_row
) -> None:
    url = f"/v1/sandbox_templates/{acme_template.pk}"

    assert outsider.client().delete(url).status_code == 404  # another team's: not even there
    assert viewer.client().delete(url).status_code == 403
    assert owner.client("read").delete(url).status_code == 403  # a read-only key
    provider = owner.client().delete(f"/v1/sandbox_templates/{base_version_row.template_id}")
    assert provider.status_code == 403  # the platform's
    assert Template.objects.get(pk=acme_template.pk).deleted_at is None


@pytest.mark.parametrize("state", ["ready", "stopped", "creating"])
def test_a_template_something_runs_on_is_not_deleted(owner: Actor, acme, acme_template, state: str) -> None:
    from tests.factories import SandboxFactory

    # given a sandbox on one of its versions
    sandbox = SandboxFactory(
        team=acme,
        state=state,
        template=acme_template,
        template_version=acme_template.versions.get(version="v1"),
    )

    # when the template is deleted
    response = owner.client().delete(f"/v1/sandbox_templates/{acme_template.pk}")

    # then it is a 409 naming the sandbox, and nothing changed
    body = response.json()
    assert (response.status_code, body["error"]) == (409, "template_in_use")
    assert body["sandbox_id"] == str(sandbox.pk)
    assert f"sandbox {sandbox.pk}" in body["message"] and "'v1'" in body["message"]
    assert TemplateVersion.objects.filter(template=acme_template, deleted_at__isnull=True).count() == 2


def test_a_destroyed_sandbox_does_not_hold_a_template(owner: Actor, acme, acme_template) -> None:
    from tests.factories import SandboxFactory

    SandboxFactory(team=acme, state="destroyed", template_version=acme_template.versions.get(version="v1"))

    assert owner.client().delete(f"/v1/sandbox_templates/{acme_template.pk}").status_code == 204


def test_a_template_being_built_is_not_deleted_and_its_drafts_never_start(
    owner: Actor, acme_template
) -> None:
    from templates_app.builds.worker import claim

    building = TemplateVersion.objects.create(
        template=acme_template, version="b1", cpu=1, memory_mb=512, status=VersionStatus.BUILDING
    )
    draft = TemplateVersion.objects.create(template=acme_template, version="b2", cpu=1, memory_mb=512)
    url = f"/v1/sandbox_templates/{acme_template.pk}"

    refused = owner.client().delete(url)
    TemplateVersion.objects.filter(pk=building.pk).update(status=VersionStatus.FAILED)
    deleted = owner.client().delete(url)

    assert (refused.status_code, refused.json()["error"]) == (409, "template_building")
    assert deleted.status_code == 204
    assert claim(draft.pk) is None  # a queued build of a deleted template never runs

"""Provider templates beyond `base`: their specs, version names and the create path while
one is not built yet (the builds themselves run in the code-interpreter and MCP VM tests)."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from django.core.management import CommandError, call_command

from templates_app.builds.spec import validate_spec
from templates_app.models import Template, TemplateVersion, VersionStatus
from templates_app.provider import GUEST_DIR, SLUGS, guest_file, provider_module, provider_version_name
from tests.conftest import Actor


@pytest.mark.parametrize("slug", SLUGS)
def test_every_provider_spec_is_a_valid_build_spec(slug: str) -> None:
    module = provider_module(slug)

    spec = validate_spec(module.build_spec())

    assert slug == module.SLUG
    assert spec.get("from_template", "base") == "base"
    if slug == "code-interpreter":  # started and warmed before the memory snapshot
        assert spec["start_cmd"] and spec["ready_cmd"]
    assert module.CPU >= 1 and module.MEMORY_MB >= 512


def test_guest_files_travel_in_the_spec() -> None:
    program = next(p for p in GUEST_DIR.iterdir() if p.suffix == ".py")

    entry = guest_file(program.name, "/usr/local/bin/x", 0o755)

    assert base64.b64decode(entry["content_b64"]) == program.read_bytes()
    assert entry["mode"] == 0o755 and entry["path"] == "/usr/local/bin/x"


def test_the_version_name_follows_the_spec_the_shape_and_the_base() -> None:
    module = SimpleNamespace(CPU=1, MEMORY_MB=1024)
    base = SimpleNamespace(version="debian12-aaa")
    spec = {"from_template": "base", "setup": ["true"]}

    name = provider_version_name(module, spec, base)  # type: ignore[arg-type]

    assert name == provider_version_name(module, dict(spec), base)  # type: ignore[arg-type]
    assert name.startswith("p-")
    changed = [
        provider_version_name(module, {**spec, "setup": ["false"]}, base),  # type: ignore[arg-type]
        provider_version_name(SimpleNamespace(CPU=2, MEMORY_MB=1024), spec, base),  # type: ignore[arg-type]
        provider_version_name(module, spec, SimpleNamespace(version="debian12-bbb")),  # type: ignore[arg-type]
    ]
    assert name not in changed and len(set(changed)) == 3


@pytest.mark.django_db
def test_a_create_before_the_first_build_queues_it_and_says_so(
    owner: Actor, base_version_row, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = owner.client().post("/v1/sandboxes", {"template": "code-interpreter"}, format="json")

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "template_not_ready"
    assert "being built" in body["message"] and "code-interpreter" in body["message"]
    assert len(queued) == 1  # the build is queued for a worker


@pytest.mark.django_db
def test_a_failed_provider_build_is_named_in_the_create_error(
    owner: Actor, base_version_row, local_host
) -> None:
    template = Template.objects.create(slug="mcp-gateway", name="MCP gateway")
    TemplateVersion.objects.create(
        template=template,
        version="p-1",
        status=VersionStatus.FAILED,
        cpu=1,
        memory_mb=512,
        last_error_message="step 2 (apt) exited with 100",
    )

    response = owner.client().post("/v1/sandboxes", {"template": "mcp-gateway"}, format="json")

    assert response.status_code == 422
    assert "The last build failed: step 2 (apt) exited with 100" in response.json()["message"]


@pytest.mark.django_db
def test_a_team_template_of_the_same_name_still_wins(owner: Actor, base_version_row, local_host) -> None:
    own = Template.objects.create(team=owner.personal_team, slug="code-interpreter", name="ours")
    TemplateVersion.objects.create(
        template=own, version="v1", status=VersionStatus.DRAFT, cpu=1, memory_mb=512
    )

    response = owner.client().post("/v1/sandboxes", {"template": "code-interpreter"}, format="json")

    assert response.status_code == 422
    assert response.json()["message"] == "Template 'code-interpreter' has no ready version yet."


def test_the_command_refuses_names_that_are_no_provider_template() -> None:
    with pytest.raises(CommandError, match="not provider templates: nope"):
        call_command("build_provider_templates", "nope")

"""The dashboard's frame: sign-in required, the team in the URL, roles, and HTML errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from sandboxes.models import Host
from sandboxes.runtime.lifecycle import sandbox_spec
from teams.models import AuditEvent, Team
from templates_app.models import TemplateVersion
from tests.conftest import Actor
from tests.factories import SandboxFactory
from tests.fake_driver import FakeDriver

pytestmark = pytest.mark.django_db

TEAM_PAGES = ["sandboxes", "templates", "volumes", "checkpoints", "keys", "usage", "team"]


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def test_anonymous_callers_are_sent_to_sign_in() -> None:
    response = Client().get("/dashboard/t/acme/sandboxes")
    assert response.status_code == 302
    assert response["Location"].startswith("/dashboard/sign-in?next=")


def test_home_opens_the_personal_team(owner: Actor) -> None:
    response = signed_in(owner).get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"] == f"/dashboard/t/{owner.personal_team.slug}/sandboxes"


@pytest.mark.parametrize("page", TEAM_PAGES)
def test_every_team_page_renders_for_a_viewer(viewer: Actor, page: str) -> None:
    response = signed_in(viewer).get(f"/dashboard/t/acme/{page}")
    assert response.status_code == 200, response.content[:500]
    assert b"acme" in response.content


@pytest.mark.parametrize("page", TEAM_PAGES)
def test_another_teams_pages_are_an_html_404(outsider: Actor, acme: object, page: str) -> None:
    response = signed_in(outsider).get(f"/dashboard/t/acme/{page}")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    assert b"belongs to a team you are not in" in response.content


def test_the_api_keeps_its_json_404(owner: Actor) -> None:
    response = owner.client().get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_switching_team_remembers_it(owner: Actor, acme: object) -> None:
    client = signed_in(owner)
    assert client.get("/dashboard/switch?team=acme")["Location"] == "/dashboard/t/acme/sandboxes"
    assert client.get("/dashboard/")["Location"] == "/dashboard/t/acme/sandboxes"
    assert client.get("/dashboard/switch?team=someone-else").status_code == 404


def test_api_sandbox_actions_are_in_the_team_audit_log(
    owner: Actor, acme: Team, local_host: Host, base_version_row: TemplateVersion, fake_driver: FakeDriver
) -> None:
    # given a ready sandbox of acme whose (fake) VM runs
    sandbox = SandboxFactory(
        team=acme, host=local_host, template_version=base_version_row, template=base_version_row.template
    )
    fake_driver.boot(
        sandbox_spec(
            sandbox.vm_name,
            fake_driver.state_dir,
            vcpus=1,
            memory_mb=512,
            kernel=Path("/vmlinuz"),
            initrd=Path("/initrd.img"),
            cmdline="",
            backing=Path("/base.qcow2"),
        )
    )
    api, base = owner.client(), f"/v1/sandboxes/{sandbox.pk}"

    # when the owner drives it through the API
    assert api.post(f"{base}/timeout", {"timeout": 600}, format="json").status_code == 200
    assert api.post(f"{base}/pause").status_code == 200
    assert api.delete(base).status_code == 200

    # then each change is one line in acme's audit log, by the owner, from the API
    rows = AuditEvent.objects.filter(team=acme).order_by("id")
    assert [(r.action, r.target, r.source, r.actor_email) for r in rows] == [
        (action, str(sandbox.pk), "api", "owner@acme.test")
        for action in ("sandbox.timeout", "sandbox.pause", "sandbox.kill")
    ]


def test_api_checkpoints_volumes_and_teams_are_in_the_audit_log(
    owner: Actor, acme: Team, local_host: Host, base_version_row: TemplateVersion, fake_driver: FakeDriver
) -> None:
    from sandboxes.models import Checkpoint

    api = owner.client()
    # a team made through the API is audited in its own log
    assert api.post("/v1/teams", {"slug": "made-by-api"}, format="json").status_code == 201
    assert AuditEvent.objects.filter(team__slug="made-by-api", action="team.create", source="api").exists()
    # deleting a checkpoint through the API is audited in its team's log
    sandbox = SandboxFactory(team=acme, host=local_host, template_version=base_version_row)
    checkpoint = Checkpoint.objects.create(
        team=acme,
        sandbox=sandbox,
        template_version=base_version_row,
        host=local_host,
        status="ready",
        cpu_count=1,
        memory_mb=512,
    )
    assert api.delete(f"/v1/sandbox_snapshots/{checkpoint.pk}?team=acme").status_code == 204
    assert AuditEvent.objects.filter(
        team=acme, action="checkpoint.delete", target=str(checkpoint.pk), source="api"
    ).exists()

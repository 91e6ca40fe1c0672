"""Sandbox control plane without VMs: validation, listing, visibility, quota, states."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sandboxes.models import Sandbox, SandboxState
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db
S = SandboxState


def _create(actor: Actor, **body):  # type: ignore[no-untyped-def]
    return actor.client().post("/v1/sandboxes", body, format="json")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"timeout": 0}, "invalid_timeout"),
        ({"timeout": 86401}, "invalid_timeout"),
        ({"timeout": "soon"}, "invalid_timeout"),
        ({"lifecycle": {"on_timeout": "kill", "auto_resume": True}}, "invalid_lifecycle"),
        ({"lifecycle": {"on_timeout": "explode"}}, "invalid_lifecycle"),
        ({"lifecycle": "pause"}, "invalid_lifecycle"),
        ({"cpu_count": 3}, "invalid_resources"),
        ({"memory_mb": 700}, "invalid_resources"),
        ({"memory_mb": 1 << 20}, "invalid_resources"),
        ({"envs": {"1BAD": "x"}}, "validation_failed"),
        ({"envs": {"A": 1}}, "validation_failed"),
        ({"metadata": ["a"]}, "validation_failed"),
        ({"volume_mounts": [{"name": "cache", "path": "cache"}]}, "invalid_path"),
        ({"volume_mounts": {"/etc/x": "cache"}}, "invalid_path"),
        ({"volume_mounts": "cache"}, "invalid_volume_mounts"),
        ({"allow_out": ["pypi.org:5432"]}, "invalid_network_policy"),
        ({"template": "no-such-template"}, "template_not_found"),
        ({"template": "base:does-not-exist"}, "template_not_found"),
        ({"template_version_id": 999999}, "template_not_found"),
    ],
)
def test_bad_create_input_is_422_with_its_code(owner: Actor, body: dict, code: str) -> None:
    response = _create(owner, **body)

    assert response.status_code == 422, response.content
    assert response.json()["error"] == code
    assert response.json()["message"]
    assert not Sandbox.objects.exists()


def test_read_key_cannot_create(owner: Actor) -> None:
    response = owner.client("read").post("/v1/sandboxes", {}, format="json")

    assert response.status_code == 403


def test_viewer_cannot_create_in_the_team(viewer: Actor) -> None:
    response = _create(viewer, team="acme")

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


def test_create_in_a_foreign_team_is_404(outsider: Actor) -> None:
    response = _create(outsider, team="acme")

    assert response.status_code == 404
    assert response.json()["error"] == "team_not_found"


def test_the_query_names_the_team_of_a_create_as_on_every_route(owner: Actor, outsider: Actor) -> None:
    # given a team named only in the query string
    foreign = outsider.client().post("/v1/sandboxes?team=acme", {"timeout": 60}, format="json")
    clash = owner.client().post("/v1/sandboxes?team=acme", {"team": "other"}, format="json")

    # then another team's slug there is a 404, as in the body, never a create elsewhere
    assert foreign.status_code == 404
    assert foreign.json()["error"] == "team_not_found"
    # and a body naming another team is refused rather than one of them guessed
    assert clash.status_code == 422
    assert "name one team" in clash.json()["message"]


def test_quota_exceeded_on_create_reports_the_snapshot(owner: Actor, acme, base_version_row) -> None:
    acme.max_running_instances = 1
    acme.save()
    SandboxFactory(team=acme, state=S.READY, cpu_count=2, memory_mb=1024)

    response = _create(owner, team="acme")

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "sandbox_quota_exceeded"
    assert body["message"] == (
        "Sandbox quota exceeded for team acme: max_running_instances 1 (in use 1, requested 1)."
    )
    assert body["quota"] == {
        "limits": {"max_running_instances": 1, "max_vcpu_count": 256, "max_memory_mb": 524288},
        "usage": {"running_instances": 1, "vcpu_count": 2, "memory_mb": 1024},
        "reservation": {"instances": 1, "vcpu_count": 1, "memory_mb": 512},
    }
    assert Sandbox.objects.filter(team=acme).count() == 1


# --- show / list ------------------------------------------------------------------------


def test_show_renders_the_spec_shape_and_never_env_vars(owner: Actor) -> None:
    sandbox = SandboxFactory(
        team=owner.personal_team, metadata={"job": "7"}, env_vars_encrypted="secret-ciphertext"
    )

    body = owner.client("read").get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]

    assert body["id"] == sandbox.pk
    assert body["state"] == "ready"
    assert body["metadata"] == {"job": "7"}
    assert body["lifecycle"] == {"on_timeout": "kill", "auto_resume": False}
    assert body["data_plane_url"] == f"http://127.0.0.1:8000/sandboxes-dp/{sandbox.route_token}"
    assert body["created_at"].endswith("Z")
    assert "started_at" not in body  # omitted until known, never null
    assert not {"env_vars", "envs", "access_token", "token", "agent_secret"} & set(body)
    assert "secret-ciphertext" not in str(body)


def test_another_teams_sandbox_is_404_everywhere(owner: Actor, outsider: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team)
    client = outsider.client()

    for method, path in [
        ("get", ""),
        ("delete", ""),
        ("post", "/pause"),
        ("post", "/resume"),
        ("post", "/timeout"),
        ("get", "/metrics"),
        ("get", "/ports/80"),
    ]:
        response = getattr(client, method)(f"/v1/sandboxes/{sandbox.pk}{path}", {"timeout": 5}, format="json")
        assert response.status_code == 404, path
        assert response.json()["error"] == "sandbox_not_found"
    assert Sandbox.objects.get(pk=sandbox.pk).state == S.READY


@pytest.mark.parametrize("sandbox_id", ["abc", "1.5", "-1", "99999999"])
def test_malformed_or_unknown_ids_are_404(owner: Actor, sandbox_id: str) -> None:
    assert owner.client().get(f"/v1/sandboxes/{sandbox_id}").status_code == 404


def _ids(actor: Actor, query: str = "") -> list[int]:
    response = actor.client("read").get(f"/v1/sandboxes{query}")
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["sandboxes"]]


def test_list_filters_by_state_aliases_and_metadata(owner: Actor, acme) -> None:
    ready = SandboxFactory(team=acme, state=S.READY, metadata={"job": "a", "tier": "x"})
    creating = SandboxFactory(team=acme, state=S.CREATING, metadata={"job": "b"})
    stopped = SandboxFactory(team=acme, state=S.STOPPED, metadata={"job": "a"})
    destroyed = SandboxFactory(team=acme, state=S.DESTROYED, metadata={"job": "a"})

    assert _ids(owner) == [stopped.pk, creating.pk, ready.pk]  # newest first, no destroyed
    assert _ids(owner, "?query[state][]=running") == [creating.pk, ready.pk]
    assert _ids(owner, "?query[state][]=paused") == [stopped.pk]
    assert _ids(owner, "?query[state][]=destroyed&query[state][]=ready") == [destroyed.pk, ready.pk]
    assert _ids(owner, "?query[metadata][job]=a") == [stopped.pk, ready.pk]
    assert _ids(owner, "?query[metadata][job]=a&query[metadata][tier]=x") == [ready.pk]


def test_unknown_state_filter_is_422(owner: Actor) -> None:
    response = owner.client().get("/v1/sandboxes?query[state][]=sleeping")

    assert response.status_code == 422
    assert "sleeping" in response.json()["message"]


def test_list_spans_the_users_teams_or_the_selected_one(owner: Actor, outsider: Actor, acme) -> None:
    mine = SandboxFactory(team=owner.personal_team)
    team = SandboxFactory(team=acme)
    SandboxFactory(team=outsider.personal_team)

    assert _ids(owner) == [team.pk, mine.pk]
    assert _ids(owner, "?team=acme") == [team.pk]
    assert outsider.client().get("/v1/sandboxes?team=acme").status_code == 404


def test_list_pages_with_next_token_and_constant_queries(owner: Actor) -> None:
    team = owner.personal_team
    rows = [SandboxFactory(team=team) for _ in range(5)]
    client = owner.client()
    client.get("/v1/sandboxes")  # the first use of a key writes last_used_at

    first = client.get("/v1/sandboxes?limit=2").json()
    second = client.get(f"/v1/sandboxes?limit=2&next_token={first['next_token']}").json()
    third = client.get(f"/v1/sandboxes?limit=2&next_token={second['next_token']}").json()

    ids = [s["id"] for page in (first, second, third) for s in page["sandboxes"]]
    assert ids == [r.pk for r in reversed(rows)]
    assert third["next_token"] is None
    with CaptureQueriesContext(connection) as few:
        client.get("/v1/sandboxes?limit=2")
    for _ in range(20):
        SandboxFactory(team=team)
    with CaptureQueriesContext(connection) as many:
        client.get("/v1/sandboxes?limit=25")
    assert len(many) == len(few)


# --- state conflicts that need no VM --------------------------------------------------------


def test_pause_of_a_paused_sandbox_is_409_already_paused(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=S.STOPPED)

    for path in ("pause", "stop"):
        response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/{path}")
        assert response.status_code == 409
        assert response.json()["error"] == "sandbox_already_paused"


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (S.EXPIRED, "sandbox_not_resumable"),
        (S.FAILED, "sandbox_not_resumable"),
        (S.LOST, "sandbox_not_resumable"),
    ],
)
def test_resume_of_an_ended_sandbox_is_409(owner: Actor, state: str, code: str) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=state)

    response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json")

    assert response.status_code == 409
    assert response.json()["error"] == code


def test_destroyed_sandbox_resume_is_404_and_delete_is_idempotent(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=S.STOPPED)
    client = owner.client()

    first = client.delete(f"/v1/sandboxes/{sandbox.pk}")
    second = client.delete(f"/v1/sandboxes/{sandbox.pk}")

    assert first.status_code == second.status_code == 200
    assert second.json()["sandbox"]["state"] == "destroyed"
    assert client.post(f"/v1/sandboxes/{sandbox.pk}/resume", {}, format="json").status_code == 404
    events = list(Sandbox.objects.get(pk=sandbox.pk).events.values_list("from_state", "to_state"))
    assert events == [("stopped", "destroyed")]


def test_timeout_on_a_paused_sandbox_is_kept_for_the_next_resume(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=S.STOPPED, timeout=300)

    response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/timeout", {"timeout": 900}, format="json")

    assert response.status_code == 200
    assert Sandbox.objects.get(pk=sandbox.pk).timeout == 900


def test_timeout_body_is_validated(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team)

    for body in ({}, {"timeout": -5}, {"timeout": 10**9}):
        response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/timeout", body, format="json")
        assert response.status_code == 422
        assert response.json()["error"] == "invalid_timeout"


def test_ports_answer_for_any_port_and_refuse_nonsense(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team)
    client = owner.client("read")

    port = client.get(f"/v1/sandboxes/{sandbox.pk}/ports/8080").json()["sandbox_port"]

    assert port["port"] == 8080
    assert port["host"] == f"p8080-{sandbox.route_token}.sandbox.localhost:8000"
    assert port["url"] == f"http://p8080-{sandbox.route_token}.sandbox.localhost:8000"
    assert port["path_url"] == f"http://127.0.0.1:8000/sandboxes-preview/{sandbox.route_token}/8080"
    assert client.get(f"/v1/sandboxes/{sandbox.pk}/ports/70000").status_code == 422


def test_metrics_of_a_sandbox_without_a_vm_are_empty(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=S.STOPPED)

    assert owner.client().get(f"/v1/sandboxes/{sandbox.pk}/metrics").json() == {"metrics": []}


def test_admin_force_destroy_records_who(admin_client) -> None:  # type: ignore[no-untyped-def]
    sandbox = SandboxFactory(state=S.STOPPED)

    response = admin_client.post(
        "/admin/sandboxes/sandbox/", {"action": "force_destroy", "_selected_action": [sandbox.pk]}
    )

    assert response.status_code == 302
    sandbox.refresh_from_db()
    assert sandbox.state == S.DESTROYED
    assert sandbox.events.get().reason.startswith("admin: ")


def test_admin_sandbox_page_hides_secrets(admin_client) -> None:  # type: ignore[no-untyped-def]
    sandbox = SandboxFactory(env_vars_encrypted="CIPHERTEXT-ENV", agent_secret_encrypted="CIPHER-AGENT")

    page = admin_client.get(f"/admin/sandboxes/sandbox/{sandbox.pk}/change/").content.decode()

    assert "CIPHERTEXT-ENV" not in page and "CIPHER-AGENT" not in page


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ({"deny_out": ["not a host"]}, "invalid_network_policy"),
        ({"allow_out": "x"}, "invalid_network_policy"),
        ({"allow_internet": False}, "validation_failed"),
        ("closed", "validation_failed"),
    ],
)
def test_a_nested_network_policy_is_never_dropped_silently(owner: Actor, policy, error) -> None:  # type: ignore[no-untyped-def]
    response = owner.client().post("/v1/sandboxes", {"timeout": 60, "network_policy": policy}, format="json")

    assert (response.status_code, response.json()["error"]) == (422, error)
    assert not Sandbox.objects.exists()


def test_a_nested_network_policy_means_what_its_keys_mean_at_the_top_level() -> None:
    from sandboxes.api.requests import SandboxCreateSerializer

    nested = SandboxCreateSerializer(
        data={"network_policy": {"allow_public_traffic": False, "allow_internet_access": False}}
    )
    twice = SandboxCreateSerializer(
        data={"allow_public_traffic": True, "network_policy": {"allow_public_traffic": False}}
    )

    assert nested.is_valid(), nested.errors
    assert nested.spec().network_policy["allow_public_traffic"] is False
    assert nested.spec().allow_internet_access is False
    assert not twice.is_valid()
    assert twice.errors == {
        "non_field_errors": [
            "allow_public_traffic is given twice with different values (top level and network_policy)."
        ]
    }


def test_twice_given_network_keys_are_a_422(owner: Actor) -> None:
    response = owner.client().post(
        "/v1/sandboxes",
        {"allow_public_traffic": True, "network_policy": {"allow_public_traffic": False}},
        format="json",
    )

    message = "allow_public_traffic is given twice with different values (top level and network_policy)."
    assert response.status_code == 422
    assert response.json() == {"error": "validation_failed", "message": message, "errors": [message]}
    assert not Sandbox.objects.exists()

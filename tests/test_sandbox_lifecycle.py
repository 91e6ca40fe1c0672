"""The sandbox lifecycle through the API and the real `watasu` SDK, on real VMs."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from sandboxes.models import Sandbox, SandboxEvent, SandboxState
from sandboxes.runtime import vm
from tests.conftest import VM_TEST_PREFIX, Actor, concurrently
from tests.sdk import run_scenario

pytestmark = pytest.mark.vm
S = SandboxState


def _agent(sandbox_id: int):  # type: ignore[no-untyped-def]
    return vm.agent_client(Sandbox.objects.get(pk=sandbox_id))


@pytest.mark.django_db
def test_whole_lifecycle_through_the_api(owner: Actor, base_version, vm_cleanup) -> None:
    client = owner.client()

    # create blocks until usable and returns a session
    created = client.post(
        "/v1/sandboxes",
        {"template": "base", "timeout": 600, "envs": {"GREETING": "hi"}, "metadata": {"n": 1}},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    sandbox_id = body["sandbox"]["id"]
    assert body["sandbox"]["state"] == "ready"
    assert body["sandbox"]["metadata"] == {"n": "1"}
    # one default shape: a create without cpu_count/memory_mb gets what sandbox_limits calls fallback
    fallback = client.get("/v1/sandbox_limits").json()["fallback"]
    assert (body["sandbox"]["cpu_count"], body["sandbox"]["memory_mb"]) == (
        fallback["cpu"],
        fallback["memory_mb"],
    )
    assert body["session"]["access_token"] == body["session"]["token"]
    assert body["session"]["data_plane_url"].endswith(body["sandbox"]["route_token"])
    agent = _agent(sandbox_id)
    assert agent.exec("echo $GREETING")["stdout"] == "hi\n"
    pid = agent.exec("sleep 1000", background=True)["pid"]

    # pause keeps memory (held in host memory first: the VM suspended); a second pause is 409
    paused = client.post(f"/v1/sandboxes/{sandbox_id}/pause")
    assert paused.json()["sandbox"]["state"] == "stopped"
    assert client.post(f"/v1/sandboxes/{sandbox_id}/pause").status_code == 409
    assert vm_cleanup.stats(f"{VM_TEST_PREFIX}{sandbox_id}").state == "paused"

    # resume restarts the same VM with the process still there and a fresh session
    resumed = client.post(f"/v1/sandboxes/{sandbox_id}/resume", {"timeout": 120}, format="json")
    assert resumed.status_code == 200, resumed.content
    assert resumed.json()["sandbox"]["state"] == "ready"
    assert resumed.json()["session"]["access_token"] != body["session"]["access_token"]
    assert {p["pid"]: p["running"] for p in _agent(sandbox_id).processes()} == {pid: True}

    # metrics read the running VM
    sample = client.get(f"/v1/sandboxes/{sandbox_id}/metrics").json()["metrics"][0]
    assert sample["cpu_count"] == 1 and sample["mem_used"] > 10 * 2**20

    # destroy removes the VM and its disk; the record stays readable
    gone = client.delete(f"/v1/sandboxes/{sandbox_id}")
    assert gone.json()["sandbox"]["state"] == "destroyed"
    assert vm_cleanup.list_domains(f"{VM_TEST_PREFIX}{sandbox_id}") == []
    assert not (vm_cleanup.state_dir / f"{VM_TEST_PREFIX}{sandbox_id}.qcow2").exists()
    transitions = list(
        SandboxEvent.objects.filter(sandbox_id=sandbox_id).values_list("from_state", "to_state")
    )
    assert transitions == [
        ("", "creating"),
        ("creating", "ready"),
        ("ready", "stopping"),
        ("stopping", "stopped"),
        ("stopped", "restoring"),
        ("restoring", "ready"),
        ("ready", "destroyed"),
    ]


@pytest.mark.django_db
def test_resume_of_a_running_sandbox_refreshes_the_deadline(owner: Actor, base_version, vm_cleanup) -> None:
    client = owner.client()
    sandbox = client.post("/v1/sandboxes", {"timeout": 60}, format="json").json()["sandbox"]

    resumed = client.post(f"/v1/sandboxes/{sandbox['id']}/connect", {"timeout": 3600}, format="json")
    timed = client.post(f"/v1/sandboxes/{sandbox['id']}/timeout", {"timeout": 30}, format="json")

    assert resumed.json()["sandbox"]["deadline_at"] > sandbox["deadline_at"]
    assert timed.json()["sandbox"]["deadline_at"] < resumed.json()["sandbox"]["deadline_at"]


@pytest.mark.django_db
def test_a_failed_start_leaves_a_failed_row_and_no_vm(owner: Actor, base_version, vm_cleanup) -> None:
    # given a template version whose artifact vanished from the host
    base_version.artifact_dir = "/nonexistent/artifact"
    base_version.save()

    response = owner.client().post("/v1/sandboxes", {}, format="json")

    assert response.status_code == 503
    assert response.json()["error"] == "sandbox_start_failed"
    assert list(Sandbox.objects.values_list("state", flat=True)) == [S.FAILED]
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []


# --- the real SDK against a live server -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_sdk_drives_the_lifecycle(live_server, owner: Actor, base_version, vm_cleanup) -> None:
    output = run_scenario("lifecycle", api_url=f"{live_server.url}/v1", api_key=owner.write_key)

    assert output == "ok\n"
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []


# --- concurrency on PostgreSQL ------------------------------------------------------------------


def _http_client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_with_one_key_make_one_sandbox(
    require_postgres, owner: Actor, base_version, vm_cleanup
) -> None:
    def send():  # type: ignore[no-untyped-def]
        response = _http_client(owner.write_key).post(
            "/v1/sandboxes", {"timeout": 120}, format="json", HTTP_IDEMPOTENCY_KEY="one-create"
        )
        return response.status_code, response.json()

    results = concurrently(20, send)

    assert Sandbox.objects.count() == 1
    created = [body for status, body in results if status == 201]
    refused = [body for status, body in results if status == 409]
    assert len(created) >= 1 and len(created) + len(refused) == 20
    assert {body["sandbox"]["id"] for body in created} == {Sandbox.objects.get().pk}
    assert {body["error"] for body in refused} <= {"idempotency_key_in_progress"}
    # a retry after the first finished replays it
    again = _http_client(owner.write_key).post(
        "/v1/sandboxes", {"timeout": 120}, format="json", HTTP_IDEMPOTENCY_KEY="one-create"
    )
    assert again.json()["sandbox"]["id"] == Sandbox.objects.get().pk


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_never_exceed_the_quota(
    require_postgres, owner: Actor, acme, base_version, vm_cleanup
) -> None:
    acme.max_running_instances = 5
    acme.save()

    def send():  # type: ignore[no-untyped-def]
        response = _http_client(owner.write_key).post(
            "/v1/sandboxes", {"team": "acme", "timeout": 120}, format="json"
        )
        return response.status_code, response.json().get("error")

    results = concurrently(30, send)

    assert sorted(results) == [(201, None)] * 5 + [(422, "sandbox_quota_exceeded")] * 25, results
    assert Sandbox.objects.filter(team=acme, state=S.READY).count() == 5
    assert len(vm_cleanup.list_domains(VM_TEST_PREFIX)) == 5

"""Sweeps against real VMs: timeouts enforced by a real Celery beat + worker, a VM killed
from outside, a domain made behind the database's back, a web process killed mid-create."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from sandboxes import sweeps
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime import lifecycle, vm
from tests.conftest import VM_TEST_PREFIX, Actor, celery_beat, celery_worker, helper_process_env
from tests.waiting import wait_until

S = SandboxState
pytestmark = [pytest.mark.vm, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent


def _create(owner: Actor, **body) -> int:  # type: ignore[no-untyped-def]
    response = owner.client().post("/v1/sandboxes", {"template": "base", **body}, format="json")
    assert response.status_code == 201, response.content
    return int(response.json()["sandbox"]["id"])


def _qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def test_timeouts_are_enforced_by_beat(
    owner: Actor, base_version, vm_cleanup, tmp_path, require_postgres
) -> None:  # type: ignore[no-untyped-def]
    killed = _create(owner, timeout=5)
    paused = _create(owner, timeout=5, lifecycle={"on_timeout": "pause"})
    agent = vm.agent_client(Sandbox.objects.get(pk=paused))
    agent.exec("echo kept > /root/kept.txt")
    counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"
    pid = agent.exec(["/bin/sh", "-c", counter], background=True)["pid"]
    env = helper_process_env(WATASU_SWEEP_DEADLINE_INTERVAL_SECONDS="1")

    with celery_worker(env), celery_beat(env, tmp_path / "beat-schedule"):
        states = Sandbox.objects.filter(pk__in=[killed, paused]).values_list("state", flat=True)
        wait_until(lambda: set(states.all()) == {S.EXPIRED, S.STOPPED}, 90, "both timeouts")

    expired, stopped = Sandbox.objects.get(pk=killed), Sandbox.objects.get(pk=paused)
    lag = (expired.ended_at - expired.deadline_at).total_seconds()
    print(f"expired {lag:.1f} s after its deadline")
    assert lag < 30
    assert vm_cleanup.list_domains(expired.vm_name) == []
    assert not (vm_cleanup.state_dir / f"{expired.vm_name}.qcow2").exists()
    assert expired.purged_at is not None
    # a pause is held in memory first (the pool sweep saves it to disk later)
    assert (vm_cleanup.domain_status(stopped.vm_name), stopped.paused_in_memory) == ("suspended", True)

    resumed = owner.client().post(f"/v1/sandboxes/{paused}/resume", {"timeout": 120}, format="json")
    assert resumed.status_code == 200, resumed.content
    agent = vm.agent_client(Sandbox.objects.get(pk=paused))
    assert agent.exec("cat /root/kept.txt")["stdout"] == "kept\n"
    assert {p["pid"]: p["running"] for p in agent.processes()} == {pid: True}
    first = int(agent.exec("cat /tmp/count")["stdout"])
    # the process kept running: it counts on past what the resume found
    wait_until(
        lambda: int(agent.exec("cat /tmp/count")["stdout"]) > first,
        60,
        "the resumed counter to move",
        seen=lambda: agent.exec("cat /tmp/count")["stdout"],
    )


def test_a_vm_killed_from_outside_becomes_lost_and_is_purged_later(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    sandbox_id = _create(owner, timeout=600)
    sandbox = Sandbox.objects.get(pk=sandbox_id)
    os.kill(_qemu_pid(sandbox.vm_name), signal.SIGKILL)
    wait_until(lambda: vm_cleanup.domain_status(sandbox.vm_name) != "running", 30, "libvirt to notice")
    # the row predates the sweep's listing of libvirt (the sweep leaves rows changed since alone)
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now() - timedelta(seconds=5))

    result = sweeps.reconcile_sweep()

    sandbox.refresh_from_db()
    assert result["hosts"][sandbox.host.name]["lost"] == 1
    assert sandbox.state == S.LOST and sandbox.ended_at is not None
    assert vm_cleanup.list_domains(sandbox.vm_name) == []  # undefined, disk kept for inspection
    disk = vm_cleanup.state_dir / f"{sandbox.vm_name}.qcow2"
    assert disk.exists()
    assert owner.client().get(f"/v1/sandboxes/{sandbox_id}").json()["sandbox"]["state"] == "lost"

    settings.SANDBOX_DISK_RETENTION_SECONDS = 0
    sweeps.retention_sweep(now=timezone.now() + timedelta(seconds=1))
    assert not disk.exists()


def test_a_domain_made_behind_the_databases_back_is_removed(owner: Actor, base_version, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    ours = _create(owner, timeout=600)
    snapshot = lifecycle.load_template_snapshot(base_version.artifact_dir)
    stray = f"{VM_TEST_PREFIX}987654321"
    lifecycle.start_from_snapshot(vm_cleanup, snapshot, stray, vm_cleanup.state_dir)
    assert vm_cleanup.domain_status(stray) == "running"

    result = sweeps.reconcile_sweep()

    assert result["hosts"][base_version.host.name]["removed"] == 1
    assert vm_cleanup.list_domains(stray) == []
    assert not (vm_cleanup.state_dir / f"{stray}.qcow2").exists()
    assert Sandbox.objects.get(pk=ours).state == S.READY
    assert vm_cleanup.domain_status(f"{VM_TEST_PREFIX}{ours}") == "running"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_web_process_killed_mid_create_leaves_no_vm_and_no_stuck_row(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "watasu.asgi:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=helper_process_env(),
    )
    try:
        wait_until(lambda: _answers(port), 30, "the web process")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/sandboxes",
            data=b'{"template": "base"}',
            method="POST",
            headers={"Authorization": f"Bearer {owner.write_key}", "Content-Type": "application/json"},
        )
        threading.Thread(target=_ignore_errors, args=(request,), daemon=True).start()
        # Kill it once the VM exists and the create has not finished.
        wait_until(
            lambda: any(
                vm_cleanup.domain_status(s.vm_name) == "running"
                for s in Sandbox.objects.filter(state=S.CREATING)
            ),
            60,
            "a VM mid-create",
        )
        web.send_signal(signal.SIGKILL)
        web.wait(timeout=10)
    finally:
        web.kill()
    sandbox = Sandbox.objects.get()
    assert sandbox.state == S.CREATING

    sweeps.reconcile_sweep()  # a young create is left alone: it may still be running
    assert vm_cleanup.domain_status(sandbox.vm_name) == "running"
    later = timezone.now() + timedelta(seconds=settings.SWEEP_STUCK_AFTER_SECONDS + 1)
    assert sweeps.stuck_sweep(now=later)["recovered"] == {"failed": 1}

    sandbox.refresh_from_db()
    assert sandbox.state == S.FAILED and sandbox.purged_at is not None
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []  # no VM without a live row
    assert not Sandbox.objects.filter(state=S.CREATING).exists()


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/schema", timeout=2)
        return True
    except OSError:
        return False


def _ignore_errors(request: urllib.request.Request) -> None:
    with contextlib.suppress(OSError):  # the server is killed under it
        urllib.request.urlopen(request, timeout=120)

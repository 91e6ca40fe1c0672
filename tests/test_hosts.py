"""Many hosts without VMs: host steps (where they run, what travels, errors and deadlines),
registration, the hosts sweep's down/unreachable/back, placement across hosts, and what a
web process answers for a host that is away. The same paths on real VMs and real host
workers: tests/test_hosts_vm.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from sandboxes import hostcalls, hosts, services
from sandboxes.edge import access
from sandboxes.edge.access import EdgeError
from sandboxes.hostcalls import HostStepFailed, decode, decode_error, encode, encode_error, run_step
from sandboxes.models import Host, HostState, SandboxState
from sandboxes.placement import host_place
from sandboxes.runtime import driver_for, vm
from sandboxes.runtime.volumes import Attachment, MountRefused
from tests.factories import HostFactory, SandboxFactory
from watasu import crypto, errors

pytestmark = pytest.mark.django_db
S = SandboxState


def _worker_host(**fields: object) -> Host:
    """A host driven by its own worker, alive and with memory to spare (as its heartbeat says)."""
    defaults: dict[str, object] = {
        "queue": "host.x",
        "last_seen_at": timezone.now(),
        "memory_available_mb": 100_000,
        "disk_free_bytes": 100 * 2**30,
    }
    host: Host = HostFactory(**{**defaults, **fields})
    host.queue = f"host.{host.name}"
    host.save(update_fields=["queue"])
    return host


# --- what travels -------------------------------------------------------------------------------


def test_rows_paths_times_bytes_and_value_types_travel_as_themselves() -> None:
    host = HostFactory()
    sandbox = SandboxFactory(host=host)
    at = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)
    value = {
        "sandbox": sandbox,
        "paths": [Path("/a/b")],
        "at": at,
        "data": b"\x00\xff",
        "started": vm.Started(agent_port=4000, agent_secret="s"),
        "mount": Attachment(unit=1, image=Path("/v/1.img"), path="/data"),
        "plain": (1, "x", None, 2.5, True),
    }
    wire = encode(value)
    assert wire["sandbox"] == {"$row": "sandboxes.Sandbox", "pk": sandbox.pk}
    back = decode(wire)
    assert back["sandbox"] == sandbox and back["paths"] == [Path("/a/b")] and back["at"] == at
    assert back["data"] == b"\x00\xff" and back["started"] == value["started"]
    assert back["mount"] == value["mount"] and back["plain"] == [1, "x", None, 2.5, True]


def test_what_is_not_declared_does_not_travel() -> None:
    from dataclasses import dataclass

    @dataclass
    class Secret:
        key: str

    with pytest.raises(TypeError, match="not a registered value type"):
        encode(Secret("k"))
    with pytest.raises(TypeError):
        encode(object())


def test_errors_come_back_as_what_callers_tell_apart() -> None:
    domain = decode_error(encode_error(errors.Conflict("busy", code="volume_attached", sandbox_id="7")))
    assert isinstance(domain, errors.Conflict)
    assert (domain.code, domain.message, domain.extra) == ("volume_attached", "busy", {"sandbox_id": "7"})
    assert isinstance(decode_error(encode_error(MountRefused("a symlink"))), MountRefused)
    other = decode_error(encode_error(KeyError("x")))
    assert isinstance(other, HostStepFailed) and "x" in str(other)


# --- where a step runs --------------------------------------------------------------------------


def test_a_step_runs_in_process_for_an_in_process_host_and_queues_for_a_worker_host(settings) -> None:
    local, remote = HostFactory(), _worker_host()
    assert hostcalls.runs_here(local)
    assert not hostcalls.runs_here(remote)
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, remote.name
    assert hostcalls.runs_here(remote)  # its own worker runs it
    settings.HOST_WORKER, settings.RUNTIME_IN_PROCESS = False, False
    with pytest.raises(errors.Unavailable) as refused:
        hostcalls.runs_here(local)  # a web process that drives no VM
    assert refused.value.code == "host_unavailable"


def test_a_web_process_never_opens_a_worker_hosts_libvirt() -> None:
    with pytest.raises(RuntimeError, match="driven by its own worker"):
        driver_for(_worker_host())


def test_a_host_whose_worker_does_not_answer_is_a_503_within_the_deadline(settings) -> None:
    settings.HOST_CALL_TIMEOUT_SECONDS = 1
    sandbox = SandboxFactory(host=_worker_host(name="silent"))
    with pytest.raises(errors.Unavailable) as raised:
        vm.status(sandbox)  # nobody consumes host.silent
    assert raised.value.code == "host_unavailable"
    assert raised.value.message == "Host silent did not answer within 1 s; retry later."


def _sent_steps(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The names of the host steps this process sends from now on."""
    from watasu.celery import app

    sent: list[str] = []
    send = app.send_task

    def spy(name, args=None, **options):  # type: ignore[no-untyped-def]
        sent.append(args[1])
        return send(name, args=args, **options)

    monkeypatch.setattr(app, "send_task", spy)
    return sent


def test_a_host_marked_down_is_refused_without_waiting(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sent = _sent_steps(monkeypatch)
    sandbox = SandboxFactory(host=_worker_host(name="gone", state=HostState.DOWN))
    with pytest.raises(errors.Unavailable, match="is down"):
        vm.status(sandbox)
    assert sent == []  # nothing queued, nothing waited for


def test_the_worker_runs_its_own_hosts_steps_and_refuses_others(settings, fake_driver, local_host) -> None:  # type: ignore[no-untyped-def]
    from sandboxes.hostcalls import seal, unseal

    sandbox = SandboxFactory(host=local_host)
    status = "sandboxes.runtime.vm.status"
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, local_host.name

    def run(host_id: int, name: str, sealed: str) -> dict[str, object]:
        return unseal(run_step(host_id, name, sealed))

    assert run(local_host.pk, status, seal(local_host, status, [sandbox], {}, 60)) == {"value": "absent"}
    other = HostFactory()
    assert "another host" in str(run(other.pk, status, seal(other, status, [sandbox], {}, 60)))
    assert "another host or step" in str(run(local_host.pk, status, seal(other, status, [sandbox], {}, 60)))
    forget = "sandboxes.runtime.vm.forget"
    assert "another host or step" in str(
        run(local_host.pk, forget, seal(local_host, status, [sandbox], {}, 60))
    )
    unknown = "sandboxes.runtime.vm.no_such_step"
    assert "different releases" in str(run(local_host.pk, unknown, seal(local_host, unknown, [], {}, 60)))
    stale = seal(local_host, status, [sandbox], {}, -120)  # its deadline (plus skew) a minute ago
    assert "after its deadline" in str(run(local_host.pk, status, stale))


def test_a_step_not_sealed_with_the_deployments_key_is_refused(
    settings, fake_driver, local_host, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # given someone who can write the broker but has not the deployment's key
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, local_host.name
    victim = tmp_path / "victim"
    victim.write_text("x")
    forged = {"v": hostcalls.PROTOCOL, "args": encode([local_host, [victim]]), "kwargs": {}}
    for payload in (forged, json.dumps(forged), crypto.encrypt_text("not json"), "garbage"):
        answer = run_step(local_host.pk, "sandboxes.checkpoints._remove_files", payload)  # type: ignore[arg-type]
        assert "not sealed" in str(hostcalls.unseal(answer)) or "not sealed" in str(answer)
    assert victim.exists()


def test_answers_carry_no_secret_in_the_clear(settings, fake_driver, local_host) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, local_host.name
    name = "sandboxes.hosts.physical_memory_mb"
    answer = run_step(local_host.pk, name, hostcalls.seal(local_host, name, [local_host], {}, 60))
    assert set(answer) == {"sealed"} and str(fake_driver.memory_mb()) not in answer["sealed"]
    assert hostcalls.unseal(answer) == {"value": fake_driver.memory_mb()}


def test_a_checkpoint_file_removal_stays_inside_the_hosts_checkpoints(local_host, tmp_path, settings) -> None:  # type: ignore[no-untyped-def]
    from sandboxes.checkpoints import _remove_files

    outside = tmp_path / "outside"
    outside.write_text("x")
    with pytest.raises(ValueError, match="outside"):
        _remove_files(local_host, [outside])
    assert outside.exists()


# --- registration and health ----------------------------------------------------------------------


def test_a_host_worker_registers_with_its_address_and_queue(settings, fake_driver, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, "node-b"
    settings.RUNTIME_HOST_ADDRESS, settings.RUNTIME_HOST_DATA_DIR = "10.1.2.3", tmp_path / "b"
    host = hosts.host_register_worker()
    assert (host.queue, host.address, host.data_dir) == ("host.node-b", "10.1.2.3", str(tmp_path / "b"))
    assert host.last_seen_at is not None and host.memory_available_mb and host.disk_free_bytes
    Host.objects.filter(pk=host.pk).update(state=HostState.DRAINING, cpu_capacity=3)
    again = services.host_register_local()  # what a builds worker on that host calls
    assert (again.pk, again.state, again.cpu_capacity, again.queue) == (host.pk, "draining", 3, "host.node-b")


@pytest.mark.parametrize("address", ["8.8.8.8", "0.0.0.0", "not-an-ip"])
def test_a_public_or_unspecified_address_is_refused(settings, address: str) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_WORKER, settings.RUNTIME_HOST_ADDRESS = True, address
    with pytest.raises(ImproperlyConfigured):
        hosts.host_register_worker()


def test_a_silent_host_goes_down_its_sandboxes_unreachable_and_both_come_back(settings) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_DOWN_AFTER_SECONDS = 20
    now = timezone.now()
    silent = _worker_host(last_seen_at=now - timedelta(seconds=21))
    alive = _worker_host(last_seen_at=now - timedelta(seconds=2))
    running = SandboxFactory(host=silent, state=S.READY)
    paused = SandboxFactory(host=silent, state=S.STOPPED)
    ended = SandboxFactory(host=silent, state=S.DESTROYED)
    elsewhere = SandboxFactory(host=alive, state=S.READY)

    report = hosts.host_health_sweep(now=now)

    assert report["hosts"][silent.name] == {"state": "down", "sandboxes": {"ready": 1, "stopped": 1}}
    silent.refresh_from_db()
    assert silent.state == HostState.DOWN
    for sandbox, reachable, state in (
        (running, False, S.READY),
        (paused, False, S.STOPPED),
        (ended, True, S.DESTROYED),
        (elsewhere, True, S.READY),
    ):
        sandbox.refresh_from_db()
        assert (sandbox.reachable, sandbox.state) == (reachable, state)  # kept, never destroyed

    Host.objects.filter(pk=silent.pk).update(last_seen_at=now)  # its worker is back
    assert hosts.host_health_sweep(now=now)["hosts"][silent.name] == "up"
    running.refresh_from_db()
    assert running.reachable and Host.objects.get(pk=silent.pk).state == HostState.UP


def test_a_drained_host_stays_drained_through_an_outage(settings) -> None:  # type: ignore[no-untyped-def]
    now = timezone.now()
    host = _worker_host(state=HostState.DRAINING, last_seen_at=now - timedelta(minutes=5))
    sandbox = SandboxFactory(host=host, state=S.READY)
    hosts.host_health_sweep(now=now)
    sandbox.refresh_from_db()
    assert Host.objects.get(pk=host.pk).state == HostState.DRAINING and not sandbox.reachable
    Host.objects.filter(pk=host.pk).update(last_seen_at=now)
    hosts.host_health_sweep(now=now)
    sandbox.refresh_from_db()
    assert Host.objects.get(pk=host.pk).state == HostState.DRAINING and sandbox.reachable


# --- placement --------------------------------------------------------------------------------


def _place(**kwargs: object) -> Host:
    with transaction.atomic():
        return host_place(cpu=1, memory_mb=512, **kwargs)  # type: ignore[arg-type]


def test_idle_equal_hosts_take_turns() -> None:
    a, b = _worker_host(), _worker_host()
    assert [_place().name for _ in range(4)] == [a.name, b.name, a.name, b.name]


def test_a_host_holding_the_template_counts_as_freer_until_the_other_is_much_emptier() -> None:
    a, b = _worker_host(), _worker_host()
    assert _place(having={b.pk}) == b
    SandboxFactory(host=b, memory_mb=2048, state=S.READY)  # now 2 GiB fuller than a
    assert _place(having={b.pk}) == a


def test_measured_memory_from_the_heartbeat_keeps_placement_off_a_short_host(settings) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_MIN_AVAILABLE_MB = 1024
    short = _worker_host(memory_available_mb=512, memory_capacity_mb=64_000)
    roomy = _worker_host(memory_capacity_mb=8192)
    assert _place() == roomy
    Host.objects.filter(pk=roomy.pk).update(state=HostState.DRAINING)
    with pytest.raises(errors.Unavailable):
        _place()
    assert short.state == HostState.UP


# --- a host away, as callers see it ----------------------------------------------------------------


def test_the_edge_answers_503_for_a_sandbox_whose_host_is_away() -> None:
    sandbox = SandboxFactory(host=_worker_host(), state=S.READY, agent_port=4000, reachable=False)
    with pytest.raises(EdgeError) as raised:
        access._upstream(sandbox, "dataplane")
    assert (raised.value.status, raised.value.body["error"]) == (503, "host_unavailable")


def test_an_upstream_is_reached_on_its_hosts_address() -> None:
    host = _worker_host(address="10.0.0.7")
    sandbox = SandboxFactory(
        host=host, state=S.READY, agent_port=4000, agent_secret_encrypted=crypto.encrypt_text("s")
    )
    assert access._upstream(sandbox, "dataplane").address == "10.0.0.7"


def test_resume_on_a_down_host_is_a_503_and_keeps_the_sandbox_paused(acme) -> None:  # type: ignore[no-untyped-def]
    host = _worker_host(state=HostState.DOWN)
    sandbox = SandboxFactory(host=host, team=acme, state=S.STOPPED)
    with pytest.raises(errors.Unavailable) as raised:
        services.sandbox_resume(sandbox=sandbox, wait=0)
    sandbox.refresh_from_db()
    assert raised.value.code == "host_unavailable" and sandbox.state == S.STOPPED


def test_destroy_on_a_down_host_ends_the_row_and_leaves_the_purge_to_its_return(settings) -> None:  # type: ignore[no-untyped-def]
    sandbox = SandboxFactory(host=_worker_host(state=HostState.DOWN), state=S.READY)
    services.sandbox_destroy(sandbox=sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == S.DESTROYED and sandbox.purged_at is None  # the retention sweep retries


def test_the_api_shows_a_sandbox_on_a_silent_host_as_unreachable_in_its_state(owner, settings) -> None:  # type: ignore[no-untyped-def]
    host = _worker_host(last_seen_at=timezone.now() - timedelta(minutes=5))
    sandbox = SandboxFactory(host=host, team=owner.personal_team, state=S.READY)
    assert owner.client().get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]["reachable"] is True
    hosts.host_health_sweep()
    body = owner.client().get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]
    assert (body["state"], body["reachable"]) == ("ready", False)
    assert "address" not in str(body) and host.data_dir not in str(body)  # host internals stay inside


def test_a_pooled_vm_is_named_as_its_hosts_worker_named_it(settings, base_version_row) -> None:  # type: ignore[no-untyped-def]
    from sandboxes.models import PooledVm

    host = _worker_host(vm_prefix="other-")
    pooled = PooledVm.objects.create(host=host, template_version=base_version_row, cpu_count=1, memory_mb=512)
    assert pooled.domain_name == f"other-pool-{pooled.pk}"  # not this process's prefix
    settings.HOST_WORKER, settings.RUNTIME_HOST_NAME = True, "node-c"
    settings.RUNTIME_VM_PREFIX = "mine-"
    assert hosts.host_register_worker().vm_prefix == "mine-"


def test_a_create_on_a_host_whose_worker_is_silent_fails_after_one_deadline(
    owner, settings, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from templates_app.models import Template, TemplateVersion, VersionStatus

    settings.HOST_CALL_TIMEOUT_SECONDS, settings.POOL_ENABLED = 1, False
    hostcalls._silent.clear()
    host = _worker_host(name="mute")
    sent = _sent_steps(monkeypatch)
    template = Template.objects.create(slug="base", name="Base")
    TemplateVersion.objects.create(
        template=template, version="v1", status=VersionStatus.READY, cpu=1, memory_mb=512, host=host
    )
    response = owner.client().post("/v1/sandboxes", {"template": "base"}, format="json")
    assert response.status_code == 503 and response.json()["error"] == "host_unavailable"
    # one step waited for (the start); the clean-up is queued, and the disk is not asked for
    assert sent == ["sandboxes.runtime.vm.start", "sandboxes.runtime.vm._destroy_here"]
    sandbox = owner.personal_team.sandboxes.get()
    assert sandbox.state == S.FAILED and sandbox.purged_at is None  # purged once the host confirms


def test_a_host_whose_heartbeat_stopped_takes_no_create_before_the_sweep_marks_it(settings) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_DOWN_AFTER_SECONDS = 20
    silent = _worker_host(last_seen_at=timezone.now() - timedelta(seconds=30), memory_capacity_mb=64_000)
    alive = _worker_host()
    assert Host.objects.get(pk=silent.pk).state == HostState.UP  # the sweep has not run yet
    assert _place() == alive


def test_a_request_pinned_to_a_host_that_takes_nothing_says_which_and_why() -> None:
    drained = _worker_host(name="vols", state=HostState.DRAINING)
    _worker_host()
    with pytest.raises(errors.Unavailable) as raised:
        _place(among=[drained.pk])
    assert raised.value.code == "host_unavailable"
    assert "host vols (draining)" in raised.value.message and "do not move" in raised.value.message


def test_pause_on_a_down_host_says_so_and_blames_nothing_on_the_sandbox(acme) -> None:  # type: ignore[no-untyped-def]
    sandbox = SandboxFactory(host=_worker_host(state=HostState.DOWN), team=acme, state=S.READY)
    with pytest.raises(errors.Unavailable) as raised:
        services.sandbox_pause(sandbox=sandbox)
    sandbox.refresh_from_db()
    assert raised.value.code == "host_unavailable"
    assert (sandbox.state, sandbox.last_error) == (S.READY, "")


def test_a_resume_whose_host_does_not_answer_leaves_the_sandbox_paused(acme, settings) -> None:  # type: ignore[no-untyped-def]
    settings.HOST_CALL_TIMEOUT_SECONDS = 1
    sandbox = SandboxFactory(
        host=_worker_host(name="quiet"), team=acme, state=S.STOPPED
    )  # no worker consumes
    with pytest.raises(errors.Unavailable) as raised:
        services.sandbox_resume(sandbox=sandbox, wait=0)
    sandbox.refresh_from_db()
    assert raised.value.code == "host_unavailable"
    assert sandbox.state == S.STOPPED  # resumable when the host answers again, never lost

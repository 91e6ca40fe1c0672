"""The VM runtime on real libvirt/QEMU domains (TCG on these machines)."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

from sandboxes.models import Sandbox
from sandboxes.runtime import images, lifecycle
from sandboxes.runtime.agent_client import AgentClient, AgentUnauthorized
from sandboxes.runtime.driver import MemorySnapshot
from sandboxes.runtime.guest.build import agent_digest
from sandboxes.runtime.libvirt_driver import LibvirtDriver
from templates_app.models import TemplateVersion, VersionStatus
from templates_app.services import artifact_ok, base_template_ensure
from tests.conftest import VM_TEST_PREFIX
from tests.waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.django_db]


@pytest.fixture
def snapshot(base_version: TemplateVersion) -> MemorySnapshot:
    return lifecycle.load_template_snapshot(base_version.artifact_dir)


def _start(driver: LibvirtDriver, snapshot: MemorySnapshot, **kwargs) -> lifecycle.RunningVm:  # type: ignore[no-untyped-def]
    name = f"{VM_TEST_PREFIX}{secrets.token_hex(4)}"
    return lifecycle.start_from_snapshot(driver, snapshot, name, driver.state_dir, **kwargs)


def test_base_template_version_is_ready_with_a_memory_snapshot(base_version: TemplateVersion) -> None:
    assert base_version.status == VersionStatus.READY
    assert (base_version.cpu, base_version.memory_mb) == (1, 512)
    assert artifact_ok(base_version.artifact_dir)
    assert base_version.size_bytes > 50 * 2**20
    # a second call is a no-op on the same version
    assert base_template_ensure(host=base_version.host).pk == base_version.pk


def test_start_from_snapshot_agent_answers(vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot) -> None:
    sandbox = _start(vm_cleanup, snapshot, env_vars={"GREETING": "hi"})

    assert AgentClient(sandbox.spec.agent_host_port).health()
    result = sandbox.client.exec("echo $GREETING; hostname; id -u")
    assert result["exit_code"] == 0
    assert result["stdout"] == f"hi\n{sandbox.name}\n0\n"
    assert vm_cleanup.stats(sandbox.name).state == "running"


def test_the_guest_runs_the_agent_zipapp_of_this_checkout(
    vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot
) -> None:
    # given a sandbox restored from the base template's memory snapshot
    sandbox = _start(vm_cleanup, snapshot)

    # when the guest is asked what it holds and what runs its commands (their parent: the agent)
    result = sandbox.client.exec(
        "ls /opt/watasu; sha256sum /opt/watasu/agent.pyz; tr '\\0' ' ' < /proc/$PPID/cmdline"
    )

    # then the image holds one file, the zipapp built from these sources, and the agent is it
    assert result["stdout"] == (
        f"agent.pyz\n{agent_digest()}  /opt/watasu/agent.pyz\n/usr/bin/python3 -S -u /opt/watasu/agent.pyz "
    )


def test_agent_refuses_requests_without_its_secret(
    vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot
) -> None:
    sandbox = _start(vm_cleanup, snapshot)

    for token in (None, "wrong-secret-0123456789", snapshot.agent_secret):
        with pytest.raises(AgentUnauthorized):
            AgentClient(sandbox.spec.agent_host_port, secret=token).exec("true")
    with pytest.raises(AgentUnauthorized):
        AgentClient(sandbox.spec.agent_host_port).init(auth=snapshot.agent_secret, secret="x" * 32)


def test_two_clones_share_neither_secret_nor_clock_nor_entropy(
    vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot
) -> None:
    a, b = _start(vm_cleanup, snapshot), _start(vm_cleanup, snapshot)

    assert a.client.secret != b.client.secret
    with pytest.raises(AgentUnauthorized):
        AgentClient(b.spec.agent_host_port, secret=a.client.secret).exec("true")
    for sandbox in (a, b):
        guest_now = float(sandbox.client.exec("date +%s.%N")["stdout"])
        assert abs(guest_now - time.time()) < 5  # not the template's frozen clock
    random = [s.client.exec("head -c 16 /dev/urandom | od -An -tx1")["stdout"] for s in (a, b)]
    assert random[0] != random[1]


def test_pause_keeps_memory_and_resume_continues(vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot) -> None:
    sandbox = _start(vm_cleanup, snapshot)
    pid = sandbox.client.exec("sleep 1000", background=True)["pid"]

    vm_cleanup.pause(sandbox.name)
    assert vm_cleanup.stats(sandbox.name).state == "shutoff"
    lifecycle.resume(vm_cleanup, sandbox.name, sandbox.client)

    assert {p["pid"]: p["running"] for p in sandbox.client.processes()} == {pid: True}
    assert sandbox.client.exec(f"kill -0 {pid}")["exit_code"] == 0
    assert abs(float(sandbox.client.exec("date +%s.%N")["stdout"]) - time.time()) < 5


def test_destroy_leaves_no_domain_and_no_disk(vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot) -> None:
    sandbox = _start(vm_cleanup, snapshot)
    vm_cleanup.pause(sandbox.name)  # its managed-save memory image must go too

    vm_cleanup.destroy(sandbox.name)

    assert vm_cleanup.list_domains(sandbox.name) == []
    assert not sandbox.spec.disk_path.exists()
    assert not vm_cleanup.sandbox_dir(sandbox.name).exists()
    vm_cleanup.destroy(sandbox.name)  # idempotent


def test_qemu_runs_unprivileged(vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot) -> None:
    sandbox = _start(vm_cleanup, snapshot)
    pid = next(
        p
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if f"guest={sandbox.name}," in p.read_bytes().decode(errors="replace")
    )
    uid_line = next(
        line for line in (pid.parent / "status").read_text().splitlines() if line.startswith("Uid:")
    )

    assert uid_line.split()[1] != "0"


GUEST_CONNECT = (
    'python3 -c "import socket,sys; s=socket.socket(); s.settimeout(3); '
    'sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))" {host} {port}'
)


def test_guest_cannot_reach_services_on_the_host(vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot) -> None:
    # given a service listening on the host's loopback, and another sandbox's agent port
    other = _start(vm_cleanup, snapshot)
    sandbox = _start(vm_cleanup, snapshot)
    for port in (5432, other.spec.agent_host_port):
        # when the guest tries the host through QEMU's gateway address
        result = sandbox.client.exec(GUEST_CONNECT.format(host="10.0.2.2", port=port))
        # then the connection is refused
        assert result["exit_code"] != 0, f"guest reached host port {port}"


def test_no_internet_sandbox_cannot_reach_out_but_its_agent_works(
    vm_cleanup: LibvirtDriver, snapshot: MemorySnapshot
) -> None:
    online = _start(vm_cleanup, snapshot)
    offline = _start(vm_cleanup, snapshot, internet=False)
    probe = GUEST_CONNECT.format(host="deb.debian.org", port=80)

    assert online.client.exec(probe)["exit_code"] == 0
    assert offline.client.exec(probe)["exit_code"] != 0
    assert offline.client.exec("true")["exit_code"] == 0


def test_a_sandbox_in_another_shape_than_the_snapshot_has_its_own_vcpus_and_memory(
    vm_cleanup: LibvirtDriver, base_version: TemplateVersion
) -> None:
    """Cold-booted, or restored from the shape's snapshot when an earlier run made it
    (tests/test_shapes_vm.py tells the two apart)."""
    from sandboxes.runtime import vm
    from tests.factories import SandboxFactory

    row: Sandbox = SandboxFactory(host=base_version.host, cpu_count=2, memory_mb=1024)
    started = vm.start(row, base_version, env_vars={})
    client = AgentClient(started.agent_port, secret=started.agent_secret)

    assert client.exec("nproc")["stdout"] == "2\n"
    total_kb = int(client.exec("awk '/MemTotal/ {print $2}' /proc/meminfo")["stdout"])
    assert 900_000 < total_kb <= 1024 * 1024


def test_corrupt_image_cache_is_detected(tmp_path: Path, base_version: TemplateVersion) -> None:
    snapshot = lifecycle.load_template_snapshot(base_version.artifact_dir)
    cached = images.load_cached(snapshot.kernel.parent, snapshot.kernel.parent.name)
    assert cached is not None
    copy = tmp_path / cached.directory.name
    shutil.copytree(cached.directory, copy)
    (copy / cached.disk.name).write_bytes(b"not a qcow2 image")

    assert images.load_cached(copy, copy.name) is None


def test_the_celery_task_builds_or_verifies_the_base_template(base_version: TemplateVersion) -> None:
    from templates_app.tasks import base_template_ensure_task

    assert base_template_ensure_task.apply().get(timeout=600) == base_version.pk


def _blocked_flock_waiters() -> int:
    """How many flock() calls on this machine wait for a lock right now ("->" in /proc/locks)."""
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "-> FLOCK" in line)


def test_a_second_builder_waits_for_the_first_and_uses_its_image(
    tmp_path: Path, base_version: TemplateVersion, settings
) -> None:  # type: ignore[no-untyped-def]
    # given an empty cache whose key a first builder holds (as `make run` beside `make test` may)
    mirror = settings.RUNTIME_APT_MIRROR or images.configured_mirror()
    key = images.cache_key(mirror)
    snapshot = lifecycle.load_template_snapshot(base_version.artifact_dir)
    built = snapshot.kernel.parent
    assert built.name == key
    cache = tmp_path / "cache"
    cache.mkdir()
    results: list[object] = []
    waiting_before = _blocked_flock_waiters()
    with images.exclusive(cache / f".{key}.lock"):
        second = threading.Thread(target=lambda: results.append(images.build_base_image(cache, mirror)))
        second.start()
        # when the second builder misses the cache and waits for the lock
        wait_until(
            _blocked_flock_waiters,
            60,
            "the second builder to wait on the cache lock",
            until=lambda n: n > waiting_before,
        )
        # and the first one puts its whole image in place and lets go
        shutil.copytree(built, cache / key, copy_function=os.link)
    second.join(timeout=120)

    # then the second one returns that image, and never started a build of its own
    assert [getattr(r, "directory", r) for r in results] == [cache / key]
    assert sorted(p.name for p in cache.iterdir()) == [f".{key}.lock", key]

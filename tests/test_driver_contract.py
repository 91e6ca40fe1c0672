"""One contract for every `RuntimeDriver`: the fake service tests use and the libvirt driver.

Each test runs twice, on `tests/fake_driver.FakeDriver` and on the real `LibvirtDriver`
(marked `vm`: real TCG domains restored from the `base` template's memory snapshot), so
the fake behaves as the real driver does wherever the platform relies on it.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxes.runtime import lifecycle
from sandboxes.runtime.driver import DomainNotFound, DriverError, MemorySnapshot, RuntimeDriver, VmSpec
from sandboxes.runtime.libvirt_driver import LibvirtDriver
from tests.conftest import VM_TEST_PREFIX
from tests.fake_driver import FAKE_MEMORY_MB, FakeDriver


@dataclass
class Runtime:
    driver: RuntimeDriver
    snapshot: MemorySnapshot
    memory_mb: int  # what the driver must report as the host's memory


def _fake_snapshot(directory: Path) -> MemorySnapshot:
    directory.mkdir()
    for name in ("memory.save", "disk.qcow2", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"")
    return MemorySnapshot(
        save_path=directory / "memory.save",
        disk_path=directory / "disk.qcow2",
        agent_secret="s",
        vcpus=1,
        memory_mb=512,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline="console=ttyS0",
    )


def _host_memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        return int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1]) // 1024


@pytest.fixture(params=["fake", pytest.param("libvirt", marks=pytest.mark.vm)])
def runtime(request, tmp_path) -> Runtime:  # type: ignore[no-untyped-def]
    if request.param == "fake":
        return Runtime(
            FakeDriver(state_dir=tmp_path / "sandboxes"),
            _fake_snapshot(tmp_path / "template"),
            FAKE_MEMORY_MB,
        )
    version = request.getfixturevalue("base_version")
    return Runtime(
        request.getfixturevalue("vm_cleanup"),
        lifecycle.load_template_snapshot(version.artifact_dir),
        _host_memory_mb(),
    )


def _name() -> str:
    return f"{VM_TEST_PREFIX}contract-{uuid.uuid4().hex[:6]}"


def _restored(runtime: Runtime, disk_name: str | None = None) -> VmSpec:
    snap = runtime.snapshot
    name = _name()
    spec = lifecycle.sandbox_spec(
        name,
        runtime.driver.state_dir,
        disk_path=runtime.driver.state_dir / f"{name}-{disk_name}" if disk_name else None,
        vcpus=snap.vcpus,
        memory_mb=snap.memory_mb,
        kernel=snap.kernel,
        initrd=snap.initrd,
        cmdline=snap.cmdline,
    )
    runtime.driver.restore(spec, snap)
    return spec


def test_both_drivers_have_every_method_of_the_protocol() -> None:
    # given the protocol's methods
    methods = [
        name for name, member in vars(RuntimeDriver).items() if callable(member) and not name.startswith("_")
    ]

    # then the fake and the libvirt driver have each, with the same parameters
    for name in methods:
        expected = list(inspect.signature(getattr(RuntimeDriver, name)).parameters)
        assert list(inspect.signature(getattr(FakeDriver, name)).parameters) == expected, name
        assert list(inspect.signature(getattr(LibvirtDriver, name)).parameters) == expected, name
    assert len(methods) == 26


def test_a_restored_domain_runs_on_its_own_disk(runtime: Runtime) -> None:
    # when a domain is restored from the template's memory snapshot
    spec = _restored(runtime)

    # then it runs, is listed under its name, and writes to its own overlay
    driver = runtime.driver
    assert driver.domain_status(spec.name) == "running"
    assert driver.stats(spec.name).state == "running"
    assert driver.list_domains(spec.name) == [spec.name]
    assert driver.domain_statuses(spec.name) == {spec.name: "running"}
    assert spec.disk_path == driver.state_dir / f"{spec.name}.qcow2"
    assert spec.disk_path.is_file()
    assert driver.sandbox_dir(spec.name).is_dir()


def test_pause_saves_the_memory_and_resume_runs_again(runtime: Runtime) -> None:
    # given a running domain
    driver, spec = runtime.driver, _restored(runtime)

    # when it is paused, then resumed
    driver.pause(spec.name)
    paused, paused_state = driver.domain_status(spec.name), driver.stats(spec.name).state
    driver.resume(spec.name)

    # then it was saved and stopped, and runs again
    assert (paused, paused_state) == ("saved", "shutoff")
    assert driver.domain_status(spec.name) == "running"


def test_suspend_keeps_the_domain_in_memory_and_unsuspend_continues_it(runtime: Runtime) -> None:
    # given a running domain
    driver, spec = runtime.driver, _restored(runtime)

    # when it is suspended, then continued
    driver.suspend(spec.name)
    suspended, suspended_state = driver.domain_status(spec.name), driver.stats(spec.name).state
    driver.unsuspend(spec.name)

    # then it was suspended (vCPUs stopped, still active) and runs again
    assert (suspended, suspended_state) == ("suspended", "paused")
    assert driver.domain_status(spec.name) == "running"
    with pytest.raises(DriverError):
        driver.unsuspend(spec.name)  # a running domain is not suspended


def test_a_suspended_domain_saved_to_disk_resumes_running(runtime: Runtime) -> None:
    # given a suspended domain
    driver, spec = runtime.driver, _restored(runtime)
    driver.suspend(spec.name)

    # when its memory goes to disk (the second tier of a pause), then it resumes
    driver.pause(spec.name)
    saved = driver.domain_status(spec.name)
    driver.resume(spec.name)

    # then it was saved, and runs (not suspended) after the resume
    assert saved == "saved"
    assert driver.domain_status(spec.name) == "running"


def test_a_hot_plugged_disk_stays_across_pause_and_its_unit_is_taken(runtime: Runtime) -> None:
    # given a running domain and a raw image (a volume's, where QEMU can reach it)
    driver, spec = runtime.driver, _restored(runtime)
    image = driver.state_dir / f"{spec.name}.volume.img"
    image.write_bytes(b"\0" * 2**20)

    # when it is attached as SCSI unit 2
    driver.attach_disk(spec.name, image, 2, qemu_uid=None)

    # then the domain has it, a second disk on that unit is refused, and a pause keeps it
    assert driver.disks(spec.name) == {2: image}
    with pytest.raises(DriverError):
        driver.attach_disk(spec.name, image, 2, qemu_uid=None)
    driver.pause(spec.name)
    driver.resume(spec.name)
    assert driver.disks(spec.name) == {2: image}
    # and destroying the domain leaves the image alone (it is the volume's, not the sandbox's)
    driver.destroy(spec.name)
    assert image.exists()
    image.unlink()


def test_resuming_a_domain_without_saved_memory_is_a_driver_error(runtime: Runtime) -> None:
    # given a running domain (nothing saved)
    spec = _restored(runtime)

    # when it is resumed, then the driver refuses
    with pytest.raises(DriverError):
        runtime.driver.resume(spec.name)
    assert runtime.driver.domain_status(spec.name) == "running"


def test_forget_keeps_the_disk_and_destroy_removes_it(runtime: Runtime) -> None:
    # given a running domain
    driver, spec = runtime.driver, _restored(runtime)

    # when it is forgotten
    driver.forget(spec.name)

    # then it is gone but its disk is kept, until destroy removes that too
    assert driver.domain_status(spec.name) == "absent"
    assert driver.list_domains(spec.name) == []
    assert spec.disk_path.is_file()
    assert not driver.sandbox_dir(spec.name).exists()
    driver.destroy(spec.name)
    assert not spec.disk_path.exists()


def test_destroy_removes_a_paused_domain_with_its_files_and_is_idempotent(runtime: Runtime) -> None:
    # given a paused domain
    driver, spec = runtime.driver, _restored(runtime)
    driver.pause(spec.name)

    # when it is destroyed twice
    driver.destroy(spec.name)
    driver.destroy(spec.name)

    # then nothing of it is left
    assert driver.domain_status(spec.name) == "absent"
    assert not spec.disk_path.exists()
    assert not driver.sandbox_dir(spec.name).exists()


def test_an_unknown_domain_is_absent_and_not_found(runtime: Runtime, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # given a name no domain has
    driver, name = runtime.driver, _name()

    # then it is absent, acting on it is DomainNotFound, and removing it does nothing
    assert driver.domain_status(name) == "absent"
    assert driver.list_domains(name) == []
    for act in (driver.pause, driver.resume, driver.stats):
        with pytest.raises(DomainNotFound):
            act(name)
    with pytest.raises(DomainNotFound):
        driver.snapshot_disk(name, tmp_path / "top.qcow2")
    driver.forget(name)
    driver.destroy(name)
    assert driver.domain_status(name) == "absent"


def test_snapshot_disk_freezes_the_old_top_and_writes_to_the_new_one(runtime: Runtime) -> None:
    # given a running domain on a disk outside its own (a build VM on a layer)
    driver, spec = runtime.driver, _restored(runtime, disk_name="layer.qcow2")
    new_top = driver.state_dir / f"{spec.name}-top.qcow2"

    # when its disk is snapshotted
    layer = driver.snapshot_disk(spec.name, new_top)

    # then the old top is the layer, the new top exists, and destroy removes the new top
    assert layer == spec.disk_path
    assert new_top.is_file()
    assert driver.domain_status(spec.name) == "running"
    driver.destroy(spec.name)
    assert not new_top.exists()
    assert layer.is_file()
    layer.unlink()


def test_destroy_removes_the_domains_own_disk_under_a_capture_layer(runtime: Runtime) -> None:
    # given a domain whose disk was switched to a layer in its own directory (a capture)
    driver, spec = runtime.driver, _restored(runtime)
    driver.snapshot_disk(spec.name, driver.sandbox_dir(spec.name) / "top.qcow2")

    # when it is destroyed before the layer is merged back
    driver.destroy(spec.name)

    # then its own disk is gone too
    assert not spec.disk_path.exists()
    assert not driver.sandbox_dir(spec.name).exists()


def test_commit_disk_merges_the_top_back_and_the_copies_stand_alone(runtime: Runtime) -> None:
    # given a running domain whose disk was switched to a new top
    driver, spec = runtime.driver, _restored(runtime)
    top = driver.sandbox_dir(spec.name) / "top.qcow2"
    layer = driver.snapshot_disk(spec.name, top)
    export = driver.state_dir / f"{spec.name}-export.qcow2"
    imported = driver.state_dir / f"{spec.name}-imported.qcow2"

    # when the frozen layer is exported, imported for another domain, and the top merged back
    driver.export_disk(layer, export)
    driver.import_disk(export, imported, qemu_uid=None)
    driver.commit_disk(spec.name, spec.disk_path)
    driver.commit_disk(spec.name, spec.disk_path)  # nothing left to merge: a no-op

    # then the domain writes to its own disk again, the top is gone, the copies are private
    assert not top.exists()
    assert driver.domain_status(spec.name) == "running"
    assert export.stat().st_mode & 0o777 == imported.stat().st_mode & 0o777 == 0o600
    with pytest.raises(DriverError):
        driver.commit_disk(spec.name, driver.state_dir / "not-in-the-chain.qcow2")
    driver.destroy(spec.name)
    assert not spec.disk_path.exists()
    export.unlink()
    imported.unlink()


def test_save_snapshot_writes_the_memory_and_stops_the_domain(runtime: Runtime) -> None:
    # given a running domain
    driver, spec = runtime.driver, _restored(runtime)
    dest = driver.sandbox_dir(spec.name).with_suffix(".save")

    # when its memory is saved
    driver.save_snapshot(spec.name, dest)

    # then the file holds it, and the domain is stopped but still defined
    assert dest.stat().st_size > 0
    assert driver.domain_status(spec.name) == "shutoff"
    assert driver.list_domains(spec.name) == [spec.name]
    driver.destroy(spec.name)
    dest.unlink()


def test_booting_without_a_disk_or_a_backing_image_is_a_driver_error(runtime: Runtime) -> None:
    # given a spec whose disk does not exist and that names no backing image
    snap = runtime.snapshot
    spec = lifecycle.sandbox_spec(
        _name(),
        runtime.driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=snap.kernel,
        initrd=snap.initrd,
        cmdline=snap.cmdline,
    )

    # when it is booted, then the driver refuses and defines nothing
    with pytest.raises(DriverError):
        runtime.driver.boot(spec)
    assert runtime.driver.domain_status(spec.name) == "absent"
    runtime.driver.forget(spec.name)


def test_a_cold_boot_runs_on_an_overlay_of_its_backing_image(runtime: Runtime) -> None:
    # given a spec on the template's disk
    snap = runtime.snapshot
    spec = lifecycle.sandbox_spec(
        _name(),
        runtime.driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=snap.kernel,
        initrd=snap.initrd,
        cmdline=snap.cmdline,
        backing=snap.disk_path,
    )

    # when it boots
    runtime.driver.boot(spec)

    # then it runs on its own new disk
    assert runtime.driver.domain_status(spec.name) == "running"
    assert spec.disk_path.is_file()


def test_the_host_answers_and_reports_its_memory(runtime: Runtime) -> None:
    # then the hypervisor answers, the connection stands, the memory is the host's
    assert runtime.driver.alive() is True
    assert runtime.driver.connected() is True
    assert runtime.driver.memory_mb() == runtime.memory_mb
    assert 0 < runtime.driver.memory_available_mb() <= runtime.memory_mb

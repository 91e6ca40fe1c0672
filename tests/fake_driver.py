"""A `RuntimeDriver` without VMs, for service tests where a real VM adds nothing.

Domains are entries in a dict; disks, saved memory and layers are real (tiny) files, so
code that checks or removes files sees what it would see with libvirt. The contract
suite (tests/test_driver_contract.py) runs the same checks against this class and the
libvirt driver, so the two cannot drift apart. Never a stand-in for the guest agent:
a VM started here has no agent to talk to.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sandboxes.runtime.driver import DomainNotFound, DomainStats, DriverError, MemorySnapshot, VmSpec

FAKE_MEMORY_MB = 4096


@dataclass
class FakeDomain:
    """One defined domain: where it writes and what libvirt would call its status."""

    spec: VmSpec
    disk_path: Path
    status: str  # running | suspended | saved | shutoff
    scsi: dict[int, Path] = field(default_factory=dict)
    chain: list[Path] = field(default_factory=list)  # the layers below disk_path, top first


class FakeDriver:
    """`RuntimeDriver` over a dict, with the constructor `driver_for` calls."""

    def __init__(self, *, uri: str = "fake:///", accel: str = "tcg", state_dir: Path) -> None:
        self.uri, self.accel = uri, accel
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.domains: dict[str, FakeDomain] = {}
        self.up = True  # False: the hypervisor stops answering
        self.available_mb = FAKE_MEMORY_MB  # what `memory_available_mb` reports (tests lower it)

    def sandbox_dir(self, name: str) -> Path:
        return self.state_dir / name

    def _domain(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise DomainNotFound(name)
        return self.domains[name]

    def _start(self, spec: VmSpec, backing: Path | None) -> None:
        self.sandbox_dir(spec.name).mkdir(parents=True, exist_ok=True)
        if not spec.disk_path.exists():
            if backing is None:
                raise DriverError(f"{spec.disk_path} missing and no backing image given")
            spec.disk_path.write_bytes(b"")
        self.domains[spec.name] = FakeDomain(spec, spec.disk_path, "running")

    def boot(self, spec: VmSpec) -> None:
        self._start(spec, spec.backing_path)

    def restore(self, spec: VmSpec, snapshot: MemorySnapshot, *, overlay: bool = True) -> None:
        if overlay:
            spec.disk_path.unlink(missing_ok=True)
        elif not spec.disk_path.exists():
            raise DriverError(f"{spec.disk_path} missing: a restore on its own disk needs it")
        self._start(spec, snapshot.disk_path)

    def save_and_continue(self, name: str, memory_dest: Path, disk_dest: Path) -> None:
        domain = self._domain(name)
        memory_dest.write_bytes(b"memory")
        self.export_disk(domain.disk_path, disk_dest)

    def save_snapshot(self, name: str, dest: Path) -> None:
        domain = self._domain(name)
        dest.write_bytes(b"memory")
        domain.status = "shutoff"

    def pause(self, name: str) -> None:
        self._domain(name).status = "saved"

    def resume(self, name: str) -> None:
        domain = self._domain(name)
        if domain.status != "saved":
            raise DriverError(f"{name} has no managed save image to resume from")
        domain.status = "running"

    def suspend(self, name: str) -> None:
        domain = self._domain(name)
        if domain.status not in ("running", "suspended"):
            raise DriverError(f"could not suspend {name}: it does not run")
        domain.status = "suspended"

    def unsuspend(self, name: str) -> None:
        domain = self._domain(name)
        if domain.status != "suspended":
            raise DriverError(f"{name} is not suspended")
        domain.status = "running"

    def forget(self, name: str) -> None:
        self.domains.pop(name, None)
        shutil.rmtree(self.sandbox_dir(name), ignore_errors=True)

    def destroy(self, name: str) -> None:
        domain = self.domains.get(name)
        own = self.state_dir / f"{name}.qcow2"
        disk = domain.disk_path if domain else own
        self.forget(name)
        disk.unlink(missing_ok=True)
        own.unlink(missing_ok=True)

    def snapshot_disk(self, name: str, new_top: Path, *, qemu_uid: int | None = None) -> Path:
        domain = self._domain(name)
        old_top, domain.disk_path = domain.disk_path, new_top
        domain.chain.insert(0, old_top)
        new_top.write_bytes(b"")
        return old_top

    def commit_disk(self, name: str, base: Path) -> None:
        domain = self._domain(name)
        if domain.disk_path == base:
            return
        if base not in domain.chain:
            raise DriverError(f"{base} is not in the disk chain of {name}")
        merged = [domain.disk_path, *domain.chain[: domain.chain.index(base)]]
        with base.open("ab") as out:
            for layer in reversed(merged):
                out.write(layer.read_bytes())
                layer.unlink(missing_ok=True)
        domain.disk_path, domain.chain = base, domain.chain[domain.chain.index(base) + 1 :]

    def export_disk(self, layer: Path, dest: Path) -> None:
        shutil.copyfile(layer, dest)
        dest.chmod(0o600)

    def import_disk(self, source: Path, dest: Path, *, qemu_uid: int | None) -> None:
        shutil.copyfile(source, dest)
        dest.chmod(0o600)

    def attach_disk(self, name: str, image: Path, unit: int, *, qemu_uid: int | None) -> None:
        domain = self._domain(name)
        if unit in domain.scsi:
            raise DriverError(f"{name} already has a disk at SCSI unit {unit}")
        if domain.status != "running" or not image.exists():
            raise DriverError(f"could not attach {image} to {name}")
        domain.scsi[unit] = image

    def disks(self, name: str) -> dict[int, Path]:
        return dict(self._domain(name).scsi)

    def stats(self, name: str) -> DomainStats:
        status = self._domain(name).status
        state = {"running": "running", "suspended": "paused"}.get(status, "shutoff")
        return DomainStats(cpu_time_ns=0, memory_rss_kb=0, state=state)

    def list_domains(self, prefix: str) -> list[str]:
        return sorted(name for name in self.domains if name.startswith(prefix))

    def domain_status(self, name: str) -> str:
        domain = self.domains.get(name)
        return domain.status if domain else "absent"

    def domain_statuses(self, prefix: str) -> dict[str, str]:
        return {name: self.domains[name].status for name in self.list_domains(prefix)}

    def alive(self) -> bool:
        return self.up

    def memory_mb(self) -> int:
        return FAKE_MEMORY_MB

    def memory_available_mb(self) -> int:
        return self.available_mb

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        return None


def fake_vm(driver: FakeDriver, name: str, status: str = "running") -> Path:
    """A domain named ``name`` on its own (empty) disk, running or suspended; returns the disk."""
    from sandboxes.runtime.lifecycle import sandbox_spec

    spec = sandbox_spec(
        name,
        driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=Path("/vmlinuz"),
        initrd=Path("/initrd.img"),
        cmdline="",
        backing=Path("/base.qcow2"),
    )
    driver.boot(spec)
    if status == "suspended":
        driver.suspend(name)
    return spec.disk_path

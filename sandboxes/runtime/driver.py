"""The runtime driver interface: everything the platform asks of a VM host.

``libvirt_driver`` implements it (and is the only module importing libvirt); service
tests use a fake (tests/fake_driver.py) that a contract suite
(tests/test_driver_contract.py) holds to the libvirt driver's behaviour.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class VmSpec:
    """One VM's identity, limits and boot inputs.

    ``disk_path`` is the sandbox's own qcow2 overlay; if it does not exist yet the driver
    creates it on top of ``backing_path``. ``cmdline`` carries the agent boot token.
    """

    name: str
    uuid: str
    vcpus: int
    memory_mb: int
    disk_path: Path
    kernel: Path
    initrd: Path
    cmdline: str
    agent_host_port: int
    backing_path: Path | None = None
    internet: bool = True  # False: no egress at all (slirp restrict=on); the agent port still works
    # A sandbox's own QEMU uid (libvirt DAC label `+uid:+gid` of the QEMU group): one escaped
    # QEMU cannot open another sandbox's disk. None: the shared QEMU user (templates, builds).
    qemu_uid: int | None = None


@dataclass(frozen=True)
class DomainStats:
    """Resource usage of one running (or stopped) domain."""

    cpu_time_ns: int
    memory_rss_kb: int
    state: str


@dataclass(frozen=True)
class MemorySnapshot:
    """A template's memory snapshot plus the immutable disk it was taken on.

    ``agent_secret`` is the secret the snapshot's (sealed) agent holds: the one thing that
    authenticates the first init of every clone, so the host keeps it private.
    """

    save_path: Path
    disk_path: Path
    agent_secret: str
    vcpus: int
    memory_mb: int
    kernel: Path
    initrd: Path
    cmdline: str
    extra: dict[str, str] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Persist as JSON (mode 0600: it holds the template secret)."""
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        path.write_text(json.dumps(data, indent=2))
        path.chmod(0o600)

    @classmethod
    def read(cls, path: Path) -> MemorySnapshot:
        d = json.loads(path.read_text())
        for k in ("save_path", "disk_path", "kernel", "initrd"):
            d[k] = Path(d[k])
        return cls(**d)


class DriverError(Exception):
    """Base of runtime failures the platform can act on (mark the sandbox failed, retry)."""


class DomainNotFound(DriverError):
    """No domain with that name on this host."""


class RuntimeDriver(Protocol):
    """What the platform needs from a VM host: every method any caller uses.

    Domain names are unique per host. Methods that name a domain raise ``DomainNotFound``
    when there is none, except ``destroy``, ``forget`` and ``domain_status``.
    """

    state_dir: Path  # per-domain directories, and sandbox disks unless a spec names another place

    def sandbox_dir(self, name: str) -> Path:
        """The domain's own directory under ``state_dir`` (console log, restore image)."""

    def boot(self, spec: VmSpec) -> None:
        """Define and cold-boot a domain; its disk is made on ``spec.backing_path`` if missing
        (``DriverError`` when it is missing and there is no backing image)."""

    def restore(self, spec: VmSpec, snapshot: MemorySnapshot, *, overlay: bool = True) -> None:
        """Start a domain from a template memory snapshot under ``spec``'s identity, on a
        fresh overlay of the snapshot's disk (``overlay=False``: on ``spec.disk_path`` as it
        is, a copy of the disk the memory was saved with)."""

    def save_snapshot(self, name: str, dest: Path) -> None:
        """Write the running domain's memory to ``dest`` and stop it (it stays defined)."""

    def save_and_continue(self, name: str, memory_dest: Path, disk_dest: Path) -> None:
        """Write the running domain's memory to ``memory_dest`` and its disk, as it is at
        that instant, to ``disk_dest`` (``export_disk``), then start the domain again from
        that memory: its processes carry on, stopped for the time of both writes."""

    def pause(self, name: str) -> None:
        """Stop the domain keeping its memory on disk (survives host restarts)."""

    def resume(self, name: str) -> None:
        """Start a paused domain from its saved memory (``DriverError`` when it has none)."""

    def suspend(self, name: str) -> None:
        """Stop the running domain's vCPUs, keeping its memory resident (in host RAM, not on
        disk: a host restart loses it). Status ``suspended``; ``unsuspend`` continues it."""

    def unsuspend(self, name: str) -> None:
        """Continue a suspended domain (tens of milliseconds); ``DriverError`` when it is not
        suspended."""

    def destroy(self, name: str) -> None:
        """Stop and forget the domain and delete its disk and files. Idempotent."""

    def forget(self, name: str) -> None:
        """Stop and undefine the domain but keep its disk (template builds, failed sandboxes).
        Idempotent."""

    def snapshot_disk(self, name: str, new_top: Path, *, qemu_uid: int | None = None) -> Path:
        """Freeze the running disk as a layer; the domain writes to ``new_top`` from now on
        (a file of ``qemu_uid``, as in its ``VmSpec``). Returns the frozen layer (the
        previous top)."""

    def commit_disk(self, name: str, base: Path) -> None:
        """Merge the running domain's disk layers above ``base`` back into ``base``, which
        the domain writes to again; the merged layers are deleted. A no-op when ``base`` is
        the top; ``DriverError`` when ``base`` is not in the domain's chain."""

    def export_disk(self, layer: Path, dest: Path) -> None:
        """Copy a layer no domain writes any more to ``dest`` (for the host only), atomically."""

    def import_disk(self, source: Path, dest: Path, *, qemu_uid: int | None) -> None:
        """Copy the qcow2 ``source`` to ``dest`` as a new domain's disk (its backing file
        kept), atomically, owned by ``qemu_uid``'s QEMU."""

    def attach_disk(self, name: str, image: Path, unit: int, *, qemu_uid: int | None) -> None:
        """Hot-plug the raw disk ``image`` into the running domain as SCSI unit ``unit`` of
        its virtio-scsi controller (the guest sees ``/sys/bus/scsi/devices/*:0:0:<unit>``),
        first handing the file to the domain's QEMU (``qemu_uid``, as in its ``VmSpec``).
        The attachment is part of the domain's definition and of its saved memory, so it
        survives pause and resume. A unit already in use is a ``DriverError``."""

    def disks(self, name: str) -> dict[int, Path]:
        """The hot-plugged disks of the domain, by unit."""

    def stats(self, name: str) -> DomainStats:
        """CPU time, resident memory and state."""

    def list_domains(self, prefix: str) -> list[str]:
        """Names of all domains (running or not) starting with ``prefix``, sorted."""

    def domain_status(self, name: str) -> str:
        """running | suspended (vCPUs stopped, memory resident) | saved (stopped with saved
        memory) | shutoff | absent."""

    def domain_statuses(self, prefix: str) -> dict[str, str]:
        """``domain_status`` of every domain whose name starts with ``prefix``."""

    def alive(self) -> bool:
        """Whether the hypervisor answers."""

    def memory_mb(self) -> int:
        """The host's physical memory."""

    def memory_available_mb(self) -> int:
        """Host memory free for new guests right now (free + page cache), as measured: what
        page sharing saves shows up here."""

    def connected(self) -> bool:
        """Whether this driver's connection still stands (``driver_for`` reconnects if not)."""

    def close(self) -> None:
        """Release the connection. Never raises."""


# The address every agent port this process forwards listens on: its host's
# (``Host.address``; loopback unless the host serves web processes on other machines).
# ``driver_for`` sets it from WATASU_HOST_ADDRESS.
agent_address = "127.0.0.1"


def set_agent_address(address: str) -> None:
    global agent_address
    agent_address = address


def free_tcp_port(host: str | None = None) -> int:
    """A port the kernel considers free right now (racy by nature; QEMU fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host or agent_address, 0))
        return int(s.getsockname()[1])

"""libvirt/QEMU implementation of ``RuntimeDriver`` — the only module that imports libvirt.

Per sandbox: one persistent domain named after the sandbox, a qcow2 overlay, and a
directory ``state_dir/<name>/`` for its console log and transient restore image. Pause is
libvirt's managed save (memory kept on disk), resume starts from it. Snapshot starts
write a per-clone copy of the template's save image with the clone's identity in its XML
(see ``saveimage``) and restore that.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from . import driver as driver_module
from .driver import DomainNotFound, DomainStats, DriverError, MemorySnapshot, VmSpec
from .saveimage import CloneIdentity, CloneStream, write_clone

AGENT_GUEST_PORT = 49983
DEFAULT_URI = "qemu:///system"
DEFAULT_STATE_DIR = Path("/var/lib/watasu/sandboxes")
QEMU_IMG_TIMEOUT = 60.0
COPY_TIMEOUT = 600.0
COMMIT_TIMEOUT = 120.0
KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 3  # a hung libvirtd fails calls after ~20 s

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt keepalives (our timeout on a hung daemon) need a running event loop."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def host_has_hw_virt(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """vmx/svm flags are the reliable signal: this host's /dev/kvm exists but is unusable."""
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags") and ({"vmx", "svm"} & set(line.split())):
            return True
    return False


def resolve_accel(accel: str) -> str:
    """ "auto" -> "kvm" with hardware virtualisation, else "tcg"."""
    if accel == "auto":
        return "kvm" if host_has_hw_virt() else "tcg"
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
    return accel


def _unblock_fifo(fifo: Path) -> None:
    """If libvirt failed before opening the FIFO, open it once so the writer stops."""
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def qemu_ids(user: str) -> tuple[int, int] | None:
    """uid/gid QEMU runs as (scripts/setup-host makes the user), None if it does not exist."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def give_to_qemu(path: Path, user: str, uid: int | None = None) -> None:
    """QEMU runs unprivileged and libvirt does not relabel files (dynamic_ownership = 0):
    the file goes to the sandbox's own uid (or the QEMU user) and the QEMU group."""
    ids = qemu_ids(user)
    if ids is not None:
        os.chown(path, uid if uid is not None else ids[0], ids[1])


def create_overlay(backing: Path, dest: Path, user: str, uid: int | None = None) -> None:
    """Instant copy-on-write disk for one sandbox on an immutable backing image,
    readable and writable by its QEMU's uid only (0600): it holds the tenant's data."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(dest)],
        check=True,
        capture_output=True,
        timeout=QEMU_IMG_TIMEOUT,
    )
    dest.chmod(0o600)
    give_to_qemu(dest, user, uid)


def copy_sparse(source: Path, dest: Path) -> None:
    """Copy a file keeping its holes (a qcow2 of a 4 GiB disk is mostly holes) and sync it."""
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", "--", str(source), str(dest)],
        check=True,
        capture_output=True,
        timeout=COPY_TIMEOUT,
    )
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_atomically(source: Path, dest: Path, own: Callable[[Path], None]) -> None:
    """``source`` to ``dest`` through a temporary name: synced, mode 0600, owned by ``own``,
    then renamed, so ``dest`` never exists half-written."""
    tmp = dest.with_name(f".{dest.name}.copy")
    try:
        copy_sparse(source, tmp)
        tmp.chmod(0o600)
        own(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dac_label(uid: int, user: str) -> str:
    """libvirt DAC label running QEMU as `uid` in the QEMU user's group (the firewall's match)."""
    ids = qemu_ids(user)
    return f"+{uid}:+{ids[1] if ids else uid}"


@dataclass
class LibvirtDriver:
    """RuntimeDriver over one libvirt connection."""

    uri: str = DEFAULT_URI
    state_dir: Path = DEFAULT_STATE_DIR
    accel: str = "auto"
    tb_cache_mb: int = 128  # TCG translation cache; QEMU's 1 GiB default inflates RSS
    qemu_user: str = "watasu-qemu"
    restore_via_fifo: bool = True  # stream clones through a pipe instead of writing a copy

    def __post_init__(self) -> None:
        self.accel = resolve_accel(self.accel)
        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # QEMU (unprivileged) must traverse it
        _ensure_event_loop()
        self.conn = libvirt.open(self.uri)
        self.conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)

    # ------------------------------------------------------------------ paths / XML

    def sandbox_dir(self, name: str) -> Path:
        return self.state_dir / name

    def console_path(self, name: str) -> Path:
        return self.sandbox_dir(name) / "console.log"

    def domain_xml(self, spec: VmSpec) -> str:
        """Domain definition: q35, direct kernel boot, virtio disk, user-mode net with the
        agent port forwarded to host loopback, and a virtio-scsi controller that volumes are
        hot-plugged into (q35's root bus cannot hot-plug; a SCSI bus can, without a PCI slot
        per disk). The NIC gets an explicit PCI address: added
        through qemu:commandline, it otherwise collides with libvirt's own slot allocation."""
        kvm = self.accel == "kvm"
        cpu = "<cpu mode='host-passthrough'/>" if kvm else ""
        tcg = "" if kvm else f"<tcg><tb-cache unit='MiB'>{self.tb_cache_mb}</tb-cache></tcg>"
        # No IPv6 for guests: the host firewall and the network policy speak IPv4.
        netdev = (
            f"user,id=wnet0,ipv6=off,hostfwd=tcp:{driver_module.agent_address}:{spec.agent_host_port}"
            f"-:{AGENT_GUEST_PORT}"
        )
        if not spec.internet:
            netdev += ",restrict=on"
        nic = "virtio-net-pci,netdev=wnet0,bus=pcie.0,addr=0x10,romfile="
        seclabel = (
            ""
            if spec.qemu_uid is None
            else (
                "\n  <seclabel type='static' model='dac' relabel='no'>"
                f"<label>{dac_label(spec.qemu_uid, self.qemu_user)}</label></seclabel>"
            )
        )
        return f"""<domain type='{"kvm" if kvm else "qemu"}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  <uuid>{spec.uuid}</uuid>
  <memory unit='MiB'>{spec.memory_mb}</memory>
  <currentMemory unit='MiB'>{spec.memory_mb}</currentMemory>
  <vcpu placement='static'>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel>
    <initrd>{escape(str(spec.initrd))}</initrd>
    <cmdline>{escape(spec.cmdline)}</cmdline>
  </os>
  <features><acpi/>{tcg}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file={quoteattr(str(spec.disk_path))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <serial type='file'>
      <source path={quoteattr(str(self.console_path(spec.name)))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>{seclabel}
  <qemu:commandline>
    <qemu:arg value='-netdev'/><qemu:arg value='{netdev}'/>
    <qemu:arg value='-device'/><qemu:arg value='{nic}'/>
  </qemu:commandline>
</domain>"""

    def _prepare(self, spec: VmSpec, backing: Path | None) -> None:
        """Sandbox directory and disk overlay (created only if missing)."""
        self.sandbox_dir(spec.name).mkdir(parents=True, exist_ok=True)
        if not spec.disk_path.exists():
            if backing is None:
                raise DriverError(f"{spec.disk_path} missing and no backing image given")
            create_overlay(backing, spec.disk_path, self.qemu_user, spec.qemu_uid)

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(name) from e
            raise

    # ------------------------------------------------------------------ lifecycle

    def boot(self, spec: VmSpec) -> None:
        """Cold boot: define a persistent domain (managed save needs one) and start it."""
        self._prepare(spec, spec.backing_path)
        dom = self.conn.defineXML(self.domain_xml(spec))
        dom.create()

    def restore(self, spec: VmSpec, snapshot: MemorySnapshot, *, overlay: bool = True) -> None:
        """Start ``spec`` from the template's memory under the clone's own identity.

        The overlay is created on the snapshot's disk (the memory image's page cache and
        filesystem state match that disk, not the base image).
        """
        # The memory image only matches a fresh overlay of the snapshot's disk: a leftover
        # file under this name would hand the guest a filesystem its page cache contradicts.
        if overlay:
            spec.disk_path.unlink(missing_ok=True)
        elif not spec.disk_path.exists():
            raise DriverError(f"{spec.disk_path} missing: a restore on its own disk needs it")
        self._prepare(spec, snapshot.disk_path)
        clone = self.sandbox_dir(spec.name) / "restore.save"
        ident = CloneIdentity(
            spec.name,
            spec.uuid,
            spec.disk_path,
            spec.agent_host_port,
            self.console_path(spec.name),
            internet=spec.internet,
            dac_label=None if spec.qemu_uid is None else dac_label(spec.qemu_uid, self.qemu_user),
        )
        if not self.restore_via_fifo:
            try:
                self.conn.defineXML(write_clone(snapshot.save_path, clone, ident))
                self.conn.restoreFlags(str(clone), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
            finally:
                clone.unlink(missing_ok=True)
            return
        stream = CloneStream(snapshot.save_path, clone, ident)
        self.conn.defineXML(stream.xml)
        stream.start()
        try:
            self.conn.restoreFlags(str(clone), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except BaseException:
            _unblock_fifo(clone)  # libvirt may have failed before opening it
            stream.finish(raise_errors=False)
            raise
        stream.finish()

    def save_snapshot(self, name: str, dest: Path) -> None:
        """Save memory to ``dest`` (the domain stops; its definition stays)."""
        self._domain(name).save(str(dest))

    def save_and_continue(self, name: str, memory_dest: Path, disk_dest: Path) -> None:
        """``save`` (the domain stops, its definition stays), copy its disk, ``restore`` it."""
        dom = self._domain(name)
        disk = self._disk_path(name)
        if disk is None:
            raise DomainNotFound(name)
        dom.save(str(memory_dest))
        try:
            self.export_disk(disk, disk_dest)
        finally:
            self.conn.restoreFlags(str(memory_dest), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)

    def pause(self, name: str) -> None:
        """Managed save: the memory goes to disk, the domain stops and stays defined. A
        suspended domain is saved too, and starts running again on resume."""
        self._domain(name).managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)

    def resume(self, name: str) -> None:
        """Start from the managed save; a domain without one is a ``DriverError``."""
        dom = self._domain(name)
        if not dom.hasManagedSaveImage(0):
            raise DriverError(f"{name} has no managed save image to resume from")
        dom.create()

    def suspend(self, name: str) -> None:
        """Stop the vCPUs; QEMU keeps the memory (libvirt's ``paused`` state)."""
        try:
            self._domain(name).suspend()
        except libvirt.libvirtError as exc:
            raise DriverError(f"could not suspend {name}: {exc}") from exc

    def unsuspend(self, name: str) -> None:
        """Continue a suspended domain."""
        dom = self._domain(name)
        if not dom.isActive() or dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            raise DriverError(f"{name} is not suspended")
        try:
            dom.resume()
        except libvirt.libvirtError as exc:
            raise DriverError(f"could not continue {name}: {exc}") from exc

    def forget(self, name: str) -> None:
        """Stop and undefine the domain and drop its sandbox dir, keeping its disk."""
        self._undefine(name)
        shutil.rmtree(self.sandbox_dir(name), ignore_errors=True)

    def _undefine(self, name: str) -> None:
        try:
            dom = self._domain(name)
        except DomainNotFound:
            return
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )

    def destroy(self, name: str) -> None:
        """Stop, undefine (incl. managed save) and delete disk + sandbox files. Idempotent."""
        # A domain already undefined (stopped and kept for inspection) has its disk at the
        # conventional place.
        own = self.state_dir / f"{name}.qcow2"
        disk = self._disk_path(name) or own
        self._undefine(name)
        # The top (a capture's layer lives in the sandbox dir, on the disk below it) and the
        # domain's own disk; build layers elsewhere are the caller's.
        for path in {disk, own}:
            if path.parent != self.sandbox_dir(name):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.sandbox_dir(name), ignore_errors=True)

    def _disk_path(self, name: str) -> Path | None:
        try:
            root = ET.fromstring(self._domain(name).XMLDesc(0))
        except DomainNotFound:
            return None
        src = root.find("./devices/disk/source")
        return Path(src.get("file", "")) if src is not None and src.get("file") else None

    def snapshot_disk(self, name: str, new_top: Path, *, qemu_uid: int | None = None) -> Path:
        """Switch a running domain's disk to a fresh overlay ``new_top``; returns the old top.

        The old top stops changing the moment this returns, so it is a layer: everything
        the guest wrote since the previous switch. The caller quiesces the guest first
        (agent ``fsfreeze``): the freeze flushes the guest page cache and makes QEMU write its
        qcow2 metadata, so the layer is consistent. We create the overlay ourselves
        (``REUSE_EXT``) so it belongs to the unprivileged QEMU user.
        """
        old_top = self._disk_path(name)
        if old_top is None:
            raise DomainNotFound(name)
        create_overlay(old_top, new_top, self.qemu_user, qemu_uid)
        # Only the root disk: hot-plugged volumes (raw, their own filesystems) stay as they are.
        others = "".join(
            f"<disk name={quoteattr(dev)} snapshot='no'/>" for dev in self._disk_targets(name) if dev != "vda"
        )
        xml = (
            "<domainsnapshot><disks><disk name='vda' snapshot='external' type='file'>"
            f"<driver type='qcow2'/><source file={quoteattr(str(new_top))}/></disk>{others}</disks>"
            "</domainsnapshot>"
        )
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        try:
            self._domain(name).snapshotCreateXML(xml, flags)
        except BaseException:
            new_top.unlink(missing_ok=True)
            raise
        return old_top

    def commit_disk(self, name: str, base: Path) -> None:
        """Merge the running domain's disk layers above ``base`` into ``base`` and make the
        domain write to ``base`` again (an active block commit, then a pivot); the merged
        layers are deleted. Nothing to do when ``base`` is already the top."""
        dom = self._domain(name)
        top = self._disk_path(name)
        if top is None:
            raise DomainNotFound(name)
        if top == base:
            return
        merged = self._chain(name)
        if base not in merged:
            raise DriverError(f"{base} is not in the disk chain of {name}")
        merged = merged[: merged.index(base)]
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        try:
            dom.blockCommit("vda", str(base), str(top), 0, flags)
            deadline = time.monotonic() + COMMIT_TIMEOUT
            while True:
                info = dom.blockJobInfo("vda", 0)
                if info and info.get("end", 0) and info.get("cur") == info.get("end"):
                    try:
                        dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                        break
                    except libvirt.libvirtError:  # not ready to pivot yet
                        pass
                if not info:
                    raise DriverError(f"the block commit of {name} ended without a pivot")
                if time.monotonic() > deadline:
                    dom.blockJobAbort("vda", 0)
                    raise DriverError(f"the block commit of {name} took over {COMMIT_TIMEOUT:.0f} s")
                time.sleep(0.005)
        except libvirt.libvirtError as exc:
            raise DriverError(f"could not commit the disk of {name}: {exc}") from exc
        for layer in merged:
            layer.unlink(missing_ok=True)

    def _disk_targets(self, name: str) -> list[str]:
        root = ET.fromstring(self._domain(name).XMLDesc(0))
        return [t.get("dev", "") for t in root.findall("./devices/disk/target")]

    def _chain(self, name: str) -> list[Path]:
        """The domain's disk files, top first, down to its immutable template disk."""
        root = ET.fromstring(self._domain(name).XMLDesc(0))
        chain: list[Path] = []
        node = next(
            (d for d in root.findall("./devices/disk") if d.find("target[@dev='vda']") is not None), None
        )
        while node is not None:
            source = node.find("source")
            if source is None or not source.get("file"):
                break
            chain.append(Path(source.get("file", "")))
            node = node.find("backingStore")
        return chain

    def export_disk(self, layer: Path, dest: Path) -> None:
        """Copy a disk layer no domain writes any more to ``dest``, for the host only (0600)."""
        _copy_atomically(layer, dest, lambda tmp: None)

    def import_disk(self, source: Path, dest: Path, *, qemu_uid: int | None) -> None:
        """Copy the qcow2 ``source`` (its backing file kept) to ``dest`` as a new domain's
        disk, handed to the domain's QEMU (``qemu_uid``) with mode 0600."""
        _copy_atomically(source, dest, lambda tmp: give_to_qemu(tmp, self.qemu_user, qemu_uid))

    def attach_disk(self, name: str, image: Path, unit: int, *, qemu_uid: int | None) -> None:
        """Hot-plug ``image`` (raw) as SCSI unit ``unit``, live and in the definition."""
        dom = self._domain(name)
        if unit in self.disks(name):
            raise DriverError(f"{name} already has a disk at SCSI unit {unit}")
        give_to_qemu(image, self.qemu_user, qemu_uid)
        xml = (
            "<disk type='file' device='disk'>"
            "<driver name='qemu' type='raw' discard='unmap'/>"
            f"<source file={quoteattr(str(image))}/>"
            f"<target dev='sd{chr(ord('a') + unit)}' bus='scsi'/>"
            f"<address type='drive' controller='0' bus='0' target='0' unit='{unit}'/>"
            "</disk>"
        )
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            dom.attachDeviceFlags(xml, flags)
        except libvirt.libvirtError as exc:
            raise DriverError(f"could not attach {image} to {name}: {exc}") from exc

    def disks(self, name: str) -> dict[int, Path]:
        root = ET.fromstring(self._domain(name).XMLDesc(0))
        found = {}
        for disk in root.findall("./devices/disk"):
            target, address, source = disk.find("target"), disk.find("address"), disk.find("source")
            if target is None or target.get("bus") != "scsi" or address is None or source is None:
                continue
            found[int(address.get("unit", "0"))] = Path(source.get("file", ""))
        return found

    def stats(self, name: str) -> DomainStats:
        dom = self._domain(name)
        try:
            state, _, _, _, cpu_time = dom.info()
            rss = int(dom.memoryStats().get("rss", 0)) if dom.isActive() else 0
        except libvirt.libvirtError as exc:  # stopped or removed between the calls
            raise DomainNotFound(f"domain {name} stopped while it was sampled: {exc}") from exc
        return DomainStats(cpu_time_ns=int(cpu_time), memory_rss_kb=rss, state=STATES.get(state, str(state)))

    def list_domains(self, prefix: str) -> list[str]:
        return sorted(d.name() for d in self.conn.listAllDomains(0) if d.name().startswith(prefix))

    @staticmethod
    def _status(dom: libvirt.virDomain) -> str:
        if dom.isActive():
            state, reason = dom.state()
            if state == libvirt.VIR_DOMAIN_PAUSED:
                # paused by a request (suspend); QEMU also pauses a domain for the time of a
                # save or a snapshot, which is still a running domain
                return "suspended" if reason == libvirt.VIR_DOMAIN_PAUSED_USER else "running"
            live = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)
            return "running" if state in live else "shutoff"
        return "saved" if dom.hasManagedSaveImage(0) else "shutoff"

    def domain_status(self, name: str) -> str:
        """running | suspended | saved (stopped with a managed save) | shutoff | absent."""
        try:
            return self._status(self._domain(name))
        except DomainNotFound:
            return "absent"

    def domain_statuses(self, prefix: str) -> dict[str, str]:
        """``domain_status`` of every domain starting with ``prefix``, in one listing."""
        statuses = {}
        for dom in self.conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                try:
                    statuses[dom.name()] = self._status(dom)
                except libvirt.libvirtError:  # undefined while we looked
                    continue
        return statuses

    def memory_mb(self) -> int:
        """The host's physical memory: libvirt's total over all NUMA cells (the kernel's
        MemTotal). ``virNodeGetInfo`` sums the memory of NUMA nodes only, which leaves out
        memory hot-plugged outside them (a third of it, on a cloud VM seen here)."""
        stats = self.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        return int(stats["total"]) // 1024

    def memory_available_mb(self) -> int:
        """free + buffers + page cache of the host, from libvirt (so a remote host answers too)."""
        stats = self.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
        return sum(int(stats.get(key, 0)) for key in ("free", "buffers", "cached")) // 1024

    def alive(self) -> bool:
        """Whether libvirt answers on this connection (a cheap round trip)."""
        try:
            return bool(self.conn.isAlive()) and self.conn.getLibVersion() > 0
        except libvirt.libvirtError:
            return False

    def connected(self) -> bool:
        """Whether the connection still stands (False once libvirtd restarted)."""
        return bool(self.conn.isAlive())

    def close(self) -> None:
        """Close the connection; a connection already broken closes quietly."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

"""A VM's lifecycle = driver (the VM) + agent client (the guest's identity).

Starting and resuming VMs, for sandboxes (through ``vm.py``) and for
template builds (through ``buildvm.py``); every wait has a timeout and every failure
after a VM exists cleans that VM up, so no half-started VM is left.
"""

from __future__ import annotations

import secrets
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent_client import AgentClient
from .driver import MemorySnapshot, RuntimeDriver, VmSpec, free_tcp_port
from .images import BaseImage

READY_TIMEOUT = 60.0
SNAPSHOT_FILE, SAVE_FILE, DISK_FILE = "snapshot.json", "memory.save", "disk.qcow2"


@dataclass
class RunningVm:
    """A started VM: its spec and an agent client already holding the VM's secret."""

    spec: VmSpec
    client: AgentClient

    @property
    def name(self) -> str:
        return self.spec.name


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def load_template_snapshot(dest_dir: Path | str) -> MemorySnapshot:
    return MemorySnapshot.read(Path(dest_dir) / SNAPSHOT_FILE)


def sandbox_spec(
    name: str,
    disk_dir: Path,
    *,
    vcpus: int,
    memory_mb: int,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    backing: Path | None = None,
    internet: bool = True,
    disk_path: Path | None = None,
    qemu_uid: int | None = None,
) -> VmSpec:
    """A spec with a fresh UUID and a free forwarded port (disk: ``disk_dir/<name>.qcow2``
    unless ``disk_path`` names it)."""
    return VmSpec(
        name=name,
        uuid=str(uuidlib.uuid4()),
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_path=disk_path or disk_dir / f"{name}.qcow2",
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        agent_host_port=free_tcp_port(),
        backing_path=backing,
        internet=internet,
        qemu_uid=qemu_uid,
    )


def clone_spec(snapshot: MemorySnapshot, name: str, disk_dir: Path, **kwargs: Any) -> VmSpec:
    """A spec for a clone of ``snapshot``: its shape and boot inputs, a fresh identity."""
    return sandbox_spec(
        name,
        disk_dir,
        vcpus=snapshot.vcpus,
        memory_mb=snapshot.memory_mb,
        kernel=snapshot.kernel,
        initrd=snapshot.initrd,
        cmdline=snapshot.cmdline,
        **kwargs,
    )


def start_from_snapshot(
    driver: RuntimeDriver,
    snapshot: MemorySnapshot,
    name: str,
    disk_dir: Path,
    *,
    env_vars: dict[str, str] | None = None,
    internet: bool = True,
    disk_path: Path | None = None,
    qemu_uid: int | None = None,
    overlay: bool = True,
    trust_ca: str | None = None,
) -> RunningVm:
    """Restore a clone, then give it its own secret, clock, hostname and entropy.

    The init is authenticated by the template secret; a 401 means the clone was
    initialised by someone else first, so it is destroyed rather than handed out.
    """
    spec = clone_spec(snapshot, name, disk_dir, internet=internet, disk_path=disk_path, qemu_uid=qemu_uid)
    try:
        driver.restore(spec, snapshot, overlay=overlay)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT, alive=lambda: driver.domain_status(name) != "absent")
        client.init(
            auth=snapshot.agent_secret,
            secret=new_secret(),
            env_vars=env_vars,
            hostname=name,
            new_machine_id=True,
            trust_ca=trust_ca,
        )
    except BaseException:
        driver.destroy(name)
        raise
    return RunningVm(spec, client)


@dataclass(frozen=True)
class Parked:
    """A clone held for a warm pool: its forwarded port and the secret its agent holds."""

    port: int
    secret: str


# What a parked clone runs before it is suspended: the code paths of an init and of the
# SDK's `commands.run` (a login shell's environment captured, then the fast path). Under
# TCG each QEMU translates guest code afresh; done here, a create's first command does not
# pay for it (~0.5 s).
WARM_UP = (["/bin/bash", "-l", "-c", "true"], ["/bin/bash", "-l", "-c", "true"])


def park_clone(
    driver: RuntimeDriver,
    snapshot: MemorySnapshot,
    name: str,
    disk_dir: Path,
    *,
    qemu_uid: int | None = None,
    hostname: str,
    env_vars: dict[str, str] | None = None,
) -> Parked:
    """Restore a clone for a warm pool, warm it up and suspend it.

    Its agent gets a secret of the pool's (not the template's: a clone must not be
    initialised twice with one credential), the host name and env vars a create will most
    likely give it (so the login environment captured now is the one its first command
    needs), and runs ``WARM_UP``. Its secret, clock, machine id and entropy come only with
    ``claim_parked``. A failure destroys the clone."""
    spec = clone_spec(snapshot, name, disk_dir, qemu_uid=qemu_uid)
    try:
        driver.restore(spec, snapshot)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT, alive=lambda: driver.domain_status(name) != "absent")
        client.init(auth=snapshot.agent_secret, secret=new_secret(), hostname=hostname, env_vars=env_vars)
        for argv in WARM_UP:
            client.exec(argv, timeout=30)
        driver.suspend(name)
    except BaseException:
        driver.destroy(name)
        raise
    return Parked(spec.agent_host_port, client.secret or "")


def claim_parked(
    driver: RuntimeDriver,
    parked: Parked,
    name: str,
    *,
    hostname: str,
    env_vars: dict[str, str] | None = None,
    trust_ca: str | None = None,
) -> AgentClient:
    """Continue a parked clone and give it its own secret, clock, hostname, machine id and
    entropy (the init reseeds the kernel CRNG: parked clones share the snapshot's state).
    The init is authenticated by the pool's secret, so a clone someone else initialised is
    a 401. A failure destroys the clone."""
    try:
        driver.unsuspend(name)
        client = AgentClient(parked.port)
        client.init(
            auth=parked.secret,
            secret=new_secret(),
            env_vars=env_vars or {},
            hostname=hostname,
            new_machine_id=True,
            trust_ca=trust_ca,
        )
    except BaseException:
        driver.destroy(name)
        raise
    return client


def unsuspend(driver: RuntimeDriver, name: str, client: AgentClient, timeout: float = READY_TIMEOUT) -> float:
    """Continue a suspended sandbox and resync its clock (same secret). Returns seconds taken."""
    t = time.monotonic()
    driver.unsuspend(name)
    resync(client, name, timeout=timeout, driver=driver)
    return time.monotonic() - t


def cold_boot(
    driver: RuntimeDriver,
    base_image: BaseImage,
    name: str,
    disk_dir: Path,
    *,
    vcpus: int = 1,
    memory_mb: int = 512,
    env_vars: dict[str, str] | None = None,
    internet: bool = True,
    disk_path: Path | None = None,
    qemu_uid: int | None = None,
    trust_ca: str | None = None,
) -> RunningVm:
    """Fallback start without a snapshot: boot token on the kernel command line."""
    token = new_secret()
    spec = sandbox_spec(
        name,
        disk_dir,
        vcpus=vcpus,
        memory_mb=memory_mb,
        kernel=base_image.kernel,
        initrd=base_image.initrd,
        backing=base_image.disk,
        cmdline=f"{base_image.default_cmdline} watasu.token={token}",
        internet=internet,
        disk_path=disk_path,
        qemu_uid=qemu_uid,
    )
    try:
        driver.boot(spec)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT, alive=lambda: driver.domain_status(name) != "absent")
        client.init(
            auth=token,
            secret=new_secret(),
            env_vars=env_vars,
            hostname=name,
            new_machine_id=True,
            trust_ca=trust_ca,
        )
    except BaseException:
        driver.destroy(name)
        raise
    return RunningVm(spec, client)


def resume(driver: RuntimeDriver, name: str, client: AgentClient, timeout: float = READY_TIMEOUT) -> float:
    """Start from managed save, wait for the agent and resync its clock (it slept).

    Same secret, so the edge's stored credential stays valid. Returns seconds taken.
    """
    t = time.monotonic()
    driver.resume(name)
    resync(client, name, timeout=timeout, driver=driver)
    return time.monotonic() - t


def resync(
    client: AgentClient, name: str, timeout: float = READY_TIMEOUT, *, driver: RuntimeDriver | None = None
) -> None:
    """After a restart from saved memory: wait for the agent (ending early if ``driver``
    says the VM is gone), give it the clock (same secret). Nothing is written to the
    guest's disk: its root filesystem may be frozen."""
    alive = (lambda: driver.domain_status(name) != "absent") if driver is not None else None
    client.wait_ready(timeout, alive=alive)
    secret = client.secret or ""
    client.init(auth=secret, secret=secret)

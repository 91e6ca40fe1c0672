"""Sandbox lifecycle = driver (the VM) + agent client (the guest's identity).

These are the operations the Django services will call; every wait has a timeout and
every failure after a VM exists cleans that VM up, so no half-started sandbox is left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .agent_client import AgentClient
from .driver import MemorySnapshot, RuntimeDriver, VmSpec, free_tcp_port
from .images import BaseImage

READY_TIMEOUT = 60.0
SNAPSHOT_FILE, SAVE_FILE, DISK_FILE = "snapshot.json", "memory.save", "disk.qcow2"


@dataclass
class Sandbox:
    """A started sandbox: its spec and a client already holding its secret."""

    spec: VmSpec
    client: AgentClient

    @property
    def name(self) -> str:
        return self.spec.name


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def make_template_snapshot(base_image: BaseImage, dest_dir: Path | str, driver: RuntimeDriver,
                           *, vcpus: int = 1, memory_mb: int = 512, name: str | None = None,
                           before_save: Callable[[AgentClient], None] | None = None) -> MemorySnapshot:
    """Cold boot the base image, wait for the agent, seal it with a template secret, save.

    ``before_save`` runs against the agent just before it is sealed and the memory is
    saved (a template's start command and ready check), so what it starts is running in
    every clone. Built in ``dest_dir.tmp`` and renamed, so ``dest_dir`` either holds a complete
    snapshot or nothing. The saved disk is immutable afterwards: clones overlay it.
    """
    dest_dir = Path(dest_dir)
    tmp = dest_dir.with_name(dest_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    token, template_secret = new_secret(), new_secret()
    cmdline = f"{base_image.default_cmdline} watasu.token={token}"
    spec = VmSpec(name=name or f"watasu-tpl-{secrets.token_hex(4)}", uuid=str(uuidlib.uuid4()),
                  vcpus=vcpus, memory_mb=memory_mb, disk_path=tmp / DISK_FILE,
                  kernel=base_image.kernel, initrd=base_image.initrd, cmdline=cmdline,
                  agent_host_port=free_tcp_port(), backing_path=base_image.disk)
    try:
        driver.boot(spec)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT)
        if before_save is not None:
            # A sealed agent answers nothing but /init, so the template's own start
            # command runs first under a working secret, then the agent is sealed.
            work_secret = new_secret()
            client.init(auth=token, secret=work_secret, hostname="template")
            before_save(client)
            token = work_secret
        client.init(auth=token, secret=template_secret, seal=True, hostname="template")
        driver.save_snapshot(spec.name, tmp / SAVE_FILE)
    finally:
        driver.forget(spec.name)
    os.chmod(tmp / DISK_FILE, 0o444)
    shutil.rmtree(dest_dir, ignore_errors=True)
    os.replace(tmp, dest_dir)
    snap = MemorySnapshot(save_path=dest_dir / SAVE_FILE, disk_path=dest_dir / DISK_FILE,
                          agent_secret=template_secret, vcpus=vcpus, memory_mb=memory_mb,
                          kernel=base_image.kernel, initrd=base_image.initrd, cmdline=cmdline)
    snap.write(dest_dir / SNAPSHOT_FILE)
    return snap


def load_template_snapshot(dest_dir: Path | str) -> MemorySnapshot:
    return MemorySnapshot.read(Path(dest_dir) / SNAPSHOT_FILE)


def sandbox_spec(name: str, disk_dir: Path, *, vcpus: int, memory_mb: int, kernel: Path,
                 initrd: Path, cmdline: str, backing: Path | None = None,
                 internet: bool = True, disk_path: Path | None = None,
                 qemu_uid: int | None = None) -> VmSpec:
    """A spec with a fresh UUID and a free forwarded port (disk: ``disk_dir/<name>.qcow2``
    unless ``disk_path`` names it)."""
    return VmSpec(name=name, uuid=str(uuidlib.uuid4()), vcpus=vcpus, memory_mb=memory_mb,
                  disk_path=disk_path or disk_dir / f"{name}.qcow2", kernel=kernel, initrd=initrd,
                  cmdline=cmdline, agent_host_port=free_tcp_port(), backing_path=backing,
                  internet=internet, qemu_uid=qemu_uid)


def start_from_snapshot(driver: RuntimeDriver, snapshot: MemorySnapshot, name: str, disk_dir: Path,
                        *, env_vars: dict[str, str] | None = None, internet: bool = True,
                        disk_path: Path | None = None, qemu_uid: int | None = None) -> Sandbox:
    """Restore a clone, then give it its own secret, clock, hostname and entropy.

    The init is authenticated by the template secret; a 401 means the clone was
    initialised by someone else first, so it is destroyed rather than handed out.
    """
    spec = sandbox_spec(name, disk_dir, vcpus=snapshot.vcpus, memory_mb=snapshot.memory_mb,
                        kernel=snapshot.kernel, initrd=snapshot.initrd, cmdline=snapshot.cmdline,
                        internet=internet, disk_path=disk_path, qemu_uid=qemu_uid)
    try:
        driver.restore(spec, snapshot)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT)
        client.init(auth=snapshot.agent_secret, secret=new_secret(), env_vars=env_vars, hostname=name)
    except BaseException:
        driver.destroy(name)
        raise
    return Sandbox(spec, client)


def cold_boot(driver: RuntimeDriver, base_image: BaseImage, name: str, disk_dir: Path, *,
              vcpus: int = 1, memory_mb: int = 512, env_vars: dict[str, str] | None = None,
              internet: bool = True, disk_path: Path | None = None, qemu_uid: int | None = None) -> Sandbox:
    """Fallback start without a snapshot: boot token on the kernel command line."""
    token = new_secret()
    spec = sandbox_spec(name, disk_dir, vcpus=vcpus, memory_mb=memory_mb, kernel=base_image.kernel,
                        initrd=base_image.initrd, backing=base_image.disk,
                        cmdline=f"{base_image.default_cmdline} watasu.token={token}", internet=internet,
                        disk_path=disk_path, qemu_uid=qemu_uid)
    try:
        driver.boot(spec)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(READY_TIMEOUT)
        client.init(auth=token, secret=new_secret(), env_vars=env_vars, hostname=name)
    except BaseException:
        driver.destroy(name)
        raise
    return Sandbox(spec, client)


def resume(driver: RuntimeDriver, name: str, client: AgentClient, timeout: float = READY_TIMEOUT) -> float:
    """Start from managed save, wait for the agent and resync its clock (it slept).

    Same secret, so the edge's stored credential stays valid. Returns seconds taken.
    """
    t = time.monotonic()
    driver.resume(name)
    resync(client, name, timeout=timeout)
    return time.monotonic() - t


def resync(client: AgentClient, name: str, timeout: float = READY_TIMEOUT) -> None:
    """After a restart from saved memory: wait for the agent, give it the clock (same secret)."""
    client.wait_ready(timeout)
    secret = client.secret or ""
    client.init(auth=secret, secret=secret, hostname=name)


def checkpoint(driver: RuntimeDriver, sandbox: Sandbox, dest: Path) -> None:
    """Freeze the guest filesystem (flushes it), copy the overlay, thaw — always thaw."""
    sandbox.client.exec(["fsfreeze", "-f", "/"], timeout=30)
    try:
        driver.checkpoint_disk(sandbox.name, dest)
    finally:
        sandbox.client.exec(["fsfreeze", "-u", "/"], timeout=30)

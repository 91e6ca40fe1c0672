"""Build VMs: the VMs template builds run their steps in, and the memory snapshots they end with.

A build never runs a user's command on the host. It starts a ``BuildVm`` from the parent
template's memory snapshot (or cold-boots one on a cached disk layer), runs each step
in it through the guest agent, turns what each step wrote into a disk layer, and stops
it with a consistent disk or destroys it. ``make_template_snapshot`` then boots the
finished disk once, lets the caller start the template's own command, seals the agent
with a template secret and saves the memory that every sandbox of the template restores.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import lifecycle
from .agent_client import AgentClient
from .driver import MemorySnapshot, RuntimeDriver, VmSpec, free_tcp_port
from .images import BaseImage

FREEZE_TIMEOUT = 60.0


@dataclass
class BuildVm:
    """One running build VM: its driver, its domain name and its agent (already initialised)."""

    driver: RuntimeDriver
    name: str
    client: AgentClient

    @classmethod
    def restore(
        cls, driver: RuntimeDriver, snapshot: MemorySnapshot, name: str, *, disk_path: Path, internet: bool
    ) -> BuildVm:
        """Restore the parent template's memory snapshot; the VM writes to ``disk_path``."""
        vm = lifecycle.start_from_snapshot(
            driver, snapshot, name, disk_path.parent, internet=internet, disk_path=disk_path
        )
        return cls(driver, vm.name, vm.client)

    @classmethod
    def boot(
        cls,
        driver: RuntimeDriver,
        snapshot: MemorySnapshot,
        disk: Path,
        name: str,
        *,
        disk_path: Path,
        internet: bool,
    ) -> BuildVm:
        """Cold-boot ``snapshot``'s kernel and shape on ``disk`` (a cached layer); the VM
        writes to ``disk_path``, a fresh overlay on it."""
        image = BaseImage(
            key="",
            directory=disk.parent,
            kernel=snapshot.kernel,
            initrd=snapshot.initrd,
            disk=disk,
            kernel_version="",
        )
        vm = lifecycle.cold_boot(
            driver,
            image,
            name,
            disk_path.parent,
            vcpus=snapshot.vcpus,
            memory_mb=snapshot.memory_mb,
            internet=internet,
            disk_path=disk_path,
        )
        return cls(driver, vm.name, vm.client)

    def write_files(self, files: Sequence[tuple[str, str]], *, timeout: float) -> None:
        """Write ``(path, base64 content)`` pairs into the guest."""
        self.client.request(
            "POST",
            "/runtime/v1/files/write_files",
            timeout=timeout,
            body={"files": [{"path": path, "data_base64": data} for path, data in files]},
        )

    def run(
        self, command: str, on_output: Callable[[str, bytes], None], *, env: dict[str, str], timeout: float
    ) -> int:
        """Run a shell command, streaming its output to ``on_output``; returns its exit code."""
        return self.client.run_streaming(command, on_output, env=env, timeout=timeout)

    def exec(
        self,
        argv: list[str],
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        background: bool = False,
    ) -> dict[str, Any]:
        """Run ``argv`` to completion (or start it in the background) and return the agent's result."""
        return self.client.exec(argv, timeout=timeout, env=env, background=background)

    def cut_layer(self, new_top: Path) -> Path:
        """Freeze what the guest wrote so far as a layer and return it; from now on the VM
        writes to ``new_top``. The guest filesystem is frozen meanwhile, so the layer is
        consistent."""
        self.exec(["fsfreeze", "-f", "/"], timeout=FREEZE_TIMEOUT)
        finished = self.driver.snapshot_disk(self.name, new_top)
        self.exec(["fsfreeze", "-u", "/"], timeout=FREEZE_TIMEOUT)
        return finished

    def stop(self) -> None:
        """Freeze the guest filesystem and stop the VM, keeping its disk: the disk it last
        wrote is a consistent layer."""
        self.exec(["fsfreeze", "-f", "/"], timeout=FREEZE_TIMEOUT)
        self.driver.forget(self.name)

    def destroy(self) -> None:
        """Stop the VM and delete its files. Idempotent."""
        self.driver.destroy(self.name)


def make_template_snapshot(
    base_image: BaseImage,
    dest_dir: Path | str,
    driver: RuntimeDriver,
    *,
    vcpus: int = 1,
    memory_mb: int = 512,
    name: str | None = None,
    before_save: Callable[[BuildVm], None] | None = None,
) -> MemorySnapshot:
    """Cold boot the image, wait for the agent, seal it with a template secret, save its memory.

    ``before_save`` runs against the VM just before its agent is sealed and the memory is
    saved (a template's start command and ready check), so what it starts is running in
    every clone. Built in ``dest_dir.tmp`` and renamed, so ``dest_dir`` either holds a complete
    snapshot or nothing. The saved disk is immutable afterwards: clones overlay it.
    """
    dest_dir = Path(dest_dir)
    tmp = dest_dir.with_name(dest_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    token, template_secret = lifecycle.new_secret(), lifecycle.new_secret()
    cmdline = f"{base_image.default_cmdline} watasu.token={token}"
    spec = VmSpec(
        name=name or f"watasu-tpl-{secrets.token_hex(4)}",
        uuid=str(uuidlib.uuid4()),
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_path=tmp / lifecycle.DISK_FILE,
        kernel=base_image.kernel,
        initrd=base_image.initrd,
        cmdline=cmdline,
        agent_host_port=free_tcp_port(),
        backing_path=base_image.disk,
    )
    try:
        driver.boot(spec)
        client = AgentClient(spec.agent_host_port)
        client.wait_ready(lifecycle.READY_TIMEOUT)
        if before_save is not None:
            # A sealed agent answers nothing but /init, so the template's own start
            # command runs first under a working secret, then the agent is sealed.
            work_secret = lifecycle.new_secret()
            client.init(auth=token, secret=work_secret, hostname="template")
            before_save(BuildVm(driver, spec.name, client))
            token = work_secret
        client.init(auth=token, secret=template_secret, seal=True, hostname="template")
        driver.save_snapshot(spec.name, tmp / lifecycle.SAVE_FILE)
    finally:
        driver.forget(spec.name)
    os.chmod(tmp / lifecycle.DISK_FILE, 0o444)
    shutil.rmtree(dest_dir, ignore_errors=True)
    os.replace(tmp, dest_dir)
    snap = MemorySnapshot(
        save_path=dest_dir / lifecycle.SAVE_FILE,
        disk_path=dest_dir / lifecycle.DISK_FILE,
        agent_secret=template_secret,
        vcpus=vcpus,
        memory_mb=memory_mb,
        kernel=base_image.kernel,
        initrd=base_image.initrd,
        cmdline=cmdline,
    )
    snap.write(dest_dir / lifecycle.SNAPSHOT_FILE)
    return snap

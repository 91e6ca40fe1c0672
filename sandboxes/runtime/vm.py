"""Sandbox rows onto VMs: the only runtime calls the lifecycle services make.

A sandbox starts, fastest first: from a warm pool VM its create took (`sandboxes.pool`:
a clone restored ahead of time and suspended, continued in ~20 ms and given its identity
by the agent's init); from its template version's memory snapshot for its shape (the
version's own for its baseline shape, or one made for the shape, ``snapshot_for``: a clone
of the save image restored under its own identity, ~0.5 s under TCG); or, until that
exists, by a cold boot on the version's disk (a memory image cannot change vCPUs or RAM).
A pause is held in memory first (the VM suspended) and saved to disk later.

Measured on these 2-core TCG machines (bench/api.py --fast-starts, docs/fast-starts.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings

from sandboxes import hostcalls, network
from sandboxes.hostcalls import host_step, value_type
from sandboxes.models import Checkpoint, Host, Sandbox, SandboxState
from sandboxes.runtime import driver_for, lifecycle, volumes
from sandboxes.runtime.agent_client import AgentClient
from sandboxes.runtime.driver import DomainNotFound, MemorySnapshot, RuntimeDriver
from sandboxes.runtime.images import BaseImage
from templates_app import artifacts, shapes
from templates_app.models import TemplateVersion
from watasu import crypto, errors

logger = logging.getLogger(__name__)

CPU_SAMPLE_SECONDS = 0.2

# what host steps take and raise besides rows and domain errors
value_type(volumes.Attachment)
hostcalls.error_type(volumes.MountRefused)
hostcalls.error_type(volumes.MountFailed)
hostcalls.error_type(DomainNotFound)


@value_type
@dataclass(frozen=True)
class Started:
    agent_port: int
    agent_secret: str


def _image_of(snapshot: MemorySnapshot) -> BaseImage:
    """Boot inputs for a cold boot on the snapshot's (immutable) disk."""
    return BaseImage(
        key="",
        directory=snapshot.disk_path.parent,
        kernel=snapshot.kernel,
        initrd=snapshot.initrd,
        disk=snapshot.disk_path,
        kernel_version="",
    )


def template_snapshot(version: TemplateVersion, host: Host) -> MemorySnapshot:
    """The version's memory snapshot as ``host`` (this process's) holds it: the build's own
    files on the host that built it; elsewhere a copy pulled from the artifact store on
    first use (templates_app/artifacts.py)."""
    return lifecycle.load_template_snapshot(artifacts.local_dir(version, host))


def snapshot_for(
    version: TemplateVersion, cpu: int, memory_mb: int, host: Host | None = None
) -> MemorySnapshot | None:
    """The memory snapshot a sandbox of this shape starts from on ``host`` (default: the
    version's own): the version's own for its baseline, the shape's once made
    (templates_app/shapes.py; on the version's own host), else None, having queued its make
    there (the sandbox cold-boots meanwhile)."""
    home = host or version.host
    if home is None:
        raise ValueError(f"template version {version.pk} was never built on a host")
    snapshot = template_snapshot(version, home)
    if (snapshot.vcpus, snapshot.memory_mb) == (cpu, memory_mb):
        return snapshot
    if host is not None and host.pk != version.host_id:
        return None  # shapes are made where the version was built; elsewhere a cold boot
    shaped = shapes.made(version, cpu, memory_mb)
    if shaped is None:
        shapes.request(version, cpu, memory_mb)
    return shaped


def guest_env(
    version: TemplateVersion, uid: int | None, env_vars: dict[str, str] | None = None
) -> dict[str, str]:
    """The env vars a sandbox's agent gets: the egress CA's (with a uid of its own, where
    header rules may intercept HTTPS), the version's build env, the request's."""
    ca = network.GUEST_CA_ENV if uid is not None else {}
    return {**ca, **version.build_env(), **(env_vars or {})}


def _network(sandbox: Sandbox, env_vars: dict[str, str]) -> tuple[bool, str | None, dict[str, str]]:
    """(internet at the VM level, the CA the guest trusts, env vars) for a VM about to run;
    with a uid of its own, its policy is put in force first (the host firewall enforces it)."""
    if qemu_uid(sandbox) is None:  # no uid of its own: only all-or-nothing, fixed at start
        return bool(sandbox.network_policy.get("allow_internet_access", True)), None, env_vars
    network.apply(sandbox)
    return True, network.guest_ca(), {**network.GUEST_CA_ENV, **env_vars}


def _from_pool(driver: RuntimeDriver, sandbox: Sandbox, env_vars: dict[str, str]) -> Started | None:
    """Continue the pooled VM the create took and give it the sandbox's identity; None (the
    pooled VM removed, the row back to its own name and uid) when that fails, so the
    caller restores a clone instead."""
    try:
        _, trust_ca, env = _network(sandbox, env_vars)
        parked = lifecycle.Parked(
            sandbox.agent_port or 0, crypto.decrypt_text(sandbox.agent_secret_encrypted)
        )
        client = lifecycle.claim_parked(
            driver,
            parked,
            sandbox.vm_name,
            hostname=sandbox.vm_name,  # the pooled domain's, as every sandbox's is its domain's
            env_vars=env,
            trust_ca=trust_ca,
        )
        return Started(agent_port=client.port, agent_secret=client.secret or "")
    except Exception:
        logger.warning("sandbox %s: its pooled VM failed; restoring a clone", sandbox.pk, exc_info=True)
    driver.destroy(sandbox.vm_name)
    if qemu_uid(sandbox) is not None:
        network.remove(sandbox)
    Sandbox.objects.filter(pk=sandbox.pk).update(
        domain_name="", runtime_uid=None, agent_port=None, agent_secret_encrypted=""
    )
    sandbox.domain_name, sandbox.runtime_uid, sandbox.agent_port = "", None, None
    sandbox.agent_secret_encrypted = ""
    return None


@host_step
def start(
    sandbox: Sandbox,
    version: TemplateVersion,
    *,
    env_vars: dict[str, str],
    attachments: list[volumes.Attachment] | None = None,
    checkpoint: Checkpoint | None = None,
) -> Started:
    """Start the sandbox's VM, hand its agent a fresh identity and mount its volumes
    (``attachments``); blocks until ready. On failure the caller purges the VM.

    A create that took a warm pool VM (``sandbox.domain_name``) continues it; otherwise the
    version's snapshot for the shape is restored, or, without one, the version's disk
    cold-boots. From a ``checkpoint`` the VM runs on a copy of the checkpoint's disk: it
    cold-boots the template version's kernel on it, or, for a checkpoint with memory,
    restores that memory (the source's processes carry on in the copy)."""
    driver = driver_for(sandbox.placed_host)
    snapshot = template_snapshot(version, sandbox.placed_host)
    pooled = _from_pool(driver, sandbox, env_vars) if sandbox.domain_name else None
    if pooled is not None:
        if attachments:
            volumes.attach_and_mount(
                driver, agent_client_of(pooled), sandbox.vm_name, attachments, qemu_uid=qemu_uid(sandbox)
            )
        return pooled
    shaped = (
        snapshot_for(version, sandbox.cpu_count, sandbox.memory_mb, sandbox.placed_host)
        if checkpoint is None
        else None
    )
    uid = qemu_uid(sandbox)
    internet, trust_ca, env_vars = _network(sandbox, env_vars)
    name = sandbox.vm_name
    if checkpoint is not None:
        driver.import_disk(checkpoint.path, disk_path(sandbox), qemu_uid=uid)
    if checkpoint is not None and checkpoint.include_memory:
        saved = dataclasses.replace(
            snapshot,
            save_path=checkpoint.memory_path,
            disk_path=disk_path(sandbox),
            agent_secret=crypto.decrypt_text(checkpoint.agent_secret_encrypted),
            vcpus=checkpoint.cpu_count,
            memory_mb=checkpoint.memory_mb,
        )
        started = lifecycle.start_from_snapshot(
            driver,
            saved,
            name,
            driver.state_dir,
            env_vars=env_vars,
            internet=internet,
            qemu_uid=uid,
            overlay=False,
            trust_ca=trust_ca,
        )
    elif shaped is not None:
        started = lifecycle.start_from_snapshot(
            driver,
            shaped,
            name,
            driver.state_dir,
            env_vars=env_vars,
            internet=internet,
            qemu_uid=uid,
            trust_ca=trust_ca,
        )
    else:
        started = lifecycle.cold_boot(
            driver,
            _image_of(snapshot),
            name,
            driver.state_dir,
            vcpus=sandbox.cpu_count,
            memory_mb=sandbox.memory_mb,
            env_vars=env_vars,
            internet=internet,
            qemu_uid=uid,
            trust_ca=trust_ca,
        )
    if attachments:
        volumes.attach_and_mount(driver, started.client, name, attachments, qemu_uid=uid)
    return Started(agent_port=started.spec.agent_host_port, agent_secret=started.client.secret or "")


def agent_client_of(started: Started, sandbox: Sandbox | None = None) -> AgentClient:
    """The agent of a VM just started (for ``sandbox``: on its host's address)."""
    if sandbox is None or sandbox.host is None:
        return AgentClient(started.agent_port, secret=started.agent_secret)
    return AgentClient(started.agent_port, secret=started.agent_secret, host=sandbox.host.address)


def disk_path(sandbox: Sandbox) -> Path:
    """The sandbox's root disk: an overlay on its template version's disk."""
    return driver_for(sandbox.placed_host).state_dir / f"{sandbox.vm_name}.qcow2"


@host_step
def disk_bytes(sandbox: Sandbox) -> int:
    """Host disk the sandbox's own disk takes (what its guest wrote): 0 without one."""
    try:
        return disk_path(sandbox).stat().st_blocks * 512
    except FileNotFoundError:
        return 0


@host_step
def checkpoint(sandbox: Sandbox, checkpoint: Checkpoint) -> int:
    """Copy the running sandbox's root disk (and, for ``include_memory``, its memory) to
    the checkpoint's files; returns the bytes they take.

    Disk only: the guest keeps running throughout. The disk is switched to a fresh top
    layer (~30 ms; in `guest` quiesce mode the guest's root filesystem is frozen around the
    switch only, so what it wrote is in), the now unchanging layer below is copied, and the
    top is merged back into it, so the chain never grows. A freeze the host fails to lift
    is lifted by the guest itself after ``WATASU_CHECKPOINT_FREEZE_SECONDS``.

    With memory: the VM's memory is saved (it stops), its disk copied, and it starts again
    from that memory (its processes carry on; it was stopped meanwhile, ~1-3 s here)."""
    checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint.include_memory:
        return _checkpoint_with_memory(sandbox, checkpoint)
    dest, quiesce = checkpoint.path, checkpoint.quiesce_mode == "guest"
    driver = driver_for(sandbox.placed_host)
    name, base = sandbox.vm_name, disk_path(sandbox)
    driver.commit_disk(name, base)  # a capture cut short left a layer on top: merge it first
    client = agent_client(sandbox) if quiesce else None
    if client is not None:
        client.request(
            "POST",
            "/checkpoint/freeze",
            {"thaw_after": settings.CHECKPOINT_FREEZE_SECONDS},
            timeout=settings.CHECKPOINT_FREEZE_SECONDS,
        )
    try:
        top = driver.sandbox_dir(name) / "checkpoint-top.qcow2"
        layer = driver.snapshot_disk(name, top, qemu_uid=qemu_uid(sandbox))
    finally:
        if client is not None:
            try:
                client.request("POST", "/checkpoint/thaw", {}, timeout=settings.CHECKPOINT_FREEZE_SECONDS)
            except Exception:
                logger.warning(
                    "sandbox %s: the thaw failed; the guest thaws itself", sandbox.pk, exc_info=True
                )
    try:
        driver.export_disk(layer, dest)
    except BaseException:
        _merge_back(driver, sandbox, base)
        raise
    _merge_back(driver, sandbox, base)
    return dest.stat().st_blocks * 512


def _checkpoint_with_memory(sandbox: Sandbox, checkpoint: Checkpoint) -> int:
    driver = driver_for(sandbox.placed_host)
    driver.commit_disk(sandbox.vm_name, disk_path(sandbox))
    driver.save_and_continue(sandbox.vm_name, checkpoint.memory_path, checkpoint.path)
    checkpoint.memory_path.chmod(0o600)
    # the guest slept: its clock is behind (same secret, so sessions stay valid)
    lifecycle.resync(
        agent_client(sandbox), sandbox.vm_name, timeout=settings.RUNTIME_RESUME_TIMEOUT_SECONDS, driver=driver
    )
    return sum(path.stat().st_blocks * 512 for path in checkpoint.files())


def _merge_back(driver: RuntimeDriver, sandbox: Sandbox, base: Path) -> None:
    """The top layer back into the disk. A failure here costs the checkpoint nothing: the
    next capture merges first, and destroy removes every layer."""
    try:
        driver.commit_disk(sandbox.vm_name, base)
    except Exception:
        logger.warning("sandbox %s: the disk layers were not merged back", sandbox.pk, exc_info=True)


def qemu_uid(sandbox: Sandbox) -> int | None:
    """The uid this sandbox's QEMU runs as: its own (base + id, or the warm pool VM's it took;
    no other sandbox shares it), or None (the shared QEMU user) when `WATASU_QEMU_UID_BASE`
    is 0."""
    if sandbox.runtime_uid is not None:
        return sandbox.runtime_uid
    base = settings.RUNTIME_QEMU_UID_BASE
    return base + sandbox.pk if base else None


def agent_client(sandbox: Sandbox) -> AgentClient:
    """The sandbox's agent, reached on its host's address (with the agent's own secret)."""
    secret = crypto.decrypt_text(sandbox.agent_secret_encrypted)
    if sandbox.host is None:
        return AgentClient(sandbox.agent_port or 0, secret=secret)
    return AgentClient(sandbox.agent_port or 0, secret=secret, host=sandbox.host.address)


@host_step
def pause(sandbox: Sandbox, *, in_memory: bool = False) -> None:
    """Processes survive the pause: ``in_memory``, the VM is suspended and its memory stays
    in host RAM (a resume takes milliseconds; the pool sweep saves it to disk later); else
    a managed save writes the memory to disk.

    The guest first writes everything to its disks: a memory held in RAM is lost if the
    host restarts, and its resume then boots on the disk, which holds every write made
    before the pause. A sandbox holding volumes needs the same (its memory may be
    destroyed without ever running again). A guest that does not answer is paused anyway
    on a managed save, not in memory."""
    synced = True
    if sandbox.volume_mounts:
        synced = volumes.flush(agent_client(sandbox))
    elif in_memory:
        try:
            synced = volumes.flush(agent_client(sandbox))
        except Exception:  # no answer: the memory goes to disk, which needs nothing of the guest
            logger.warning("sandbox %s: the guest did not sync; pausing to disk", sandbox.pk, exc_info=True)
            synced = False
    driver = driver_for(sandbox.placed_host)
    if in_memory and synced:
        driver.suspend(sandbox.vm_name)
    else:
        driver.pause(sandbox.vm_name)


def volume_freezer(sandbox: Sandbox) -> Callable[[], None]:
    """What leaves a running sandbox's volumes clean before its VM is destroyed: the guest
    writes them out and freezes their filesystems. Taken while the row still holds the
    agent's credentials, called once the sandbox is certain to go (a no-op without volumes)."""
    paths = [mount["path"] for mount in sandbox.volume_mounts]
    running = (SandboxState.READY, SandboxState.CHECKPOINTING)
    if sandbox.state not in running or not sandbox.agent_port or not paths:
        return lambda: None
    client = agent_client(sandbox)

    def freeze() -> None:
        volumes.freeze(client, paths)

    return freeze


@host_step
def resume(sandbox: Sandbox) -> Started | None:
    """Run a paused sandbox again, from wherever its memory is: in host RAM (continue it),
    on disk (managed save), or nowhere (a pause held in memory on a host that restarted:
    it boots on its own disk, files kept, processes not; returns the new agent's port and
    secret)."""
    driver = driver_for(sandbox.placed_host)
    status = driver.domain_status(sandbox.vm_name)
    # a change made while it was paused; a VM held in memory has kept its host (and the
    # host its rules) since its policy was last put in force
    in_force = status == "suspended" and sandbox.network_applied_revision == sandbox.network_revision
    if qemu_uid(sandbox) is not None and not in_force:
        network.apply(sandbox)
    timeout = settings.RUNTIME_RESUME_TIMEOUT_SECONDS
    if status == "suspended":
        lifecycle.unsuspend(driver, sandbox.vm_name, agent_client(sandbox), timeout=timeout)
        return None
    lost = sandbox.paused_in_memory or sandbox.memory_lost
    if status in ("shutoff", "absent") and lost and disk_path(sandbox).exists():
        return _boot_on_own_disk(driver, sandbox)
    lifecycle.resume(driver, sandbox.vm_name, agent_client(sandbox), timeout=timeout)
    return None


def _boot_on_own_disk(driver: RuntimeDriver, sandbox: Sandbox) -> Started:
    """Cold boot the template version's kernel on the sandbox's own disk, its volumes
    attached again."""
    version = sandbox.template_version
    if version is None:
        raise RuntimeError(f"sandbox {sandbox.pk} has no template version to boot")
    snapshot = template_snapshot(version, sandbox.placed_host)
    driver.forget(sandbox.vm_name)  # the old definition (its disk stays)
    env_vars = {**version.build_env(), **(crypto.decrypt_json(sandbox.env_vars_encrypted) or {})}
    internet, trust_ca, env_vars = _network(sandbox, env_vars)
    started = lifecycle.cold_boot(
        driver,
        _image_of(snapshot),
        sandbox.vm_name,
        driver.state_dir,
        vcpus=sandbox.cpu_count,
        memory_mb=sandbox.memory_mb,
        env_vars=env_vars,
        internet=internet,
        disk_path=disk_path(sandbox),
        qemu_uid=qemu_uid(sandbox),
        trust_ca=trust_ca,
    )
    from volumes.models import Volume  # the volumes app builds on the sandboxes app

    held = {volume.name: volume for volume in Volume.objects.filter(holder=sandbox)}
    attachments = [
        volumes.Attachment(unit=unit, image=held[mount["name"]].image_path, path=mount["path"])
        for unit, mount in enumerate(sandbox.volume_mounts)
        if mount["name"] in held
    ]
    if attachments:
        uid = qemu_uid(sandbox)
        volumes.attach_and_mount(driver, started.client, sandbox.vm_name, attachments, qemu_uid=uid)
    return Started(agent_port=started.spec.agent_host_port, agent_secret=started.client.secret or "")


def destroy(sandbox: Sandbox) -> bool:
    """Remove the domain, its memory image and disk. Idempotent; never raises.

    Returns False when the runtime refused or its host did not answer (the row stays
    unpurged, so the retention sweep tries again; reconciliation removes domains the
    database calls gone). On a host that is down the destroy is queued for its worker's
    return, without waiting.
    """
    if sandbox.host is None:
        return True
    try:
        return bool(_destroy_here(sandbox))
    except errors.Unavailable:  # its host is away (refused at once when down): its worker does it later
        destroy_later(sandbox)
        return False
    except Exception:
        logger.exception("could not destroy the VM of sandbox %s; the sweeps will", sandbox.pk)
        return False


def destroy_later(sandbox: Sandbox) -> None:
    """Queue the removal of the sandbox's VM for its host's worker, without waiting (a host
    that did not answer); the retention sweep purges the row later. Never raises."""
    try:
        if sandbox.host is not None:
            _destroy_here.queue(sandbox)
    except Exception:
        logger.exception("could not queue the removal of sandbox %s's VM; the sweeps will", sandbox.pk)


@host_step(timeout=60)
def _destroy_here(sandbox: Sandbox) -> bool:
    driver_for(sandbox.placed_host).destroy(sandbox.vm_name)
    network.remove(sandbox)
    return True


@host_step
def forget(sandbox: Sandbox) -> None:
    """Stop and undefine the domain, keeping its disk (failed/lost sandboxes, for inspection)."""
    if sandbox.host is not None:
        driver_for(sandbox.host).forget(sandbox.vm_name)


@host_step
def status(sandbox: Sandbox) -> str:
    """The domain as libvirt sees it: running | saved | shutoff | absent."""
    if sandbox.host is None:
        return "absent"
    return driver_for(sandbox.host).domain_status(sandbox.vm_name)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@host_step
def metrics(sandbox: Sandbox) -> dict[str, Any] | None:
    """One sample: CPU use over a short window, resident memory, disk use. None when not running."""
    if sandbox.state != SandboxState.READY or sandbox.host is None:
        return None
    driver = driver_for(sandbox.host)
    try:
        first = driver.stats(sandbox.vm_name)
        time.sleep(CPU_SAMPLE_SECONDS)
        second = driver.stats(sandbox.vm_name)
    except DomainNotFound:
        return None
    busy_ns = second.cpu_time_ns - first.cpu_time_ns
    cpu_pct = 100.0 * busy_ns / (CPU_SAMPLE_SECONDS * 1e9 * sandbox.cpu_count)
    disk = disk_path(sandbox)
    return {
        "sandbox_id": str(sandbox.pk),
        "state": sandbox.state,
        "node": sandbox.host.name,
        "backend": "libvirt",
        "timestamp": _iso_now(),
        "cpu_count": sandbox.cpu_count,
        "cpu_used_pct": round(min(cpu_pct, 100.0), 2),
        "memory_mb": sandbox.memory_mb,
        "mem_total": sandbox.memory_mb * 2**20,
        "mem_used": second.memory_rss_kb * 1024,
        "disk_used": disk.stat().st_blocks * 512 if disk.exists() else 0,
        # packets the host firewall refused under the sandbox's policy (how a policy is debugged)
        "network_refused": network.refused(sandbox) if settings.EGRESS_ENFORCE else 0,
    }

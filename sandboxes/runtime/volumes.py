"""Volumes inside a running VM: hot-plug the image, mount it in the guest, flush it.

A volume is a raw image holding ext4. It joins a running domain as a SCSI disk of the
domain's virtio-scsi controller (unit = its place in the sandbox's mount list), then the
agent mounts it at the requested path (its host-only ``/volumes/*`` routes: no shell, no
child process). Starts stay snapshot starts: nothing here touches the template's memory
image. The guest's dirty data is written back within seconds (``dirty_expire``), the host
asks for a ``sync`` before it pauses a VM holding volumes and freezes the volumes'
filesystems before it destroys one, so what a sandbox wrote is on the image, clean, when
the next sandbox mounts it or the host works on it detached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .agent_client import AgentClient, AgentError
from .driver import DriverError, RuntimeDriver

logger = logging.getLogger(__name__)

MOUNT_TIMEOUT = 30.0  # for every disk of a create to appear and mount
FLUSH_TIMEOUT = 10.0  # a guest that never answers delays its own destroy this long, no more


@dataclass(frozen=True)
class Attachment:
    unit: int
    image: Path
    path: str  # where the guest mounts it


class MountFailed(DriverError):
    """The guest could not mount a volume (its disk never appeared, or mount refused it)."""


class MountRefused(MountFailed):
    """The request's mount path is not one the guest can mount at (a symlink on the way)."""


def attach_and_mount(
    driver: RuntimeDriver,
    client: AgentClient,
    name: str,
    attachments: list[Attachment],
    *,
    qemu_uid: int | None,
) -> None:
    """Hot-plug every image (handed to the domain's QEMU uid), then have the agent mount
    them all in one request: it finds each disk in sysfs and calls mount(2) itself."""
    for att in attachments:
        driver.attach_disk(name, att.image, att.unit, qemu_uid=qemu_uid)
    mounts = [{"unit": att.unit, "path": att.path} for att in attachments]
    try:
        client.request(
            "POST",
            "/volumes/mount",
            {"mounts": mounts, "timeout": MOUNT_TIMEOUT - 5},
            timeout=MOUNT_TIMEOUT,
        )
    except AgentError as exc:
        detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
        code = exc.body.get("error") if isinstance(exc.body, dict) else None
        kind = MountRefused if code == "mount_path_symlink" else MountFailed
        raise kind(f"the guest could not mount its volumes: {detail}") from exc


def flush(client: AgentClient) -> bool:
    """Before a pause: ask the guest to write everything to its disks (best effort: False
    if it did not). The volumes stay mounted; their journals hold what is not yet in place,
    which the next mount, or the detached engine, replays."""
    return _call(client, "/volumes/sync", {})


def freeze(client: AgentClient, paths: list[str]) -> bool:
    """Before the VM is destroyed: freeze each volume's filesystem, which writes out its
    data, checkpoints its journal and marks it clean, so the image is consistent without a
    journal replay whatever the guest's processes still hold open (best effort)."""
    return not paths or _call(client, "/volumes/freeze", {"paths": paths})


def _call(client: AgentClient, path: str, body: dict[str, object]) -> bool:
    try:
        result = client.request("POST", path, body, timeout=FLUSH_TIMEOUT)
    except Exception:
        logger.warning("the guest on port %s did not answer %s", client.port, path, exc_info=True)
        return False
    failed = result.get("failed") if isinstance(result, dict) else None
    if failed:
        logger.warning("the guest on port %s: %s: %s", client.port, path, failed)
    return not failed

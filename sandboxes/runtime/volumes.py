"""Volumes inside a running VM: hot-plug the image, mount it in the guest, flush it.

A volume is a raw image holding ext4. It joins a running domain as a SCSI disk of the
domain's virtio-scsi controller (unit = its place in the sandbox's mount list), then the
agent mounts it at the requested path, running our script as root through the managed
process API. Starts stay snapshot starts: nothing here touches the template's memory
image. The guest's dirty data is written back within seconds (``dirty_expire``), the host
asks for a ``sync`` before it pauses a VM holding volumes and freezes the volumes'
filesystems before it destroys one, so what a sandbox wrote is on the image, clean, when
the next sandbox mounts it or the host works on it detached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .agent_client import AgentClient
from .driver import DriverError, RuntimeDriver

logger = logging.getLogger(__name__)

MOUNT_TIMEOUT = 30.0
FLUSH_TIMEOUT = 20.0

# $1: SCSI unit, $2: mount path. Waits for the hot-plugged disk to appear (the kernel
# scans the new LUN on the controller's event), then mounts it. Dirty pages of every
# filesystem are written back after 2 s instead of 30 s, so a VM that dies loses little.
MOUNT_SCRIPT = r"""
set -eu
unit=$1 target=$2
dev=
i=0
while [ $i -lt 1000 ]; do
    for d in /sys/bus/scsi/devices/*:0:0:"$unit"/block/*; do
        [ -e "$d" ] && dev=/dev/${d##*/}
    done
    [ -n "$dev" ] && [ -b "$dev" ] && break
    dev=
    i=$((i + 1))
    sleep 0.01
done
[ -n "$dev" ] || { echo "the volume disk (SCSI unit $unit) did not appear" >&2; exit 3; }
echo 200 > /proc/sys/vm/dirty_expire_centisecs
echo 100 > /proc/sys/vm/dirty_writeback_centisecs
mkdir -p "$target"
mount -t ext4 -o noatime,nodev,nosuid "$dev" "$target"
"""


@dataclass(frozen=True)
class Attachment:
    unit: int
    image: Path
    path: str  # where the guest mounts it


class MountFailed(DriverError):
    """The guest could not mount a volume (its disk never appeared, or mount refused it)."""


def attach_and_mount(
    driver: RuntimeDriver,
    client: AgentClient,
    name: str,
    attachments: list[Attachment],
    *,
    qemu_uid: int | None,
) -> None:
    """Hot-plug each image (handed to the domain's QEMU uid) and mount it in the guest."""
    for att in attachments:
        driver.attach_disk(name, att.image, att.unit, qemu_uid=qemu_uid)
        result = client.exec(
            ["/bin/sh", "-c", MOUNT_SCRIPT, "mount-volume", str(att.unit), att.path],
            timeout=MOUNT_TIMEOUT,
        )
        if result["exit_code"] != 0:
            detail = (result["stderr"] or result["stdout"]).strip()[-500:]
            raise MountFailed(f"the guest could not mount the volume at {att.path}: {detail}")


def flush(client: AgentClient) -> bool:
    """Before a pause: ask the guest to write everything to its disks (best effort: False
    if it did not). The volumes stay mounted; their journals hold what is not yet in place,
    which the next mount, or the detached engine, replays."""
    return _run(client, ["/bin/sync"])


def freeze(client: AgentClient, paths: list[str]) -> bool:
    """Before the VM is destroyed: freeze each volume's filesystem, which writes out its
    data, checkpoints its journal and marks it clean, so the image is consistent without a
    journal replay whatever the guest's processes still hold open (best effort)."""
    if not paths:
        return True
    return _run(client, ["/bin/sh", "-c", 'sync; for p; do fsfreeze -f "$p"; done', "freeze", *paths])


def _run(client: AgentClient, argv: list[str]) -> bool:
    try:
        result = client.exec(argv, timeout=FLUSH_TIMEOUT)
    except Exception:
        logger.warning("the guest on port %s did not answer %s", client.port, argv[0], exc_info=True)
        return False
    if result["exit_code"] != 0:
        logger.warning("the guest on port %s: %s failed: %s", client.port, argv[0], result["stderr"][-300:])
    return result["exit_code"] == 0

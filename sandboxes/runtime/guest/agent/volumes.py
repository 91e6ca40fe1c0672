"""Volumes inside the guest: mount hot-plugged disks, sync, freeze; and the root
filesystem's freeze around a checkpoint (host-only routes).

The host hot-plugs each volume as a SCSI disk (unit N of the VM's virtio-scsi
controller) and asks for it to be mounted at a path. This runs in the agent itself,
with mount(2) through libc and the disk found in sysfs: no shell and no child process,
since under software emulation every fork and exec costs tens of milliseconds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
import time
from typing import Any

from .core import HttpError

MS_NOSUID, MS_NODEV, MS_NOATIME = 0x2, 0x4, 0x400
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
SCSI_DEVICES = "/sys/bus/scsi/devices"
# Dirty pages of every filesystem are written back after 2 s instead of 30 s, so a VM that
# dies with a volume mounted loses little.
WRITEBACK = {"/proc/sys/vm/dirty_expire_centisecs": "200", "/proc/sys/vm/dirty_writeback_centisecs": "100"}
_libc = ctypes.CDLL(None, use_errno=True)


def scsi_disk(unit: int) -> str | None:
    """``/dev/sdX`` of SCSI unit ``unit`` (any host, channel 0, target 0), once it exists."""
    try:
        entries = os.listdir(SCSI_DEVICES)
    except OSError:
        return None
    for entry in entries:
        if entry.split(":")[1:] != ["0", "0", str(unit)]:
            continue
        try:
            names = os.listdir(f"{SCSI_DEVICES}/{entry}/block")
        except OSError:
            continue
        if names and os.path.exists(f"/dev/{names[0]}"):
            return f"/dev/{names[0]}"
    return None


def _wait_for_disk(unit: int, deadline: float) -> str:
    while True:
        device = scsi_disk(unit)
        if device is not None:
            return device
        if time.monotonic() > deadline:
            raise HttpError(504, "volume_disk_missing", f"the volume disk (SCSI unit {unit}) did not appear")
        time.sleep(0.003)


def mount_volumes(mounts: Any, timeout: float) -> list[dict[str, str]]:
    """Mount each ``{"unit", "path"}`` (ext4, noatime, nodev, nosuid); returns the devices."""
    if not isinstance(mounts, list) or not all(
        isinstance(m, dict) and type(m.get("unit")) is int and isinstance(m.get("path"), str) for m in mounts
    ):
        raise HttpError(400, "bad_request", "mounts: a list of {unit, path}")
    for name, value in WRITEBACK.items():
        with open(name, "w") as knob:
            knob.write(value)
    deadline = time.monotonic() + timeout
    done = []
    for m in mounts:
        device, path = _wait_for_disk(m["unit"], deadline), m["path"]
        # The host refuses system paths by name; a symlink on the way (Debian's /var/run ->
        # /run) would take the mount somewhere else, so the path must be the real one.
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if os.path.realpath(existing) != existing:
            raise HttpError(
                422, "mount_path_symlink", f"{path} goes through a symbolic link; mount at its real path"
            )
        os.makedirs(path, exist_ok=True)
        _mount(device, path, deadline)
        done.append({"device": device, "path": path})
    return done


def _mount(device: str, path: str, deadline: float) -> None:
    """mount(2), retried while the new disk is still being set up: its node can exist a
    moment before the disk answers (ENXIO), seen once in a few dozen hot-plugs under TCG."""
    flags = MS_NOATIME | MS_NODEV | MS_NOSUID
    while _libc.mount(device.encode(), path.encode(), b"ext4", flags, None) != 0:
        err = ctypes.get_errno()
        if err not in (errno.ENXIO, errno.ENODEV, errno.ENOENT) or time.monotonic() > deadline:
            raise HttpError(422, "mount_failed", f"mount {device} on {path}: {os.strerror(err)}")
        time.sleep(0.01)


def freeze(paths: Any) -> list[str]:
    """Write everything out, then freeze each filesystem (its journal checkpointed, marked
    clean). Returns the paths that could not be frozen, with why."""
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise HttpError(400, "bad_request", "paths: a list of mount paths")
    os.sync()
    failed = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror}")
    return failed


# --- the root filesystem, frozen around a guest-mode checkpoint -----------------------------

FITHAW = 0xC0045878  # _IOWR('X', 120, int)
_root_freeze = {"generation": 0}
_root_lock = threading.Lock()


def freeze_root(thaw_after: Any) -> dict[str, Any]:
    """Write everything out and freeze ``/`` until ``thaw_root`` or ``thaw_after`` seconds,
    whichever comes first: a host that dies mid-capture never leaves the guest frozen.

    Only ioctls from code already loaded, and a timer thread started before the freeze:
    nothing on the way to the thaw writes to the frozen filesystem or starts a process."""
    if type(thaw_after) not in (int, float) or not 0 < thaw_after <= 60:
        raise HttpError(400, "bad_request", "thaw_after: seconds, at most 60")
    with _root_lock:
        _root_freeze["generation"] += 1
        generation = _root_freeze["generation"]
        timer = threading.Timer(float(thaw_after), _thaw_if, args=(generation,))
        timer.daemon = True
        os.sync()
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            raise HttpError(409, "freeze_failed", f"cannot freeze /: {exc.strerror}") from exc
        finally:
            os.close(fd)
        timer.start()
    return {"frozen": True, "generation": generation}


def _thaw_if(generation: int) -> None:
    with _root_lock:
        if _root_freeze["generation"] == generation:
            _thaw()


def _thaw() -> bool:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen (the timer thawed it already)
            return False
        raise
    finally:
        os.close(fd)
    return True


def thaw_root() -> dict[str, Any]:
    with _root_lock:
        _root_freeze["generation"] += 1  # a pending timer of this freeze does nothing now
        return {"thawed": _thaw()}

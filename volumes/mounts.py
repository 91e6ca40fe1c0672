"""The `volume_mounts` of a create: every request form, one validated shape.

Accepted forms: ``[{"path": "/data", "name": "cache"}]`` (the SDK's),
``{"/data": "cache"}`` and ``{"/data": {"name": "cache"}}``. Paths are absolute guest
paths, normalised strictly (no ``.``/``..``/``//``), never a system directory or inside
one, never one mount inside another; at most ``VOLUME_MAX_MOUNTS`` per sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from volumes.models import name_problem
from watasu import errors

MAX_PATH = 255
# Directories a volume may not hide (the guest's system, its API filesystems, our agent);
# nothing may be mounted on them or below them. `/` is refused separately.
SYSTEM_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt/watasu",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
)
# System directories whose subdirectories are fine (`/var/cache/x`, `/tmp/x`), not themselves.
SYSTEM_ROOTS = ("/var", "/tmp", "/opt", "/home", "/root", "/srv", "/mnt", "/media")


@dataclass(frozen=True)
class Mount:
    path: str
    name: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}


def _refuse(message: str, code: str = "invalid_volume_mounts") -> errors.Invalid:
    return errors.Invalid(message, code=code, errors=[message])


def mount_path(path: Any) -> str:
    """`path` as a clean absolute guest path, or a 422 saying what is wrong with it."""
    if not isinstance(path, str) or not path:
        raise _refuse("volume_mounts: each path must be a non-empty string.")
    if len(path) > MAX_PATH or any(ord(c) < 32 or c == "\x7f" for c in path):
        raise _refuse(f"volume_mounts: {path!r} is too long or holds control characters.", "invalid_path")
    if not path.startswith("/"):
        raise _refuse(f"volume_mounts: {path!r} is not an absolute path.", "invalid_path")
    trimmed = path.rstrip("/") or "/"
    parts = trimmed.split("/")[1:]
    if trimmed != "/" and any(part in ("", ".", "..") for part in parts):
        raise _refuse(f"volume_mounts: {path!r} has empty, '.' or '..' segments.", "invalid_path")
    if trimmed == "/" or trimmed in SYSTEM_ROOTS:
        raise _refuse(f"volume_mounts: {trimmed} is a system directory; mount below it.", "invalid_path")
    for system in SYSTEM_DIRS:
        if trimmed == system or trimmed.startswith(system + "/"):
            raise _refuse(
                f"volume_mounts: {trimmed} is (inside) the system directory {system}.", "invalid_path"
            )
    return trimmed


def _entries(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, list):
        pairs = []
        for item in value:
            if not isinstance(item, dict):
                raise _refuse("volume_mounts: each item must be an object {path, name}.")
            unknown = set(item) - {"path", "name"}
            if unknown:
                raise _refuse(
                    f"volume_mounts: unknown key {sorted(unknown)[0]!r} (items have path and name)."
                )
            pairs.append((item.get("path"), item.get("name")))
        return pairs
    if isinstance(value, dict):
        pairs = []
        for path, target in value.items():
            if isinstance(target, dict):
                unknown = set(target) - {"name"}
                if unknown:
                    raise _refuse(f"volume_mounts: unknown key {sorted(unknown)[0]!r} for {path}.")
                target = target.get("name")
            pairs.append((path, target))
        return pairs
    raise _refuse("volume_mounts must be a list of {path, name} or an object of path to name.")


def parse_mounts(value: Any) -> tuple[Mount, ...]:
    """Every accepted form of `volume_mounts` as mounts in request order (empty: none)."""
    if value is None:
        return ()
    mounts: list[Mount] = []
    for raw_path, name in _entries(value):
        path = mount_path(raw_path)
        problem = name_problem(name)
        if problem:
            raise _refuse(f"volume_mounts: {path}: {problem}")
        mounts.append(Mount(path=path, name=name))
    limit = settings.VOLUME_MAX_MOUNTS
    if len(mounts) > limit:
        raise _refuse(f"volume_mounts: at most {limit} volumes per sandbox ({len(mounts)} given).")
    seen_paths: dict[str, Mount] = {}
    seen_names: set[str] = set()
    for mount in mounts:
        if mount.path in seen_paths:
            raise _refuse(f"volume_mounts: {mount.path} is given twice.", "invalid_path")
        for other in seen_paths:
            if mount.path.startswith(other + "/") or other.startswith(mount.path + "/"):
                raise _refuse(f"volume_mounts: {mount.path} and {other} are nested; mount side by side.")
        if mount.name in seen_names:
            raise _refuse(f"volume_mounts: volume {mount.name} is mounted twice (a volume has one path).")
        seen_paths[mount.path] = mount
        seen_names.add(mount.name)
    return tuple(mounts)

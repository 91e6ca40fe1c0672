"""Paths and file-system entries, and the all-or-nothing writes behind the file routes."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import shutil
import stat
import zlib
from collections.abc import Iterator
from typing import Any

from .core import HttpError, iso, os_error


def norm_path(raw: str | None, what: str = "path") -> str:
    """Absolute, normalised path; relative paths are refused (the SDK always sends absolute)."""
    if not raw:
        raise HttpError(422, "validation_failed", f"{what} is required")
    if "\0" in raw:
        raise HttpError(422, "validation_failed", f"{what} contains a NUL byte")
    if not raw.startswith("/"):
        raise HttpError(422, "validation_failed", f"{what} must be absolute: {raw!r}")
    path = os.path.normpath(raw)
    return "/" + path.lstrip("/")  # normpath keeps a leading "//"


def _perm_string(mode: int) -> str:
    """``rwxr-xr-x`` from mode bits (stat.filemode minus the type letter)."""
    return stat.filemode(mode)[1:]


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def entry_from_stat(path: str, st: os.stat_result, link_target: str | None = None) -> dict[str, Any]:
    """A file entry: ``mode`` is an int, ``modified_time`` ISO, ``mtime`` epoch."""
    if stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "bytes": st.st_size,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "permissions": _perm_string(st.st_mode),
        "owner": _owner(st.st_uid),
        "group": _group(st.st_gid),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "modified_time": iso(st.st_mtime),
        "mtime": int(st.st_mtime),
        "symlink_target": link_target,
    }


def file_entry(path: str) -> dict[str, Any]:
    """FileEntry of ``path`` without following a final symlink (stat semantics)."""
    try:
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    except OSError as e:
        raise os_error(e, path) from e
    return entry_from_stat(path, st, target)


def list_dir(path: str, depth: int) -> list[dict[str, Any]]:
    """Entries below ``path`` up to ``depth`` levels (1 = children), sorted, never following links."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise os_error(e, path) from e
    if not stat.S_ISDIR(st.st_mode):
        raise HttpError(422, "not_a_directory", f"{path} is not a directory")
    out: list[dict[str, Any]] = []
    stack = [(path, 1)]
    while stack:
        directory, level = stack.pop()
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError:
            continue  # vanished or unreadable subdirectory: skip it, keep the listing
        for d in items:
            try:
                dst = d.stat(follow_symlinks=False)
                target = os.readlink(d.path) if stat.S_ISLNK(dst.st_mode) else None
            except OSError:
                continue
            out.append(entry_from_stat(d.path, dst, target))
            if level < depth and stat.S_ISDIR(dst.st_mode):
                stack.append((d.path, level + 1))
    out.sort(key=lambda e: e["path"])
    return out


def ensure_parent(path: str) -> None:
    """mkdir -p the parent; a file in the way is ``not_a_directory`` (422)."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError as e:
        raise HttpError(422, "not_a_directory", f"{parent} is not a directory") from e
    except OSError as e:
        raise os_error(e, parent) from e


def write_stream(path: str, chunks: Iterator[bytes], gzipped: bool) -> dict[str, Any]:
    """Write ``path`` from ``chunks`` without holding the file in memory, all or nothing.

    A regular file (or a new one) is written beside itself and renamed into place once the
    body is whole, so an upload cut short leaves the old contents, never half of the new;
    the replacement keeps the old file's mode and owner. A symlink is written through to
    its target; anything else (a FIFO, a device) is written in place.
    """
    ensure_parent(path)
    if os.path.isdir(path):
        raise HttpError(422, "is_a_directory", f"{path} is a directory")
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        existing: os.stat_result | None = os.stat(target)
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        return _write_in_place(path, target, chunks, gzipped)
    directory, name = os.path.split(target)
    temp = os.path.join(directory, upload_temp_name(name, replacing=existing is not None))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise os_error(e, path) from e
    try:
        with open(fd, "wb") as f:
            _copy_body(f, chunks, gzipped)
            if existing is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode))
                with contextlib.suppress(OSError):
                    os.fchown(f.fileno(), existing.st_uid, existing.st_gid)
        os.replace(temp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(e, OSError):
            raise os_error(e, path) from e
        raise
    return file_entry(path)


# An upload in progress, beside its file: `.<name>.watasu-<new|put>-<12 hex>`. Watches never
# report it; its rename into place is reported as the write (and create) of the file itself.
UPLOAD_TEMP = re.compile(r"\..*\.watasu-(new|put)-[0-9a-f]{12}", re.DOTALL)


def upload_temp_name(name: str, *, replacing: bool) -> str:
    return f".{name}.watasu-{'put' if replacing else 'new'}-{os.urandom(6).hex()}"


def _write_in_place(path: str, target: str, chunks: Iterator[bytes], gzipped: bool) -> dict[str, Any]:
    try:
        with open(target, "wb") as f:
            _copy_body(f, chunks, gzipped)
    except OSError as e:
        raise os_error(e, path) from e
    return file_entry(path)


def _copy_body(f: Any, chunks: Iterator[bytes], gzipped: bool) -> None:
    inflate = zlib.decompressobj(wbits=47) if gzipped else None  # 47 = auto gzip/zlib header
    try:
        for chunk in chunks:
            f.write(inflate.decompress(chunk) if inflate is not None else chunk)
        if inflate is not None:
            f.write(inflate.flush())
    except zlib.error as e:
        raise HttpError(400, "bad_request", f"body is not valid gzip: {e}") from e


def remove_path(path: str) -> None:
    """rm -rf semantics for directories, unlink for anything else (links are not followed)."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if path == "/":
                raise HttpError(422, "validation_failed", "refusing to delete /")
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:
        raise os_error(e, path) from e


def move_path(src: str, dst: str) -> dict[str, Any]:
    """Rename (replacing an existing destination file); falls back to copy across filesystems."""
    try:
        os.lstat(src)
    except OSError as e:
        raise os_error(e, src) from e
    ensure_parent(dst)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise os_error(e, dst) from e
        try:
            shutil.move(src, dst)
        except OSError as e2:
            raise os_error(e2, dst) from e2
    return file_entry(dst)


def make_dir(path: str) -> dict[str, Any]:
    """mkdir -p, idempotent; an existing non-directory is ``not_a_directory``."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as e:
        raise HttpError(422, "not_a_directory", f"{path} exists and is not a directory") from e
    except NotADirectoryError as e:
        raise HttpError(422, "not_a_directory", f"a component of {path} is not a directory") from e
    except OSError as e:
        raise os_error(e, path) from e
    return file_entry(path)

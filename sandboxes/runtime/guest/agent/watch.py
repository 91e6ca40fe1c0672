"""Filesystem watch over inotify, streamed to a WebSocket."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
import time
from typing import Any

from .core import HttpError
from .files import UPLOAD_TEMP, file_entry
from .websocket import WebSocket, WsClosed

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, 0o4000, 0o2000000
WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
SCAN_MEMORY = 10.0  # seconds a scanned entry's own create event is awaited, to drop it
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "sshfs", "ceph", "glusterfs", "virtiofs"}


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class Inotify:
    """Minimal inotify through ctypes; recursive watches add new subdirectories as they appear.

    A directory's watch starts after it was created, so whatever was made in it before
    (``mkdir -p a/b/c; echo z > a/b/c/f``: the first event names ``a`` only) is found by
    scanning it once watched, and reported as created; an inotify event for the same
    entry arriving after the scan is not reported twice.
    """

    def __init__(self, root: str, recursive: bool) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.root = root
        self.recursive = recursive
        self.paths: dict[int, str] = {}
        self.scanned: dict[str, float] = {}  # path -> when a scan reported it created
        self.uploads: dict[int, str] = {}  # rename cookie -> "new" / "put" of an upload's temp file
        if recursive:
            self.add_tree(root)
        else:
            self.add(root)

    def add(self, path: str) -> None:
        wd = self.libc.inotify_add_watch(self.fd, path.encode(errors="surrogateescape"), WATCH_MASK)
        if wd >= 0:
            self.paths[wd] = path

    def add_tree(self, root: str) -> list[str]:
        """Watch ``root`` and every directory under it; the entries found under it."""
        self.add(root)
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                self.add(os.path.join(dirpath, d))
            found += [
                os.path.join(dirpath, name)
                for name in sorted(dirnames) + sorted(filenames)
                if not UPLOAD_TEMP.fullmatch(name)
            ]
        return found

    def _created_inside(self, directory: str) -> list[tuple[str, int]]:
        """Watch a new directory's tree; what it already holds, as create events."""
        now = time.monotonic()
        self.scanned = {p: t for p, t in self.scanned.items() if now - t < SCAN_MEMORY}
        out = []
        for path in self.add_tree(directory):
            self.scanned[path] = now
            out.append((path, IN_CREATE | (IN_ISDIR if os.path.isdir(path) else 0)))
        return out

    def relative(self, path: str) -> str:
        """``path`` as named from the watched directory (``a/b/c/f``)."""
        return os.path.relpath(path, self.root)

    def read(self) -> list[tuple[str, int]]:
        """Pending (path, mask) pairs; empty when nothing is queued."""
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(buf):
            wd, mask, cookie, n = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16 : i + 16 + n].split(b"\0", 1)[0].decode(errors="surrogateescape")
            i += 16 + n
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                continue
            base = self.paths.get(wd)
            if base is None:
                continue
            path = os.path.join(base, name) if name else base
            if upload := UPLOAD_TEMP.fullmatch(name):
                if mask & IN_MOVED_FROM:  # an upload renamed into place: its MOVED_TO follows
                    self.uploads[cookie] = upload.group(1)
                    while len(self.uploads) > 64:
                        self.uploads.pop(next(iter(self.uploads)))
                continue
            if mask & IN_MOVED_TO and (kind := self.uploads.pop(cookie, None)) is not None:
                out += (
                    [(path, IN_CREATE), (path, IN_CLOSE_WRITE)] if kind == "new" else [(path, IN_CLOSE_WRITE)]
                )
                continue
            if mask & IN_CREATE and self.scanned.pop(path, None) is not None:
                continue  # already reported by the scan of its new parent
            out.append((path, mask))
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                out += self._created_inside(path)
        return out

    def close(self) -> None:
        os.close(self.fd)


def watch_event(path: str, mask: int, include_entry: bool, name: str) -> dict[str, Any] | None:
    """inotify mask → data-plane watch event (create / write / rename / remove / chmod); ``path``
    is absolute, ``name`` relative to the watched directory."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        kind = "create"
    elif mask & (IN_DELETE | IN_DELETE_SELF):
        kind = "remove"
    elif mask & (IN_MOVED_FROM | IN_MOVE_SELF):
        kind = "rename"
    elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
        kind = "write"
    elif mask & IN_ATTRIB:
        kind = "chmod"
    else:
        return None
    ev: dict[str, Any] = {"type": kind, "path": path, "name": name}
    if include_entry and kind != "remove":
        with contextlib.suppress(HttpError):
            ev["file"] = file_entry(path)
    return ev


def run_watch(ws: WebSocket, ino: Inotify, include_entry: bool) -> None:
    """Stream batched events until the client closes (it never sends anything after the handshake).

    The watch is installed before the handshake completes (see ``watch``): the SDK's
    ``watch_dir`` returns on the 101, and a write made right after it must be seen.
    """
    stop = threading.Event()

    def drain_client() -> None:
        while ws.recv() is not None:
            pass
        stop.set()

    threading.Thread(target=drain_client, daemon=True).start()
    try:
        ws.send_json({"type": "ready"})
        last_ping = time.monotonic()
        while not stop.is_set():
            r, _, _ = select.select([ino.fd], [], [], 0.5)
            if not r:
                if time.monotonic() - last_ping > 30:  # keep idle proxies from dropping the socket
                    ws.send_json({"type": "pong"})
                    last_ping = time.monotonic()
                continue
            time.sleep(0.05)  # let a burst accumulate into one batch
            batch, last = [], None
            for path, mask in ino.read():
                ev = watch_event(path, mask, include_entry, ino.relative(path))
                if ev is not None and (ev["type"], ev["path"]) != last:
                    batch.append(ev)
                    last = (ev["type"], ev["path"])
            if batch:
                ws.send_json({"type": "events", "events": batch})
    except WsClosed:
        pass
    finally:
        ino.close()
        ws.close()

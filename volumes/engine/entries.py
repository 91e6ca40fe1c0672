"""What the engine returns (``Entry``, the API's VolumeEntry) and the on-disk inode fields
it is built from (``_Inode``)."""

from __future__ import annotations

import stat as st
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Entry:
    """One file of a volume. ``mode`` holds the permission bits only (incl. setuid, setgid,
    sticky); ``type`` says what it is. Times are ISO-8601 UTC, whole seconds."""

    path: str
    name: str
    type: str  # "file" | "directory" | "symlink" | "other"
    size: int
    mode: int
    uid: int
    gid: int
    atime: str
    mtime: str
    ctime: str

    def as_dict(self) -> dict[str, object]:
        """The API's VolumeEntry; names that are not UTF-8 show their bytes as ``\\xNN``."""
        return {
            "path": _printable(self.path),
            "name": _printable(self.name),
            "type": self.type,
            "size": self.size,
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "atime": self.atime,
            "mtime": self.mtime,
            "ctime": self.ctime,
        }


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class _Inode:
    """The fields of an on-disk inode the engine uses (decoded from ``inode_dump``)."""

    ino: int
    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    size: int
    links: int
    file_acl: int  # block of extended attributes outside the inode, 0 if none
    atime: int
    mtime: int
    ctime: int

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.mode)

    @property
    def kind(self) -> str:
        if st.S_ISREG(self.mode):
            return "file"
        if st.S_ISDIR(self.mode):
            return "directory"
        return "symlink" if st.S_ISLNK(self.mode) else "other"

    def entry(self, path: str) -> Entry:
        name = path.rsplit("/", 1)[-1] or "/"
        return Entry(
            path, name, self.kind, self.size, st.S_IMODE(self.mode), self.uid, self.gid,
            _iso(self.atime), _iso(self.mtime), _iso(self.ctime),
        )  # fmt: skip


def _iso(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "1970-01-01T00:00:00Z"

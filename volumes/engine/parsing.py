"""Reading what debugfs printed: hex dumps, inodes (``inode_dump`` and ``stat``), the
superblock, and error messages mapped onto engine errors."""

from __future__ import annotations

import re
import stat as st
import struct

from .debugfs import _clean, _first_error
from .entries import _Inode
from .errors import Corrupt, EngineError, NoSpace, NotADirectory, NotFound, ToolFailed

_HEX_LINE = re.compile(rb"^([0-7]{4,})  ((?:[0-9a-f]{4} ?){1,8})")
# At a line start, so a name echoed back in the command line can never match.
_IMAP = re.compile(rb"^Inode (\d+) is part of block group", re.MULTILINE)
_LS_ENTRY = re.compile(rb"/(\d+)/(\d+)/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n")  # uid/gid: %d


def _hexdump(text: bytes, minimum: int) -> bytes | None:
    """The bytes of a debugfs hex dump (offsets in octal, ``*`` for repeated lines),
    padded to ``minimum`` by repeating the last line as ``*`` means. None if no dump."""
    data = bytearray()
    last = b""
    repeating = False
    for line in text.split(b"\n"):
        if line == b"*":
            repeating = True
            continue
        m = _HEX_LINE.match(line)
        if not m:
            continue
        offset = int(m.group(1), 8)
        while repeating and len(data) < offset and last:
            data += last
        repeating = False
        row = bytes.fromhex(m.group(2).decode().replace(" ", ""))
        del data[offset:]
        data += bytes(offset - len(data)) + row
        last = row
    if not data:
        return None
    while len(data) < minimum and last:
        data += last
    return bytes(data)


def _inode(ino: int, text: bytes, inode_size: int) -> _Inode | None:
    raw = _hexdump(text, max(inode_size, 128))
    if raw is None or len(raw) < 128:
        return None
    mode, uid_lo, size_lo, atime, ctime, mtime = struct.unpack_from("<HHIIII", raw, 0)
    gid_lo, links = struct.unpack_from("<HH", raw, 0x18)
    acl_lo, size_hi = struct.unpack_from("<II", raw, 0x68)
    acl_hi, uid_hi, gid_hi = struct.unpack_from("<HHH", raw, 0x76)
    times = [_signed(ctime), _signed(mtime), _signed(atime)]
    if inode_size > 128 and len(raw) >= 0x90:
        (extra,) = struct.unpack_from("<H", raw, 0x80)
        for i in range(3):  # ctime_extra, mtime_extra, atime_extra: bits 0-1 extend the epoch
            if extra >= 8 + 4 * i:
                (ext,) = struct.unpack_from("<I", raw, 0x84 + 4 * i)
                times[i] += (ext & 3) << 32
    return _Inode(
        ino=ino, mode=mode, uid=uid_lo | uid_hi << 16, gid=gid_lo | gid_hi << 16,
        size=size_lo | size_hi << 32, links=links, file_acl=acl_lo | acl_hi << 32,
        atime=times[2], mtime=times[1], ctime=times[0],
    )  # fmt: skip


_STAT_TYPES = {
    b"regular": st.S_IFREG, b"directory": st.S_IFDIR, b"symlink": st.S_IFLNK, b"FIFO": st.S_IFIFO,
    b"socket": st.S_IFSOCK, b"character special": st.S_IFCHR, b"block special": st.S_IFBLK,
}  # fmt: skip
_STAT = re.compile(
    rb"^Inode: (\d+)\s+Type: ([A-Za-z ]+?)\s+Mode:\s+([0-7]+).*?"
    rb"^User:\s+(-?\d+)\s+Group:\s+(-?\d+).*?Size: (\d+)\n"
    rb"File ACL: (\d+).*?^Links: (\d+).*?"
    rb"^ ?ctime: 0x([0-9a-f]+)(?::([0-9a-f]+))?.*?"
    rb"^ ?atime: 0x([0-9a-f]+)(?::([0-9a-f]+))?.*?"
    rb"^ ?mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?",
    re.M | re.S,
)


def _inode_from_stat(text: bytes) -> _Inode | None:
    """The inode ``stat`` printed (the bulk form: ``inode_dump`` prints a byte per write
    call and costs ten times more per inode). Every field matched precedes the only
    strings the guest controls there (a fast symlink's target, xattrs), so the first
    match is the real one."""
    m = _STAT.search(text[:2048])  # the fields sit in the first lines; extents may follow for MiBs
    if m is None:
        return None
    g = m.groups()

    def when(seconds: bytes, extra: bytes | None) -> int:
        return _signed(int(seconds, 16)) + ((int(extra, 16) & 3) << 32 if extra else 0)

    return _Inode(
        ino=int(g[0]), mode=_STAT_TYPES.get(g[1], 0) | int(g[2], 8),
        uid=int(g[3]) & 0xFFFFFFFF, gid=int(g[4]) & 0xFFFFFFFF,  # printed with %d
        size=int(g[5]), links=int(g[7]), file_acl=int(g[6]),
        ctime=when(g[8], g[9]), atime=when(g[10], g[11]), mtime=when(g[12], g[13]),
    )  # fmt: skip


def _read_inode(ino: int, text: bytes, inode_size: int, path: str) -> _Inode:
    """The inode ``inode_dump`` printed, or the error it printed instead."""
    inode = _inode(ino, text, inode_size)
    if inode is not None:
        return inode
    _raise_if_error(text, path)
    raise Corrupt(f"The inode of {path} is unreadable.")


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _superblock(text: bytes) -> dict[str, str]:
    """``stats -h`` as a dict. The label, last mount point and error function names are the
    guest's strings: one that smuggles a newline could fake a field, so a field seen twice
    makes the superblock untrusted."""
    fields: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9 #_/()-]*", key):
            continue
        if key in fields:
            raise Corrupt(f"The volume's superblock is malformed (field {_clean(key, 40)!r} appears twice).")
        fields[key] = value.strip()
    return fields


def _error_of(text: bytes, path: str) -> EngineError | None:
    """The error a command printed, as an engine error; None if it printed none."""
    message = _first_error(text)
    if not message:
        return None
    low = message.lower()
    if "file not found by ext2_lookup" in low:
        return NotFound(f"Path {path} not found.")
    if "is not a directory" in low:
        return NotADirectory(f"A component of {path} is not a directory.")
    if "could not allocate" in low or "no free space" in low or "file too big" in low:
        return NoSpace(f"Not enough space in the volume for {path}.")
    if any(w in low for w in ("corrupt", "checksum", "bad magic", "illegal", "short read", "invalid")):
        return Corrupt(f"The volume's filesystem is damaged near {path}: {message}.")
    return ToolFailed(f"debugfs failed on {path}: {message}")


def _raise_if_error(text: bytes, path: str) -> None:
    error = _error_of(text, path)
    if error is not None:
        raise error

"""Detached reads: stat, read_file, list_dir (one run per level of the tree) and usage."""

from __future__ import annotations

import os
import stat as st
from collections.abc import Iterator, Sequence
from pathlib import Path

from .constants import MAX_LIST_ENTRIES, MAX_OUTPUT_BYTES
from .debugfs import _Batch, _Image, _open, _Output, _rel
from .entries import Entry, _Inode
from .errors import (
    Corrupt,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotARegularFile,
    NotFound,
    TooLarge,
    TooManyEntries,
)
from .parsing import _LS_ENTRY, _error_of, _inode_from_stat, _raise_if_error
from .paths import _join, split_path
from .sandbox import _memfd, _OutputTooLarge
from .walk import _Walk, _walk


def stat(image: Path, path: str) -> Entry:
    """The entry at ``path`` (a symlink is described, not followed)."""
    comps = split_path(path)
    with _open(image, write=False) as img:
        walk, _, _ = _walk(img, comps)
        if walk.missing is not None:
            raise NotFound(f"Path {walk.path(walk.missing + 1)} not found.")
        return walk.target.entry(_join(comps))


def read_file(image: Path, path: str, *, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``; TooLarge above ``max_bytes``. One run:
    the walk, then ``dump`` into a memfd under a file-size limit of ``max_bytes + 1``, so a
    larger file stops the tool (SIGXFSZ) instead of filling host memory."""
    comps = split_path(path)
    if not comps:
        raise IsADirectory("/ is a directory.")
    target = _join(comps)
    out_fd = _memfd("volume-read")
    try:
        with _open(image, write=False) as img:
            dump = ("dump", _rel(comps[-1]), f"/proc/self/fd/{out_fd}")
            walk, output, section = _walk(
                img, comps, dump, fds=(out_fd,), fsize=max_bytes + 1, data_bytes=max_bytes
            )
            inode = _regular(walk)
            if inode.size > max_bytes:
                raise TooLarge(f"{target} is {inode.size} bytes, over the limit of {max_bytes} bytes.")
            _raise_if_error(output.get(section), target)
            data = os.pread(out_fd, inode.size + 1, 0)
            if len(data) != inode.size:
                raise Corrupt(f"{target} could not be read whole ({len(data)} of {inode.size} bytes).")
            return data
    finally:
        os.close(out_fd)


def _regular(walk: _Walk) -> _Inode:
    if walk.missing is not None:
        raise NotFound(f"Path {walk.path(walk.missing + 1)} not found.")
    inode = walk.target
    if inode.is_dir:
        raise IsADirectory(f"{_join(walk.comps)} is a directory.")
    if not st.S_ISREG(inode.mode):
        kinds = {"symlink": "a symbolic link", "directory": "a directory"}
        what = kinds.get(inode.kind, "a device, FIFO or socket")
        raise NotARegularFile(f"{_join(walk.comps)} is {what}, not a regular file.")
    return inode


def list_dir(image: Path, path: str, depth: int = 1) -> list[Entry]:
    """Entries under the directory ``path`` down to ``depth`` levels (1: its children), in
    path order, without ``path`` itself. Symlinks are listed, never followed. More than
    MAX_LIST_ENTRIES is TooManyEntries."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise InvalidArgument("depth must be a whole number from 1.")
    comps = split_path(path)
    with _open(image, write=False) as img:
        top = _directory(img, comps)
        found = _tree(img, _join(comps), top, depth, MAX_LIST_ENTRIES, "list")
        inodes = _inodes(img, sorted({ino for _, ino, _ in found}))
        entries = [inodes[ino].entry(p) for p, ino, _ in found if ino in inodes]
    return sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape").split(b"/"))


def _directory(img: _Image, comps: list[bytes]) -> _Inode:
    walk, _, _ = _walk(img, comps)
    if walk.missing is not None:
        raise NotFound(f"Path {walk.path(walk.missing + 1)} not found.")
    if not walk.target.is_dir:
        raise NotADirectory(f"{_join(comps)} is not a directory.")
    return walk.target


def _tree(
    img: _Image, path: str, top: _Inode, depth: int, limit: int, what: str
) -> list[tuple[str, int, int]]:
    """(path, inode, st_mode) of everything under ``top`` down to ``depth`` levels, one
    read-only run per level. Each directory is entered once, so a looped tree ends."""
    found: list[tuple[str, int, int]] = []
    frontier = [(path, top.ino)]
    seen = {top.ino}
    for _ in range(depth):
        if not frontier:
            break
        batch = _Batch()
        sections = [(p, batch.add("ls", "-p", f"<{ino}>")) for p, ino in frontier]
        output = _run_listing(img, batch, limit, what)
        frontier = []
        for parent, section in sections:
            for name, ino, mode in _ls_entries(output.get(section), parent):
                child = parent.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
                found.append((child, ino, mode))
                if len(found) > limit:
                    raise _too_many(what, limit)
                if st.S_ISDIR(mode) and ino not in seen:
                    seen.add(ino)
                    frontier.append((child, ino))
    return found


def _run_listing(img: _Image, batch: _Batch, limit: int, what: str) -> _Output:
    try:
        return img.debugfs(batch, cap=min(MAX_OUTPUT_BYTES, 64 + limit * 320))
    except _OutputTooLarge:
        raise _too_many(what, limit) from None


def _too_many(what: str, limit: int) -> TooManyEntries:
    if what == "list":
        return TooManyEntries(f"More than {limit} entries; list a smaller depth or a subdirectory.")
    return TooManyEntries(f"More than {limit} entries to remove; remove it from inside a sandbox.")


def _ls_entries(text: bytes, parent: str) -> Iterator[tuple[bytes, int, int]]:
    """(name, inode, st_mode) per entry of ``ls -p`` (``/ino/mode/uid/gid/name/size/``: a
    name cannot hold ``/``, so the framing is exact even for names with newlines)."""
    pos = 0
    while pos < len(text):
        m = _LS_ENTRY.match(text, pos)
        if m is None:
            end = text.find(b"\n", pos)
            line = text[pos : len(text) if end < 0 else end]
            _raise_if_error(line, parent)
            pos = len(text) if end < 0 else end + 1
            continue
        pos = m.end()
        ino, mode, name = int(m.group(1)), int(m.group(2), 8), m.group(5)
        if ino and name not in (b".", b".."):
            yield name, ino, mode


def _inodes(img: _Image, inos: Sequence[int]) -> dict[int, _Inode]:
    if not inos:
        return {}
    batch = _Batch()
    sections = [(ino, batch.add("stat", f"<{ino}>")) for ino in inos]
    output = img.debugfs(batch)
    result = {}
    for ino, section in sections:
        text = output.get(section)
        inode = _inode_from_stat(text)
        if inode is None or inode.ino != ino:
            raise _error_of(text, f"inode {ino}") or Corrupt(f"Inode {ino} is unreadable.")
        result[ino] = inode
    return result


def usage(image: Path) -> tuple[int, int]:
    """(bytes used inside the filesystem, as ``df`` counts them; bytes the sparse image
    takes on the host)."""
    with _open(image, write=False) as img:
        _walk(img, [])
        fields = img.superblock
        allocated = os.fstat(img.fd).st_blocks * 512
    try:
        block = int(fields["Block size"])
        blocks = int(fields["Block count"])
        free = int(fields["Free blocks"])
        overhead = int(fields.get("Overhead clusters", "0"))
    except (KeyError, ValueError):
        raise Corrupt("The volume's superblock is unreadable.") from None
    used = max(0, min(blocks - free - overhead, blocks)) * block
    return min(used, img.size), allocated

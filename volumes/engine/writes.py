"""Detached writes: create_image, make_dir, write_file (new, or replaced through a staging
file), set_metadata and remove (every inode of a tree released by number)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat as st
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from .constants import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    MAX_LABEL_BYTES,
    MAX_REMOVE_ENTRIES,
    MIN_IMAGE_BYTES,
    MKFS,
    STAGING_PREFIX,
    TOOL_TIMEOUT,
)
from .debugfs import _Batch, _first_error, _Image, _open, _Output, _q, _rel
from .entries import Entry, _Inode
from .errors import (
    AlreadyExists,
    Corrupt,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NoSpace,
    NotFound,
    ToolFailed,
    Unsupported,
)
from .parsing import _IMAP, _error_of, _hexdump, _raise_if_error, _read_inode
from .paths import _check_id, _join, parse_mode, split_path
from .reads import _inodes, _tree
from .sandbox import _memfd, run_tool, tools_ids
from .walk import _require_writable, _Walk, _walk


def create_image(path: Path, size_bytes: int, label: str = "") -> None:
    """A sparse file of ``size_bytes`` holding a fresh ext4, owned by the tools user (0600).

    Built under a temporary name and renamed into place, so a crash never leaves a half
    image under the final name. ``assume_storage_prezeroed``: the file is all holes, so
    mkfs writes no zeroes and still marks every inode table initialised: the guest kernel
    runs no lazy init and the file stays a few MiB. No reserved blocks (a data volume).
    The root directory is 0755 root:root, the user the guest agent runs commands as.
    """
    path = Path(path)
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < MIN_IMAGE_BYTES:
        raise InvalidArgument(f"A volume must be at least {MIN_IMAGE_BYTES >> 20} MiB.")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
        ids = tools_ids()
        if ids is not None:
            os.fchown(fd, *ids)
        argv = [MKFS, "-q", "-F", "-m", "0", "-E", "assume_storage_prezeroed=1,nodiscard,root_owner=0:0"]
        if label:
            argv += ["-L", _label(label)]
        out, rc = run_tool(
            [*argv, f"/proc/self/fd/{fd}"], fds=(fd,), timeout=TOOL_TIMEOUT, cap=1 << 20, fsize=size_bytes
        )
        if rc != 0 or os.fstat(fd).st_size != size_bytes or not _has_ext4_magic(fd):
            raise ToolFailed(f"mkfs.ext4 failed: {_first_error(out) or 'no filesystem written'}")
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _label(label: str) -> str:
    raw = "".join(c for c in label if c.isprintable()).encode()[:MAX_LABEL_BYTES]
    return raw.decode("utf-8", "ignore")


def _has_ext4_magic(fd: int) -> bool:
    return os.pread(fd, 2, 1024 + 0x38) == b"\x53\xef"


def _new_mode(kind: int, mode: int | None, default: int) -> str:
    return f"0{kind | (default if mode is None else parse_mode(mode)):o}"


def _set_owner_mode(
    batch: _Batch,
    target: bytes,
    kind: int,
    *,
    uid: int | None,
    gid: int | None,
    mode: int | None,
    default: int | None,
) -> None:
    """``sif`` commands for an inode's mode (with its type bits), uid and gid."""
    if mode is not None or default is not None:
        batch.add("sif", target, "mode", _new_mode(kind, mode, default or 0))
    if uid is not None:
        batch.add("sif", target, "uid", uid)
    if gid is not None:
        batch.add("sif", target, "gid", gid)


def _touch(batch: _Batch, ino: int) -> None:
    """A directory whose entries changed: mtime and ctime now (libext2fs leaves them)."""
    batch.add("sif", f"<{ino}>", "mtime", "now")
    batch.add("sif", f"<{ino}>", "ctime", "now")


def _enter_parent(batch: _Batch, walk: _Walk, *, uid: int | None, gid: int | None) -> None:
    """Commands that leave the run in the parent of the last component: ``cd`` there, or
    mkdir the missing parents first (0755, the given owner). The directory that gains an
    entry gets a new mtime."""
    last = len(walk.comps) - 1
    if walk.missing is None or walk.missing == last:
        batch.add("cd", f"<{walk.parent.ino}>")
        _touch(batch, walk.parent.ino)
        return
    batch.add("cd", f"<{walk.chain[walk.missing].ino}>")
    _touch(batch, walk.chain[walk.missing].ino)
    for comp in walk.comps[walk.missing : last]:
        batch.add("mkdir", _q(comp))
        _set_owner_mode(batch, _rel(comp), st.S_IFDIR, uid=uid, gid=gid, mode=None, default=DEFAULT_DIR_MODE)
        batch.add("cd", _rel(comp))


def _check_sections(output: _Output, sections: Iterable[int], path: str) -> None:
    for section in sections:
        _raise_if_error(output.get(section), path)


def make_dir(
    image: Path,
    path: str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    mode: int | None = None,
    force: bool = False,
) -> Entry:
    """Create the directory ``path`` (0755 root:root unless given). ``force``: create
    missing parents too (with the given owner, mode 0755) and return an existing
    directory unchanged. Without it a missing parent is NotFound and an existing path
    AlreadyExists."""
    _check_id(uid, "uid")
    _check_id(gid, "gid")
    mode = None if mode is None else parse_mode(mode)
    comps = split_path(path)
    target = _join(comps)
    with _open(image, write=True) as img:
        walk, _, _ = _walk(img, comps)
        if walk.missing is None:
            if force and walk.target.is_dir:
                return walk.target.entry(target)
            raise AlreadyExists(f"{target} already exists.")
        if walk.missing < len(comps) - 1 and not force:
            raise NotFound(f"Parent directory {walk.path(len(comps) - 1)} not found.")
        _require_writable(img)
        batch = _Batch()
        _enter_parent(batch, walk, uid=uid, gid=gid)
        batch.add("mkdir", _q(comps[-1]))
        _set_owner_mode(
            batch, _rel(comps[-1]), st.S_IFDIR, uid=uid, gid=gid, mode=mode, default=DEFAULT_DIR_MODE
        )
        imap, dump = batch.add("imap", _rel(comps[-1])), batch.add("id", _rel(comps[-1]))
        output = img.debugfs(batch, write=True)
        _check_sections(output, range(imap), target)
        return _written_entry(img, output, imap, dump, target)


def _written_entry(img: _Image, output: _Output, imap: int, dump: int, path: str) -> Entry:
    m = _IMAP.search(output.get(imap))
    if m is None:
        raise _error_of(output.get(imap), path) or ToolFailed(f"{path} was not created")
    return _read_inode(int(m.group(1)), output.get(dump), img.inode_size, path).entry(path)


def write_file(
    image: Path,
    path: str,
    data: bytes,
    *,
    uid: int | None = None,
    gid: int | None = None,
    mode: int | None = None,
    force: bool = False,
) -> Entry:
    """Create or replace the file at ``path`` with ``data``.

    A new file is 0644 root:root unless given; a replaced one keeps its owner and mode
    unless given. Replacing writes a staging file beside the old one and swaps the names
    only once every byte is in, so a full volume (NoSpace) leaves the old file as it was
    and no partial file anywhere. A symlink at ``path`` is replaced, never written
    through; a directory is IsADirectory. ``force`` creates missing parents (0755).
    """
    _check_id(uid, "uid")
    _check_id(gid, "gid")
    mode = None if mode is None else parse_mode(mode)
    comps = split_path(path)
    if not comps:
        raise IsADirectory("/ is a directory.")
    target = _join(comps)
    with _open(image, write=True) as img:
        walk, _, _ = _walk(img, comps)
        if walk.missing is not None and walk.missing < len(comps) - 1 and not force:
            raise NotFound(f"Parent directory {walk.path(len(comps) - 1)} not found.")
        old = walk.target if walk.missing is None else None
        if old is not None and old.is_dir:
            raise IsADirectory(f"{target} is a directory.")
        _require_writable(img)
        _check_space(img, len(data), target)
        src = _memfd("volume-write", data)
        try:
            if old is None:
                return _write_new(img, walk, src, data, uid=uid, gid=gid, mode=mode)
            return _replace(img, walk, old, src, data, uid=uid, gid=gid, mode=mode)
        finally:
            os.close(src)


def _write_new(
    img: _Image, walk: _Walk, src: int, data: bytes, *, uid: int | None, gid: int | None, mode: int | None
) -> Entry:
    comps, target = walk.comps, walk.path()
    batch = _Batch()
    _enter_parent(batch, walk, uid=uid, gid=gid)
    write = batch.add("write", f"/proc/self/fd/{src}", _rel(comps[-1]))
    _set_owner_mode(
        batch, _rel(comps[-1]), st.S_IFREG, uid=uid, gid=gid, mode=mode, default=DEFAULT_FILE_MODE
    )
    imap, dump = batch.add("imap", _rel(comps[-1])), batch.add("id", _rel(comps[-1]))
    here = batch.add("imap", '"."')
    output = img.debugfs(batch, write=True, fds=(src,), data_bytes=len(data))
    error = _error_of(output.get(write), target)
    if error is None:
        _check_sections(output, [*range(write), *range(write + 1, imap)], target)
        return _written_entry(img, output, imap, dump, target)
    # A failed write may have linked a partial file: take it out again.
    m, cwd = _IMAP.search(output.get(imap)), _IMAP.search(output.get(here))
    if m and cwd:
        cleanup = _Batch()
        cleanup.add("cd", f"<{cwd.group(1).decode()}>")
        cleanup.add("unlink", _rel(comps[-1]))
        _kill(cleanup, int(m.group(1)))
        img.debugfs(cleanup, write=True)
    raise error


def _replace(
    img: _Image, walk: _Walk, old: _Inode, src: int, data: bytes,
    *, uid: int | None, gid: int | None, mode: int | None,
) -> Entry:  # fmt: skip
    comps, target, parent = walk.comps, walk.path(), walk.parent.ino
    staging = (STAGING_PREFIX + secrets.token_hex(8)).encode()
    xattr_blocks = _xattr_blocks(img, [old], {old.ino: 1})
    batch = _Batch()
    batch.add("cd", f"<{parent}>")
    write = batch.add("write", f"/proc/self/fd/{src}", _rel(staging))
    imap = batch.add("imap", _rel(staging))
    output = img.debugfs(batch, write=True, fds=(src,), data_bytes=len(data))
    m = _IMAP.search(output.get(imap))
    error = _error_of(output.get(write), target)
    if error is not None or m is None:
        if m is not None:
            cleanup = _Batch()
            cleanup.add("cd", f"<{parent}>")
            cleanup.add("unlink", _rel(staging))
            _kill(cleanup, int(m.group(1)))
            img.debugfs(cleanup, write=True)
        raise error or ToolFailed(f"debugfs did not write {target}")
    new = int(m.group(1))
    # Swap: drop the old name and inode, link the new inode under the name (it reuses the
    # freed directory slot, so it cannot run out of space), drop the staging name.
    swap = _Batch(img.block_size)
    swap.add("cd", f"<{parent}>")
    swap.add("unlink", _rel(comps[-1]))
    _release(swap, [old], {old.ino: 1}, [])
    swap.add("ln", f"<{new}>", _rel(comps[-1]))
    swap.add("unlink", _rel(staging))
    if xattr_blocks:
        _free_blocks(swap, xattr_blocks)
    keep_mode = st.S_IMODE(old.mode) if st.S_ISREG(old.mode) else DEFAULT_FILE_MODE
    _set_owner_mode(
        swap, f"<{new}>".encode(), st.S_IFREG,
        uid=old.uid if uid is None else uid, gid=old.gid if gid is None else gid,
        mode=keep_mode if mode is None else mode, default=None,
    )  # fmt: skip
    _touch(swap, parent)
    imap2, dump = swap.add("imap", _rel(comps[-1])), swap.add("id", _rel(comps[-1]))
    output = img.debugfs(swap, write=True)
    _check_sections(output, range(imap2), target)
    m = _IMAP.search(output.get(imap2))
    if m is None or int(m.group(1)) != new:
        raise ToolFailed(f"replacing {target} did not complete")
    return _written_entry(img, output, imap2, dump, target)


def set_metadata(
    image: Path, path: str, *, uid: int | None = None, gid: int | None = None, mode: int | None = None
) -> Entry:
    """chown/chmod ``path`` itself (a symlink is changed, not its target); ctime is now."""
    _check_id(uid, "uid")
    _check_id(gid, "gid")
    mode = None if mode is None else parse_mode(mode)
    comps = split_path(path)
    with _open(image, write=True) as img:
        walk, _, _ = _walk(img, comps)
        if walk.missing is not None:
            raise NotFound(f"Path {walk.path(walk.missing + 1)} not found.")
        _require_writable(img)
        inode = walk.target
        batch = _Batch()
        ref = f"<{inode.ino}>".encode()
        _set_owner_mode(batch, ref, st.S_IFMT(inode.mode), uid=uid, gid=gid, mode=mode, default=None)
        batch.add("sif", ref, "ctime", "now")
        dump = batch.add("id", ref)
        output = img.debugfs(batch, write=True)
        _check_sections(output, range(dump), _join(comps))
        return _read_inode(inode.ino, output.get(dump), img.inode_size, _join(comps)).entry(_join(comps))


def _check_space(img: _Image, size: int, target: str) -> None:
    """NoSpace unless ``size`` bytes fit while leaving the blocks the guest kernel keeps in
    reserve (2 % of the blocks, at most 4096: ext4's reserved clusters for metadata and
    extent conversion). debugfs would use them up; the next mount would then have none."""
    try:
        block = int(img.superblock["Block size"])
        blocks, free = int(img.superblock["Block count"]), int(img.superblock["Free blocks"])
    except (KeyError, ValueError):
        raise Corrupt("The volume's superblock is unreadable.") from None
    reserve = min(blocks // 50, 4096)
    needed = -(-size // block) + 2  # the data, an extent block and a directory block at most
    if free - needed < reserve:
        raise NoSpace(f"Not enough space in the volume for {target}.")


def remove(image: Path, path: str) -> None:
    """Remove the file, symlink or directory (with everything under it) at ``path``.

    The entry is unlinked from its parent, then every inode of the tree is released by
    number (``kill_file``, then any external xattr block): names inside the tree are never
    turned back into commands, so any name the guest made is removable. A file also
    linked from outside the tree keeps its data with its link count lowered. Up to
    MAX_REMOVE_ENTRIES entries (TooManyEntries beyond).
    """
    comps = split_path(path)
    if not comps:
        raise InvalidPath("The root directory of a volume cannot be removed.")
    target = _join(comps)
    with _open(image, write=True) as img:
        walk, _, _ = _walk(img, comps)
        if walk.missing is not None:
            raise NotFound(f"Path {walk.path(walk.missing + 1)} not found.")
        _require_writable(img)
        top, parent = walk.target, walk.parent
        refs: dict[int, int] = {top.ino: 1}
        inodes = {top.ino: top}
        if top.is_dir:
            found = _tree(img, target, top, 1 << 30, MAX_REMOVE_ENTRIES, "remove")
            ancestors = {inode.ino for inode in walk.chain[:-1]}
            if any(ino in ancestors for _, ino, _ in found):
                raise Corrupt(f"{target} links back to a directory above it; the volume is damaged.")
            for _, ino, _ in found:
                refs[ino] = refs.get(ino, 0) + 1
            inodes.update(_inodes(img, sorted(set(refs) - {top.ino})))
        first_ino = int(img.superblock.get("First inode", "11") or 11)
        if any(ino < first_ino for ino in inodes):  # the journal, resize inode... linked by a guest
            raise Corrupt(f"{target} links to one of the filesystem's own inodes; the volume is damaged.")
        xattr_blocks = _xattr_blocks(img, list(inodes.values()), refs)
        batch = _Batch(img.block_size)
        batch.add("cd", f"<{parent.ino}>")
        unlink = batch.add("unlink", _rel(comps[-1]))
        _release(batch, list(inodes.values()), refs, xattr_blocks)
        if top.is_dir and parent.links > 2:
            batch.add("sif", f"<{parent.ino}>", "links_count", parent.links - 1)
        _touch(batch, parent.ino)
        output = img.debugfs(batch, write=True)
        _raise_if_error(output.get(unlink), target)
        for section, text in output.sections.items():
            if section > unlink and _error_of(text, target) is not None:
                raise ToolFailed(f"{target} was unlinked but releasing its data failed: {_first_error(text)}")


def _release(batch: _Batch, inodes: Sequence[_Inode], refs: dict[int, int], xattr_blocks: list[int]) -> None:
    """Drop ``refs[ino]`` links of each inode; free those left with none. kill_file frees
    the blocks and the inode but neither the link count (e2fsck would see a live inode) nor
    an external xattr block: those are freed after, through a scratch file."""
    for inode in inodes:
        left = inode.links - refs[inode.ino]
        if not inode.is_dir and left > 0:
            batch.add("sif", f"<{inode.ino}>", "links_count", left)
        else:
            _kill(batch, inode.ino)
    if xattr_blocks:
        _free_blocks(batch, xattr_blocks)


def _kill(batch: _Batch, ino: int) -> None:
    batch.add("sif", f"<{ino}>", "links_count", 0)
    batch.add("kill_file", f"<{ino}>")


def _free_blocks(batch: _Batch, blocks: list[int]) -> None:
    """Free ``blocks`` with the group and superblock counts kept right: debugfs's freeb
    only clears the bitmap, so map them into an empty scratch file and punch it (run in the
    current directory, which gains and loses the scratch entry)."""
    scratch = _rel((STAGING_PREFIX + secrets.token_hex(8)).encode())
    batch.add("write", "/dev/null", scratch)
    for i, block in enumerate(blocks):
        batch.add("bmap", scratch, i, block)
    batch.add("sif", scratch, "blocks", len(blocks) * batch.block_size // 512)
    batch.add("punch", scratch, 0)
    batch.add("sif", scratch, "links_count", 0)
    batch.add("kill_file", scratch)
    batch.add("unlink", scratch)


_XATTR_MAGIC = 0xEA020000


def _xattr_blocks(img: _Image, inodes: Sequence[_Inode], refs: dict[int, int]) -> list[int]:
    """External xattr blocks the inodes about to be freed hold, checked to be xattr blocks
    nobody else uses (a block shared with a surviving file would need its count lowered,
    which debugfs cannot do: refused)."""
    freed = [i for i in inodes if i.is_dir or i.links <= refs[i.ino]]
    counts: dict[int, int] = {}
    for inode in freed:
        if inode.file_acl:
            counts[inode.file_acl] = counts.get(inode.file_acl, 0) + 1
    if not counts:
        return []
    batch = _Batch()
    sections = {block: batch.add("bd", block) for block in counts}
    output = img.debugfs(batch)
    for block, section in sections.items():
        head = _hexdump(output.get(section), 8)
        magic, refcount = struct.unpack_from("<II", head or bytes(8))
        if magic != _XATTR_MAGIC:
            raise Corrupt(f"Extended attribute block {block} is damaged.")
        if refcount != counts[block]:
            raise Unsupported(
                "A file to remove shares its extended attributes block with files that stay; "
                "remove it from inside a sandbox."
            )
    return sorted(counts)

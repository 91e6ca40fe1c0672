"""Detached volume operations: the files inside a volume's ext4 image, never mounted.

A volume is a sparse raw file holding an ext4 filesystem. While no sandbox holds it, the
API still lists, reads and writes its files. Its bytes were last written by a guest kernel
that tenant code controls, so they are hostile input: a crafted superblock, directory or
extent tree must never reach the host kernel's ext4 driver. Nothing here mounts anything
(no mount, no loop device, no FUSE). Every operation runs e2fsprogs (``debugfs``,
``mkfs.ext4``, ``e2fsck``) as the unprivileged ``watasu-volumes`` user (scripts/setup-host)
inside a bubblewrap sandbox: new user, mount, pid, network, IPC, UTS and cgroup namespaces,
no capabilities, no_new_privs, read-only ``/usr`` and nothing else of the host (no /etc,
/var, /home, no other image), rlimits on CPU time, address space and file size, and a wall
clock timeout. The image enters the sandbox only as an inherited file descriptor, so the
tools user needs no access to the directory that holds it.

debugfs runs in batch mode (``-f``). Its stdout and stderr share one unbuffered pipe, and
each command is preceded by a comment line holding a random per-run nonce, which debugfs
echoes: the output splits into one section per command, and no name inside the image can
forge a section boundary. Paths are resolved one component at a time with lookups that do
not follow symlinks (``cd "./name"`` refuses a symlink), and once resolved, commands address
inodes by number (``<12>``). debugfs keeps going after a failed command, so a change that
depends on an earlier one succeeding is split into a second run, decided by the host.

Names are bytes in the image. Here they are ``str`` decoded with ``surrogateescape`` (lossless
for Python callers); the API shape (``Entry.as_dict``) shows bytes that are not UTF-8 as
``\\xNN``. A path component holding a newline or carriage return cannot be written into a
debugfs command file, so such paths are refused (listings still show those entries).
See docs/volumes.md for the limits, the error codes and the measured costs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import select
import stat as st
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

TOOLS_USER = "watasu-volumes"
DEBUGFS = "/usr/sbin/debugfs"
MKFS = "/usr/sbin/mkfs.ext4"
E2FSCK = "/usr/sbin/e2fsck"
BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"

TOOL_TIMEOUT = 30.0  # wall clock seconds of one tool run...
DATA_SECONDS_PER_MIB = 0.5  # ...plus this per MiB of file data it copies
OPERATION_TIMEOUT = 120.0  # all runs of one operation (a deep listing, removing a tree)
TOOL_CPU_SECONDS = 60
TOOL_ADDRESS_SPACE = 1 << 30
MAX_OUTPUT_BYTES = 64 << 20  # what one run may print before it is killed
MAX_LIST_ENTRIES = 10_000
MAX_REMOVE_ENTRIES = 50_000
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MIN_IMAGE_BYTES = 16 << 20
MAX_LABEL_BYTES = 16
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
ROOT_INO = 2
STAGING_PREFIX = ".watasu-write-"
# Features whose on-disk structures debugfs maintains correctly when it writes. An image
# with any other (quota, project, inline_data, encrypt, casefold, bigalloc, ea_inode,
# verity...) is read but never written: its accounting would silently go wrong.
WRITABLE_FEATURES = frozenset(
    {
        *("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent", "64bit"),
        *("flex_bg", "sparse_super", "sparse_super2", "large_file", "huge_file", "dir_nlink"),
        *("extra_isize", "metadata_csum", "metadata_csum_seed", "uninit_bg", "orphan_file"),
        "orphan_present",
    }
)
_BWRAP_ARGS = (
    "--unshare-all",
    "--unshare-user",
    "--disable-userns",
    "--die-with-parent",
    "--new-session",
    "--clearenv",
    "--setenv", "PATH", "/usr/sbin:/usr/bin",
    "--setenv", "LC_ALL", "C",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
    "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/sbin", "/sbin",
    "--ro-bind-try", "/etc/mke2fs.conf", "/etc/mke2fs.conf",
    "--proc", "/proc",
    "--dev", "/dev",
    "--tmpfs", "/tmp",
    "--chdir", "/tmp",
)  # fmt: skip


# --------------------------------------------------------------------------- errors


class EngineError(Exception):
    """A detached operation failed; ``status`` and ``code`` are the API's."""

    status: ClassVar[int] = 502
    code: ClassVar[str] = "volume_tool_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidPath(EngineError):
    status, code = 422, "invalid_path"


class InvalidMode(EngineError):
    status, code = 422, "invalid_mode"


class InvalidArgument(EngineError):
    status, code = 422, "invalid_argument"


class NotFound(EngineError):
    status, code = 404, "path_not_found"


class AlreadyExists(EngineError):
    status, code = 409, "path_exists"


class NotADirectory(EngineError):
    status, code = 422, "not_a_directory"


class IsADirectory(EngineError):
    status, code = 422, "is_a_directory"


class NotARegularFile(EngineError):
    status, code = 422, "not_a_regular_file"


class NoSpace(EngineError):
    status, code = 507, "not_enough_space"


class TooLarge(EngineError):
    status, code = 413, "file_too_large"


class TooManyEntries(EngineError):
    status, code = 422, "too_many_entries"


class Unsupported(EngineError):
    status, code = 422, "volume_unsupported"


class Corrupt(EngineError):
    status, code = 422, "volume_corrupt"


class ToolFailed(EngineError):
    status, code = 502, "volume_tool_failed"


# --------------------------------------------------------------------------- entries


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


# --------------------------------------------------------------------------- paths and modes


def split_path(path: str) -> list[bytes]:
    """Components of an absolute path inside the volume. ``.`` and one trailing ``/`` are
    dropped; ``..``, empty components (``//``), NUL, newlines and over-long names are
    refused. Nothing is URL-decoded: ``%2e%2e`` is a name like any other."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidPath(f"Path {path!r} must be absolute (start with /).")
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidPath("Path is not valid text.") from None
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidPath(f"Path is longer than {MAX_PATH_BYTES} bytes.")
    if raw == b"/":
        return []
    comps = [p for p in raw.removesuffix(b"/")[1:].split(b"/") if p != b"."]  # "/a/" names "/a"
    for comp in comps:
        if comp == b"":
            raise InvalidPath(f"Path {path!r} has an empty component (//).")
        if comp == b"..":
            raise InvalidPath(f"Path {path!r} must not contain '..'.")
        if any(c in comp for c in (b"\0", b"\n", b"\r")):
            raise InvalidPath("Path components must not contain NUL, newline or carriage return.")
        if len(comp) > MAX_NAME_BYTES:
            raise InvalidPath(f"A path component is longer than {MAX_NAME_BYTES} bytes.")
    return comps


def _join(comps: Sequence[bytes]) -> str:
    return "/" + b"/".join(comps).decode("utf-8", "surrogateescape")


def parse_mode(value: int | str) -> int:
    """Permission bits from 420, "0644", "644" or "0o644". setuid, setgid and sticky
    (up to 0o7777) are accepted: guests mount volumes nosuid, so they only round-trip."""
    if isinstance(value, bool):
        raise InvalidMode('mode must be an integer or an octal string such as "0644".')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (m := re.fullmatch(r"(?:0o)?([0-7]{1,6})", value)):
        number = int(m.group(1), 8)
    else:
        raise InvalidMode(f'mode {value!r} is not an octal permission such as "0644".')
    if not 0 <= number <= 0o7777:
        raise InvalidMode(f"mode {value!r} is outside 0000..7777.")
    return number


def _check_id(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not 0 <= value <= 2**32 - 2):
        raise InvalidArgument(f"{what} must be a whole number from 0 to {2**32 - 2}.")


# --------------------------------------------------------------------------- the sandbox


def tools_ids() -> tuple[int, int] | None:
    """uid/gid the tools run as: ``watasu-volumes`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(TOOLS_USER)
    except KeyError:
        raise ToolFailed(f"the {TOOLS_USER} user does not exist (run scripts/setup-host)") from None
    return entry.pw_uid, entry.pw_gid


def give_to_tools(path: Path) -> None:
    """A detached image belongs to the tools user, readable and writable by it only."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        ids = tools_ids()
        if ids is not None:
            os.fchown(fd, *ids)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _sandbox_prefix(fsize: int | None) -> list[str]:
    ids = tools_ids()
    drop = (
        []
        if ids is None
        else [
            SETPRIV, f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        ]
    )  # fmt: skip
    limits = [PRLIMIT, f"--cpu={TOOL_CPU_SECONDS}", f"--as={TOOL_ADDRESS_SPACE}", "--core=0", "--nofile=64"]
    if fsize is not None:
        limits.append(f"--fsize={fsize}")
    return [*drop, *limits, "--", BWRAP, *_BWRAP_ARGS, "--"]


class _OutputTooLarge(ToolFailed):
    """A run printed more than it may (a listing too long, a hostile extent tree)."""


def run_tool(
    argv: list[str], *, fds: Sequence[int], timeout: float, cap: int, fsize: int | None
) -> tuple[bytes, int]:
    """Run one command in the tools sandbox (e2fsprogs here; tests and the bench also look
    around in it): its stdout and stderr merged in order, and its exit status. ``fds`` are
    inherited at the same numbers; ``fsize`` caps the bytes it may write to any file."""
    try:
        proc = subprocess.Popen(
            [*_sandbox_prefix(fsize), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(fds),
            env={"PATH": "/usr/sbin:/usr/bin", "LC_ALL": "C"},
        )
    except OSError as exc:
        raise ToolFailed(f"cannot start the tools sandbox: {exc}") from None
    try:
        return _collect(proc, timeout, cap, argv[0]), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _collect(proc: subprocess.Popen[bytes], timeout: float, cap: int, tool: str) -> bytes:
    """Read the output until EOF; kill the run past the deadline or past ``cap`` bytes."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolFailed(f"{os.path.basename(tool)} timed out after {timeout:.3g} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > cap:
            raise _OutputTooLarge(f"{os.path.basename(tool)} printed more than {cap} bytes")
        chunks.append(chunk)
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{os.path.basename(tool)} timed out after {timeout:.3g} s") from None
    return b"".join(chunks)


def _memfd(name: str, data: bytes = b"") -> int:
    """An anonymous file holding ``data``: what the sandbox reads from or writes into."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# --------------------------------------------------------------------------- debugfs batches


def _q(name: bytes) -> bytes:
    """A name as one debugfs argument: double quotes, an inner quote doubled."""
    return b'"' + name.replace(b'"', b'""') + b'"'


def _rel(name: bytes) -> bytes:
    """``./name``: a bare ``<12>`` would be read as an inode number, never as a name."""
    return _q(b"./" + name)


class _Batch:
    """A debugfs command file whose output splits back into one section per command."""

    def __init__(self, block_size: int = 0) -> None:
        self.block_size = block_size  # for commands that count blocks
        self.nonce = secrets.token_hex(16).encode()
        self.lines: list[bytes] = []

    def add(self, *words: bytes | str | int) -> int:
        index = len(self.lines)
        parts = [w if isinstance(w, bytes) else str(w).encode() for w in words]
        self.lines.append(b"# %s %d\n%s\n" % (self.nonce, index, b" ".join(parts)))
        return index

    def script(self) -> bytes:
        return b"".join(self.lines)


@dataclass
class _Output:
    preamble: bytes
    sections: dict[int, bytes]
    returncode: int

    def get(self, index: int) -> bytes:
        """What a command printed; a command the run never reached is a failed run."""
        if index not in self.sections:
            how = f"signal {-self.returncode}" if self.returncode < 0 else f"status {self.returncode}"
            raise ToolFailed(f"debugfs stopped early ({how}): {_first_error(self.tail())}")
        return self.sections[index]

    def tail(self) -> bytes:
        return self.sections[max(self.sections)] if self.sections else self.preamble


def _split_output(batch: _Batch, out: bytes, returncode: int) -> _Output:
    marker = re.compile(rb"# " + batch.nonce + rb" (\d+)\n")
    pieces = marker.split(out)
    sections: dict[int, bytes] = {}
    for i in range(1, len(pieces) - 1, 2):
        body = pieces[i + 1]
        if body.startswith(b"debugfs: "):
            body = body.split(b"\n", 1)[1] if b"\n" in body else b""
        sections[int(pieces[i])] = body
    return _Output(pieces[0], sections, returncode)


class _Image:
    """An open image: its descriptor is what the sandbox inherits."""

    def __init__(self, path: Path, *, write: bool) -> None:
        self.path = Path(path)
        self.write = write
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise ToolFailed("the volume's image is missing") from None
        except OSError as exc:
            raise ToolFailed(f"cannot open the volume's image: {exc.strerror}") from None
        info = os.fstat(self.fd)
        if not st.S_ISREG(info.st_mode):
            os.close(self.fd)
            raise ToolFailed("the volume's image is not a regular file")
        self.size = info.st_size
        self.deadline = time.monotonic() + OPERATION_TIMEOUT
        self.inode_size = 0
        self.block_size = 0
        self.features: frozenset[str] = frozenset()
        self.superblock: dict[str, str] = {}

    def close(self) -> None:
        os.close(self.fd)

    def debugfs(
        self,
        batch: _Batch,
        *,
        write: bool = False,
        fds: Sequence[int] = (),
        fsize: int | None = 0,
        data_bytes: int = 0,
        cap: int = MAX_OUTPUT_BYTES,
    ) -> _Output:
        """Run the batch (``write``: with ``-w``) and split its output per command."""
        if write and not self.write:
            raise AssertionError("a write batch on an image opened read-only")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ToolFailed(f"the operation timed out after {OPERATION_TIMEOUT:.0f} s")
        timeout = min(remaining, TOOL_TIMEOUT + DATA_SECONDS_PER_MIB * data_bytes / (1 << 20))
        script = _memfd("debugfs-script", batch.script())
        try:
            argv = [DEBUGFS, *(["-w"] if write else []), "-f", f"/proc/self/fd/{script}"]
            argv.append(f"/proc/self/fd/{self.fd}")
            # A write may not grow the image: a hostile superblock can claim more blocks
            # than the file has, and writes past its end would allocate host disk.
            limit = self.size if write else fsize
            out, rc = run_tool(argv, fds=(self.fd, script, *fds), timeout=timeout, cap=cap, fsize=limit)
        finally:
            os.close(script)
        output = _split_output(batch, out, rc)
        _check_opened(output)
        return output


@contextlib.contextmanager
def _open(path: Path, *, write: bool) -> Iterator[_Image]:
    image = _Image(path, write=write)
    try:
        yield image
    finally:
        image.close()


def _check_opened(output: _Output) -> None:
    """debugfs says why it could not open the filesystem, then runs every command anyway,
    each printing "Filesystem not open" (the first command's output is ours, never a name)."""
    first = output.sections[min(output.sections)].split(b"\n", 1)[0] if output.sections else b""
    if b"Filesystem not open" not in first and b"while trying to open" not in output.preamble:
        if output.sections:
            return
        raise ToolFailed(f"debugfs did not run: {_first_error(output.preamble) or 'no output'}")
    reason = _first_error(output.preamble) or "the filesystem could not be opened"
    if "Permission denied" in reason:
        raise ToolFailed(f"the tools user cannot open the image ({reason}); is it still attached?")
    raise Corrupt(f"The volume's filesystem is unreadable: {reason}.")


def _first_error(text: bytes) -> str:
    for line in text.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if (
            line
            and not line.startswith(("debugfs 1.", "e2fsck 1.", "mke2fs 1.", "Allocated inode: "))
            and not line.isdigit()
        ):
            return _clean(line.removeprefix("debugfs: "))
    return ""


def _clean(text: str, limit: int = 300) -> str:
    """A tool's message for the API: printable, short, the image named as such."""
    text = re.sub(r"/proc/self/fd/\d+", "the image", text)
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


# --------------------------------------------------------------------------- parsing


_HEX_LINE = re.compile(rb"^([0-7]{4,})  ((?:[0-9a-f]{4} ?){1,8})")
_IMAP = re.compile(rb"Inode (\d+) is part of block group")
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
    for line in text.decode("utf-8", "replace").splitlines():
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


# --------------------------------------------------------------------------- resolving paths


@dataclass
class _Walk:
    """Where each component of a path resolved: ``chain[0]`` is the root, ``chain[i]`` the
    inode of ``comps[i-1]``. ``missing`` is the index of the first component that does not
    exist (None if the whole path exists)."""

    comps: list[bytes]
    chain: list[_Inode]
    missing: int | None

    @property
    def target(self) -> _Inode:
        assert self.missing is None
        return self.chain[-1]

    @property
    def parent(self) -> _Inode:
        return self.chain[len(self.comps) - 1]

    def path(self, upto: int | None = None) -> str:
        return _join(self.comps[: len(self.comps) if upto is None else upto])


@dataclass
class _WalkPlan:
    stats: int
    root: int
    steps: list[tuple[int, int, int]]  # per component: (imap, inode_dump, cd) sections


def _plan_walk(batch: _Batch, comps: Sequence[bytes]) -> _WalkPlan:
    """Commands that look up every component in turn (``imap`` for its number, ``id`` for
    its inode) and ``cd`` into each but the last: the run ends in the last one's parent."""
    stats = batch.add("stats", "-h")
    batch.add("cd", f"<{ROOT_INO}>")
    root = batch.add("id", f"<{ROOT_INO}>")
    steps = []
    for i, comp in enumerate(comps):
        imap = batch.add("imap", _rel(comp))
        dump = batch.add("id", _rel(comp))
        cd = batch.add("cd", _rel(comp)) if i < len(comps) - 1 else -1
        steps.append((imap, dump, cd))
    return _WalkPlan(stats, root, steps)


def _read_super(image: _Image, output: _Output, plan: _WalkPlan) -> None:
    fields = _superblock(output.get(plan.stats))
    image.superblock = fields
    try:
        image.inode_size = int(fields["Inode size"])
        image.block_size = int(fields["Block size"])
    except (KeyError, ValueError):
        raise Corrupt(
            f"The volume's superblock is unreadable: {_first_error(output.get(plan.stats))}"
        ) from None
    image.features = frozenset(fields.get("Filesystem features", "").split())


def _finish_walk(image: _Image, output: _Output, plan: _WalkPlan, comps: list[bytes]) -> _Walk:
    _read_super(image, output, plan)
    root = _read_inode(ROOT_INO, output.get(plan.root), image.inode_size, "/")
    if not root.is_dir:
        raise Corrupt("The volume's root directory is damaged.")
    chain = [root]
    for i, (imap, dump, cd) in enumerate(plan.steps):
        here = _join(comps[: i + 1])
        text = output.get(imap)
        m = _IMAP.search(text)
        if m is None:
            error = _error_of(text, here) or Corrupt(f"Cannot look up {here}.")
            if isinstance(error, NotFound):
                return _Walk(comps, chain, i)
            raise error
        inode = _read_inode(int(m.group(1)), output.get(dump), image.inode_size, here)
        chain.append(inode)
        if cd >= 0:
            if not inode.is_dir:
                raise NotADirectory(f"{here} is not a directory.")
            _raise_if_error(output.get(cd), here)
    return _Walk(comps, chain, None)


def _walk(
    image: _Image,
    comps: list[bytes],
    then: tuple[bytes | str, ...] | None = None,
    *,
    fds: Sequence[int] = (),
    fsize: int = 0,
    data_bytes: int = 0,
) -> tuple[_Walk, _Output, int]:
    """Resolve ``comps`` in one read-only run, plus ``then``: one more command run in the
    last component's parent (its section is returned; read it only if the walk says the
    path is what that command expected). A journal that needs replaying is replayed
    first, as the guest kernel would on its next mount."""
    for attempt in range(2):
        batch = _Batch()
        plan = _plan_walk(batch, comps)
        section = batch.add(*then) if then else -1
        output = image.debugfs(batch, fds=fds, fsize=fsize, data_bytes=data_bytes)
        _read_super(image, output, plan)
        if "needs_recovery" in image.features and attempt == 0:
            _replay_journal(image)
            for fd in fds:
                os.ftruncate(fd, 0)
            continue
        return _finish_walk(image, output, plan, comps), output, section
    raise AssertionError("unreachable")


def _replay_journal(image: _Image) -> None:
    """A guest that died with the volume mounted leaves a journal to replay, as the kernel
    would on its next mount: without it, reads see stale data and writes would be undone."""
    # Reads replay too; the caller holds the volume's lock for any detached operation.
    fd = image.fd if image.write else os.open(image.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        out, _ = run_tool(
            [E2FSCK, "-E", "journal_only", "-y", f"/proc/self/fd/{fd}"],
            fds=(fd,), timeout=TOOL_TIMEOUT, cap=1 << 20, fsize=image.size,
        )  # fmt: skip
    finally:
        if fd != image.fd:
            os.close(fd)
    if b"Bad magic" in out or b"Superblock invalid" in out:
        raise Corrupt(f"The volume's filesystem is unreadable: {_first_error(out)}.")


def _require_writable(image: _Image) -> None:
    unknown = sorted(image.features - WRITABLE_FEATURES)
    if unknown:
        raise Unsupported(
            f"The volume's filesystem uses features detached writes do not maintain ({', '.join(unknown)}); "
            "change it from inside a sandbox."
        )


# --------------------------------------------------------------------------- reads


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
        raise NotARegularFile(f"{_join(walk.comps)} is a {inode.kind}, not a regular file.")
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


# --------------------------------------------------------------------------- writes


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

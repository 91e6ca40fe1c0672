"""debugfs batch files: commands framed by a per-run nonce, run against an open image, and
their output split back into one section per command; the tool's error lines cleaned up."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat as st
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .constants import DATA_SECONDS_PER_MIB, DEBUGFS, MAX_OUTPUT_BYTES, OPERATION_TIMEOUT, TOOL_TIMEOUT
from .errors import Corrupt, ToolFailed
from .sandbox import _memfd, run_tool


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
    for line in text.decode("utf-8", "replace").split("\n"):
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

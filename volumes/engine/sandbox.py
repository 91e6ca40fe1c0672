"""Running a tool in the sandbox: setpriv drops to the tools user, prlimit sets the rlimits,
bubblewrap isolates it; its merged output is collected under a deadline and a size cap.
Also the memfds that carry data in and out."""

from __future__ import annotations

import os
import pwd
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .constants import BWRAP, PRLIMIT, SETPRIV, TOOL_ADDRESS_SPACE, TOOL_CPU_SECONDS, TOOLS_USER
from .errors import ToolFailed

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

"""Resolving a path one component at a time in one debugfs run (symlinks never followed),
replaying a journal left by a guest that died, and refusing writes to images whose
features debugfs does not maintain."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import E2FSCK, ROOT_INO, TOOL_TIMEOUT, WRITABLE_FEATURES
from .debugfs import _Batch, _first_error, _Image, _Output, _rel
from .entries import _Inode
from .errors import Corrupt, NotADirectory, NotFound, Unsupported
from .parsing import _IMAP, _error_of, _raise_if_error, _read_inode, _superblock
from .paths import _join
from .sandbox import run_tool


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

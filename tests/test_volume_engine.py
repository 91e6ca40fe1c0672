"""The detached volume engine against real images: e2fsprogs in the bubblewrap sandbox.

No database and no VM: every test builds its own small image (``create_image`` or
``mkfs.ext4 -d`` from a directory we write, which is our own input) and checks the
filesystem with ``e2fsck -fn`` (run in the same sandbox) after every change.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from pathlib import Path

import pytest

from volumes import engine
from volumes.engine import (
    DEBUGFS,
    E2FSCK,
    AlreadyExists,
    Corrupt,
    EngineError,
    Entry,
    InvalidMode,
    InvalidPath,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotARegularFile,
    NotFound,
    TooLarge,
    ToolFailed,
    TooManyEntries,
    Unsupported,
)

MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------


def sandboxed(argv: list[str], image: Path | None = None, *, write: bool = False) -> tuple[str, int]:
    """Run a command in the engine's sandbox, the image (if any) as fd ``{fd}`` in argv."""
    fds: tuple[int, ...] = ()
    fd = -1
    if image is not None:
        fd = os.open(image, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        fds = (fd,)
    try:
        argv = [a.replace("{fd}", str(fd)) for a in argv]
        out, rc = engine.run_tool(argv, fds=fds, timeout=60, cap=16 * MiB, fsize=None)
    finally:
        if fd >= 0:
            os.close(fd)
    return out.decode("utf-8", "replace"), rc


def fsck(image: Path) -> str:
    """``e2fsck -fn`` in the sandbox; the output if it found anything."""
    out, rc = sandboxed([E2FSCK, "-fn", "/proc/self/fd/{fd}"], image)
    return "" if rc == 0 else out


def debugfs(image: Path, *commands: str) -> str:
    """Set up a case with raw debugfs commands (run in the sandbox, with -w)."""
    script = "".join(c + "\n" for c in commands)
    pipeline = f'printf "%s" "$1" | {DEBUGFS} -w -f - /proc/self/fd/{{fd}}'
    out, _ = sandboxed(["/bin/sh", "-c", pipeline, "debugfs", script], image, write=True)
    return out


def from_tree(tmp_path: Path, build, size: int = 64 * MiB, extra: tuple[str, ...] = ()) -> Path:
    """An image populated by ``mkfs.ext4 -d`` from a directory ``build(root)`` fills."""
    root = tmp_path / "tree"
    root.mkdir()
    build(root)
    image = tmp_path / "volume.img"
    subprocess.run(["truncate", "-s", str(size), str(image)], check=True, timeout=30)
    subprocess.run(["mkfs.ext4", "-q", "-F", *extra, "-d", str(root), str(image)], check=True, timeout=120)
    engine.give_to_tools(image)
    return image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "volume.img"
    engine.create_image(path, 64 * MiB, label="test")
    return path


# --- create_image / give_to_tools / usage --------------------------------------------------


def test_create_image_is_sparse_owned_by_the_tools_user_and_mounts_nothing(tmp_path: Path) -> None:
    # given the host's mount table
    before = Path("/proc/self/mountinfo").read_text()
    path = tmp_path / "big.img"

    # when a 10 GiB volume is made
    started = time.monotonic()
    engine.create_image(path, 10 << 30, label="data")
    elapsed = time.monotonic() - started

    # then it is a sparse file of the full size, 0600 watasu-volumes, with nothing mounted
    info = path.stat()
    tools = pwd.getpwnam(engine.TOOLS_USER)
    assert Path("/proc/self/mountinfo").read_text() == before
    assert info.st_size == 10 << 30
    assert info.st_blocks * 512 < 16 * MiB
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (tools.pw_uid, tools.pw_gid, 0o600)
    assert elapsed < 10
    assert [p.name for p in tmp_path.iterdir()] == ["big.img"]  # no temp file left
    # every inode table is marked initialised: the guest kernel runs no lazy init
    out, rc = sandboxed(["/usr/sbin/dumpe2fs", "/proc/self/fd/{fd}"], path)
    assert rc == 0
    groups = [line for line in out.splitlines() if re.match(r"Group \d+:", line)]
    assert len(groups) == 80
    assert all("ITABLE_ZEROED" in line for line in groups)
    assert "Reserved block count:     0" in out
    assert "Filesystem volume name:   data" in out
    assert fsck(path) == ""


def test_create_image_root_is_root_owned_0755_and_empty(image: Path) -> None:
    root = engine.stat(image, "/")

    assert (root.type, root.mode, root.uid, root.gid) == ("directory", 0o755, 0, 0)
    assert [e.name for e in engine.list_dir(image, "/")] == ["lost+found"]


def test_create_image_refuses_tiny_sizes_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    with pytest.raises(engine.InvalidArgument):
        engine.create_image(path, 1 * MiB)
    assert not path.exists()

    engine.create_image(path, 32 * MiB)
    engine.write_file(path, "/x", b"1")
    engine.create_image(path, 32 * MiB)  # a rebuild replaces the whole image

    assert [e.name for e in engine.list_dir(path, "/")] == ["lost+found"]


def test_give_to_tools_chowns_and_chmods(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    path.write_bytes(b"")
    os.chown(path, 0, 0)
    path.chmod(0o644)

    engine.give_to_tools(path)

    tools = pwd.getpwnam(engine.TOOLS_USER)
    info = path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (tools.pw_uid, tools.pw_gid, 0o600)


def test_usage_counts_file_data_and_host_allocation(image: Path) -> None:
    used_before, allocated_before = engine.usage(image)

    engine.write_file(image, "/blob", os.urandom(3 * MiB))
    used_after, allocated_after = engine.usage(image)

    assert 0 <= used_before < 1 * MiB
    assert 3 * MiB <= used_after - used_before < 3 * MiB + 256 * 1024
    assert allocated_after - allocated_before >= 3 * MiB
    assert allocated_after == image.stat().st_blocks * 512


# --- paths and modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "",
        "relative",
        "/a/../b",
        "/..",
        "/a//b",
        "//",
        "/a\0b",
        "/a\nb",
        "/a\rb",
        "/" + "x" * 256,
        "/a/" * 1400,
    ],
)
def test_bad_paths_are_invalid_path(image: Path, path: str) -> None:
    with pytest.raises(InvalidPath) as exc:
        engine.stat(image, path)

    assert (exc.value.status, exc.value.code) == (422, "invalid_path")


def test_paths_normalise_dot_and_trailing_slash_and_never_url_decode(image: Path) -> None:
    engine.make_dir(image, "/a")

    assert engine.stat(image, "/a/").path == "/a"
    assert engine.stat(image, "/./a/.").path == "/a"
    entry = engine.write_file(image, "/a/%2e%2e", b"literal")
    assert entry.path == "/a/%2e%2e"
    assert engine.read_file(image, "/a/%2e%2e", max_bytes=100) == b"literal"
    with pytest.raises(NotFound):
        engine.stat(image, "/%2e%2e")


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("0644", 0o644),
        ("644", 0o644),
        ("0o644", 0o644),
        (420, 0o644),
        ("4755", 0o4755),
        (0, 0),
        ("7777", 0o7777),
    ],
)
def test_parse_mode_accepts_octal_forms(value: int | str, mode: int) -> None:
    assert engine.parse_mode(value) == mode


@pytest.mark.parametrize(
    "value", ["", "0x1a4", "rw-r--r--", "0o", "8", "10000", " 644", -1, 0o10000, True, None]
)
def test_parse_mode_refuses_the_rest(value: object) -> None:
    with pytest.raises(InvalidMode) as exc:
        engine.parse_mode(value)  # type: ignore[arg-type]

    assert (exc.value.status, exc.value.code) == (422, "invalid_mode")


def test_entry_as_dict_is_the_wire_shape() -> None:
    entry = Entry("/w/bad\udcff", "bad\udcff", "file", 3, 0o644, 1000, 1000, "a", "m", "c")

    assert entry.as_dict() == {
        "path": "/w/bad\\xff",
        "name": "bad\\xff",
        "type": "file",
        "size": 3,
        "mode": "0644",
        "uid": 1000,
        "gid": 1000,
        "atime": "a",
        "mtime": "m",
        "ctime": "c",
    }


# --- files -------------------------------------------------------------------------------------


def test_write_then_read_and_stat(image: Path) -> None:
    before = time.time()

    entry = engine.write_file(image, "/hello.txt", b"hello world")

    assert (entry.path, entry.name, entry.type, entry.size) == ("/hello.txt", "hello.txt", "file", 11)
    assert (entry.mode, entry.uid, entry.gid) == (0o644, 0, 0)
    assert entry.mtime.endswith("Z") and entry.mtime >= time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(before - 1)
    )
    assert engine.read_file(image, "/hello.txt", max_bytes=100) == b"hello world"
    assert engine.stat(image, "/hello.txt") == entry
    assert fsck(image) == ""


def test_write_with_owner_and_mode_then_overwrite_keeps_them(image: Path) -> None:
    engine.write_file(image, "/f", b"one", uid=1000, gid=1001, mode="0600")

    entry = engine.write_file(image, "/f", b"second version")

    assert (entry.size, entry.mode, entry.uid, entry.gid) == (14, 0o600, 1000, 1001)
    assert engine.read_file(image, "/f", max_bytes=100) == b"second version"
    entry = engine.write_file(image, "/f", b"3", mode=0o640, uid=70000)
    assert (entry.mode, entry.uid, entry.gid) == (0o640, 70000, 1001)
    assert [e.name for e in engine.list_dir(image, "/")] == ["f", "lost+found"]  # no staging file left
    assert fsck(image) == ""


def test_write_binary_empty_and_sparse_content_round_trips(image: Path) -> None:
    payload = os.urandom(100_000) + bytes(200_000) + b"tail"

    engine.write_file(image, "/bin", payload)
    engine.write_file(image, "/empty", b"")

    assert engine.read_file(image, "/bin", max_bytes=1 * MiB) == payload
    assert engine.read_file(image, "/empty", max_bytes=0) == b""
    assert fsck(image) == ""


def test_write_missing_parent_needs_force(image: Path) -> None:
    with pytest.raises(NotFound) as exc:
        engine.write_file(image, "/a/b/c.txt", b"x")
    assert (exc.value.status, exc.value.code) == (404, "path_not_found")
    assert "/a/b" in exc.value.message

    entry = engine.write_file(image, "/a/b/c.txt", b"x", force=True, uid=1000, gid=1000)

    assert entry.path == "/a/b/c.txt"
    parents = [engine.stat(image, p) for p in ("/a", "/a/b")]
    assert [(p.type, p.mode, p.uid, p.gid) for p in parents] == [("directory", 0o755, 1000, 1000)] * 2
    assert fsck(image) == ""


def test_write_over_a_directory_or_through_a_file_is_refused(image: Path) -> None:
    engine.make_dir(image, "/d")
    engine.write_file(image, "/f", b"x")

    with pytest.raises(IsADirectory) as exc:
        engine.write_file(image, "/d", b"x")
    assert (exc.value.status, exc.value.code) == (422, "is_a_directory")
    with pytest.raises(IsADirectory):
        engine.write_file(image, "/", b"x")
    with pytest.raises(NotADirectory) as exc2:
        engine.write_file(image, "/f/g", b"x", force=True)
    assert (exc2.value.status, exc2.value.code) == (422, "not_a_directory")
    assert fsck(image) == ""


def test_read_errors(image: Path) -> None:
    engine.write_file(image, "/f", b"0123456789")
    engine.make_dir(image, "/d")

    with pytest.raises(TooLarge) as exc:
        engine.read_file(image, "/f", max_bytes=9)
    assert (exc.value.status, exc.value.code) == (413, "file_too_large")
    assert "9 bytes" in exc.value.message
    assert engine.read_file(image, "/f", max_bytes=10) == b"0123456789"
    with pytest.raises(IsADirectory):
        engine.read_file(image, "/d", max_bytes=10)
    with pytest.raises(NotFound) as missing:
        engine.read_file(image, "/nope", max_bytes=10)
    assert "/nope" in missing.value.message


def test_read_of_a_huge_sparse_file_stops_at_the_limit(tmp_path: Path) -> None:
    # given a file claiming 2 GiB (all holes) on a 64 MiB image
    image = tmp_path / "v.img"
    engine.create_image(image, 64 * MiB)
    engine.write_file(image, "/sparse", b"x")
    debugfs(image, "sif /sparse size 2147483648")

    started = time.monotonic()
    with pytest.raises(TooLarge):
        engine.read_file(image, "/sparse", max_bytes=1 * MiB)

    assert time.monotonic() - started < 10


def test_names_with_spaces_quotes_unicode_and_inode_lookalikes(image: Path) -> None:
    names = [
        "a b",
        'q"uote',
        "uni\u00e9\u4e2d",
        "<12>",
        "-dash",
        "tab\tx",
        "#hash",
        "!bang",
        "Inode 12 is part of block group",  # what debugfs's imap prints, as a name
        *[f"sep{c}x" for c in "\v\f\x1c\x1d\x1e\x85\u2028\u2029"],  # line breaks to str.splitlines
    ]

    for name in names:
        engine.write_file(image, f"/{name}", name.encode())

    listed = {e.name for e in engine.list_dir(image, "/")}
    assert listed == {*names, "lost+found"}
    for name in names:
        assert engine.read_file(image, f"/{name}", max_bytes=100) == name.encode()
    engine.remove(image, "/<12>")
    assert engine.read_file(image, "/-dash", max_bytes=100) == b"-dash"  # not inode 12
    assert fsck(image) == ""


def test_names_that_are_not_utf8_or_hold_newlines_are_listed(tmp_path: Path) -> None:
    def build(root: Path) -> None:
        (root / "w").mkdir()
        (root / "w" / os.fsdecode(b"bad\xff")).write_bytes(b"1")
        (root / "w" / "nl\nname").write_bytes(b"22")

    image = from_tree(tmp_path, build)

    entries = engine.list_dir(image, "/w")

    assert [(e.name, e.size) for e in entries] == [("bad\udcff", 1), ("nl\nname", 2)]
    assert [e.as_dict()["name"] for e in entries] == ["bad\\xff", "nl\nname"]
    assert engine.read_file(image, "/w/bad\udcff", max_bytes=10) == b"1"
    with pytest.raises(InvalidPath):
        engine.read_file(image, "/w/nl\nname", max_bytes=10)


# --- directories -------------------------------------------------------------------------------


def test_make_dir_and_its_errors(image: Path) -> None:
    entry = engine.make_dir(image, "/d", uid=1000, gid=1000, mode="0750")

    assert (entry.path, entry.type, entry.mode, entry.uid, entry.gid) == (
        "/d",
        "directory",
        0o750,
        1000,
        1000,
    )
    with pytest.raises(AlreadyExists) as exc:
        engine.make_dir(image, "/d")
    assert (exc.value.status, exc.value.code) == (409, "path_exists")
    with pytest.raises(NotFound):
        engine.make_dir(image, "/x/y")
    assert engine.make_dir(image, "/d", force=True) == entry  # exists: unchanged
    deep = engine.make_dir(image, "/x/y/z", force=True, mode=0o700)
    assert (deep.path, deep.mode) == ("/x/y/z", 0o700)
    assert engine.stat(image, "/x/y").mode == 0o755
    engine.write_file(image, "/file", b"")
    with pytest.raises(AlreadyExists):
        engine.make_dir(image, "/file", force=True)
    with pytest.raises(NotADirectory):
        engine.make_dir(image, "/file/sub", force=True)
    assert fsck(image) == ""


def test_list_dir_by_depth_in_path_order(image: Path) -> None:
    engine.write_file(image, "/w/b/deep/leaf", b"1", force=True)
    engine.write_file(image, "/w/a.txt", b"22")

    one = [e.path for e in engine.list_dir(image, "/w")]
    two = [e.path for e in engine.list_dir(image, "/w", depth=2)]
    three = engine.list_dir(image, "/w", depth=5)

    assert one == ["/w/a.txt", "/w/b"]
    assert engine.list_dir(image, "/w")[0] == engine.stat(image, "/w/a.txt")  # both parsers agree
    assert two == ["/w/a.txt", "/w/b", "/w/b/deep"]
    assert [(e.path, e.type, e.size) for e in three if e.type == "file"] == [
        ("/w/a.txt", "file", 2),
        ("/w/b/deep/leaf", "file", 1),
    ]
    with pytest.raises(NotADirectory):
        engine.list_dir(image, "/w/a.txt")
    with pytest.raises(NotFound):
        engine.list_dir(image, "/nope")
    with pytest.raises(engine.InvalidArgument):
        engine.list_dir(image, "/w", depth=0)


def test_a_huge_directory_is_refused_cleanly_and_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a directory with more entries than a listing may return (the limit lowered so
    # that mkfs -d, which fills a directory in quadratic time, stays quick)
    monkeypatch.setattr("volumes.engine.reads.MAX_LIST_ENTRIES", 1000)  # where list_dir reads it

    def build(root: Path) -> None:
        (root / "huge").mkdir()
        for i in range(3000):
            (root / "huge" / f"file-{i:06d}").touch()
        (root / "small").mkdir()

    image = from_tree(tmp_path, build)

    started = time.monotonic()
    with pytest.raises(TooManyEntries) as exc:
        engine.list_dir(image, "/huge")
    elapsed = time.monotonic() - started

    assert (exc.value.status, exc.value.code) == (422, "too_many_entries")
    assert "1000" in exc.value.message
    assert elapsed < 5
    with pytest.raises(TooManyEntries):
        engine.list_dir(image, "/", depth=2)
    assert engine.stat(image, "/huge/file-002424").size == 0  # a lookup in it stays cheap
    engine.remove(image, "/huge")
    assert [e.name for e in engine.list_dir(image, "/")] == ["lost+found", "small"]
    assert fsck(image) == ""


# --- metadata and removal ----------------------------------------------------------------------


def test_set_metadata(image: Path) -> None:
    engine.write_file(image, "/f", b"x")

    entry = engine.set_metadata(image, "/f", uid=1000, gid=2000, mode="0755")

    assert (entry.mode, entry.uid, entry.gid, entry.type) == (0o755, 1000, 2000, "file")
    assert engine.set_metadata(image, "/f", mode=0o4711).mode == 0o4711
    assert engine.set_metadata(image, "/f", uid=2**32 - 2).uid == 2**32 - 2
    assert engine.list_dir(image, "/")[0] == engine.stat(image, "/f")
    assert engine.set_metadata(image, "/", mode="0777").mode == 0o777
    with pytest.raises(NotFound):
        engine.set_metadata(image, "/nope", mode=0o644)
    with pytest.raises(InvalidMode):
        engine.set_metadata(image, "/f", mode="rwx")
    assert engine.stat(image, "/f").type == "file"
    assert fsck(image) == ""


def test_remove_file_symlink_and_tree(image: Path) -> None:
    engine.write_file(image, "/f", b"x")
    engine.write_file(image, "/t/a/b/c", os.urandom(200_000), force=True)
    engine.write_file(image, "/t/a/x", b"y")
    engine.make_dir(image, "/t/empty")
    debugfs(image, "symlink /t/link /etc")
    used = engine.usage(image)[0]

    engine.remove(image, "/f")
    engine.remove(image, "/t/link")
    assert fsck(image) == ""
    engine.remove(image, "/t")

    assert [e.name for e in engine.list_dir(image, "/")] == ["lost+found"]
    assert engine.usage(image)[0] < used - 190_000
    assert engine.stat(image, "/").mtime >= engine.stat(image, "/lost+found").mtime
    assert fsck(image) == ""


def test_remove_errors(image: Path) -> None:
    with pytest.raises(InvalidPath):
        engine.remove(image, "/")
    with pytest.raises(NotFound) as exc:
        engine.remove(image, "/nope")
    assert "/nope" in exc.value.message


def test_remove_keeps_hard_links_from_outside_the_tree(tmp_path: Path) -> None:
    def build(root: Path) -> None:
        (root / "t").mkdir()
        (root / "t" / "a").write_bytes(b"shared")
        os.link(root / "t" / "a", root / "outside")
        os.link(root / "t" / "a", root / "t" / "again")

    image = from_tree(tmp_path, build)

    engine.remove(image, "/t")

    assert engine.read_file(image, "/outside", max_bytes=10) == b"shared"
    assert fsck(image) == ""
    engine.write_file(image, "/outside", b"new")
    assert fsck(image) == ""


def test_remove_frees_extended_attribute_blocks(image: Path) -> None:
    # given files whose xattrs do not fit in the inode (an external xattr block each)
    value = "v" * 700
    engine.write_file(image, "/t/a", b"1", force=True)
    engine.write_file(image, "/t/b", b"2")
    engine.write_file(image, "/c", b"3")
    debugfs(
        image, f"ea_set /t/a user.big {value}", f"ea_set /t/b user.big {value}", f"ea_set /c user.big {value}"
    )
    assert fsck(image) == ""

    engine.remove(image, "/t")
    engine.write_file(image, "/c", b"replaced")

    assert fsck(image) == ""


def test_a_bogus_extended_attribute_block_stops_a_removal(image: Path) -> None:
    # given a file whose xattr block number points at another file's data
    engine.write_file(image, "/data", b"d" * 5000)
    block = int(debugfs(image, "bmap /data 0").split()[-1])
    engine.write_file(image, "/victim", b"v")
    debugfs(image, f"sif /victim file_acl {block}")

    with pytest.raises(Corrupt):
        engine.remove(image, "/victim")

    assert engine.read_file(image, "/data", max_bytes=10_000) == b"d" * 5000


# --- full volumes and hostile images ------------------------------------------------------------


def test_no_space_leaves_no_partial_file_and_a_clean_filesystem(tmp_path: Path) -> None:
    image = tmp_path / "tiny.img"
    engine.create_image(image, 16 * MiB)
    engine.write_file(image, "/keep", b"original")

    with pytest.raises(NoSpace) as exc:
        engine.write_file(image, "/big", os.urandom(20 * MiB))
    assert (exc.value.status, exc.value.code) == (507, "not_enough_space")
    with pytest.raises(NoSpace):
        engine.write_file(image, "/keep", os.urandom(20 * MiB))

    assert [e.name for e in engine.list_dir(image, "/")] == ["keep", "lost+found"]
    assert engine.read_file(image, "/keep", max_bytes=100) == b"original"
    assert fsck(image) == ""
    engine.write_file(image, "/after", b"still works")
    assert fsck(image) == ""


def test_writes_leave_the_kernels_reserve_free(tmp_path: Path) -> None:
    # given a 16 MiB volume, 2 % of its blocks kept for the guest kernel
    image = tmp_path / "tiny.img"
    engine.create_image(image, 16 * MiB)
    stats = debugfs(image, "stats -h")
    block, blocks, free = (
        int(re.search(rf"{field}:\s+(\d+)", stats)[1])  # type: ignore[index]
        for field in ("Block size", "Block count", "Free blocks")
    )
    reserve = min(blocks // 50, 4096)

    # then a write that would leave less than the reserve is refused, one that leaves it is not
    with pytest.raises(NoSpace):
        engine.write_file(image, "/over", b"x" * (free - reserve) * block)
    engine.write_file(image, "/fits", b"x" * (free - reserve - 40) * block)
    assert fsck(image) == ""


def test_removing_a_link_to_a_reserved_inode_is_refused(image: Path) -> None:
    # given a guest that linked the journal (inode 8) into the tree
    debugfs(image, "link <8> /journal_link")

    # then removing it is refused as damage, and the journal is intact
    with pytest.raises(Corrupt):
        engine.remove(image, "/journal_link")
    assert "Journal" in debugfs(image, "stats -h")


def test_a_corrupted_superblock_is_volume_corrupt_quickly(image: Path) -> None:
    with open(image, "r+b") as f:
        f.seek(1024)
        f.write(os.urandom(1024))

    started = time.monotonic()
    for call in (
        lambda: engine.stat(image, "/"),
        lambda: engine.list_dir(image, "/"),
        lambda: engine.write_file(image, "/x", b"x"),
        lambda: engine.usage(image),
    ):
        with pytest.raises(Corrupt) as exc:
            call()
        assert (exc.value.status, exc.value.code) == (422, "volume_corrupt")

    assert time.monotonic() - started < 10


def test_garbage_image_is_corrupt(tmp_path: Path) -> None:
    image = tmp_path / "junk.img"
    image.write_bytes(os.urandom(4 * MiB))
    engine.give_to_tools(image)

    with pytest.raises(Corrupt):
        engine.list_dir(image, "/")


def test_planted_symlinks_never_redirect_writes(image: Path) -> None:
    # given a guest that planted links to "/etc" and "../../" in the volume
    engine.make_dir(image, "/work")
    engine.make_dir(image, "/etc")
    debugfs(image, "symlink /work/etc /etc", "symlink /work/up ../../")

    for path in ("/work/etc/passwd", "/work/up/x", "/work/up/etc/passwd"):
        with pytest.raises(NotADirectory):
            engine.write_file(image, path, b"owned", force=True)
        with pytest.raises(NotADirectory):
            engine.make_dir(image, path, force=True)
        with pytest.raises(NotADirectory):
            engine.remove(image, path)
    with pytest.raises(NotARegularFile):
        engine.read_file(image, "/work/etc", max_bytes=10)
    assert engine.list_dir(image, "/etc") == []
    assert engine.stat(image, "/work/etc").type == "symlink"

    # replacing the link itself writes a file there, not through it
    engine.write_file(image, "/work/etc", b"plain")
    assert engine.stat(image, "/work/etc").type == "file"
    assert engine.list_dir(image, "/etc") == []
    assert fsck(image) == ""


def test_crafted_names_cannot_inject_debugfs_commands(image: Path) -> None:
    crafted = '/x" <2> "; dump <7> out'

    engine.write_file(image, crafted, b"contained")

    assert engine.read_file(image, crafted, max_bytes=100) == b"contained"
    assert [e.name for e in engine.list_dir(image, "/")] == ["lost+found", 'x" <2> "; dump <7> out']
    assert fsck(image) == ""


def test_journal_needing_recovery_is_replayed_first(image: Path) -> None:
    engine.write_file(image, "/f", b"x")
    debugfs(image, "feature needs_recovery")

    assert engine.read_file(image, "/f", max_bytes=10) == b"x"

    out, _ = sandboxed(["/usr/sbin/dumpe2fs", "-h", "/proc/self/fd/{fd}"], image)
    assert "needs_recovery" not in out
    assert fsck(image) == ""


def test_features_we_cannot_maintain_make_the_volume_read_only(tmp_path: Path) -> None:
    image = from_tree(tmp_path, lambda root: (root / "f").write_bytes(b"q"), extra=("-O", "quota"))

    assert engine.read_file(image, "/f", max_bytes=10) == b"q"
    with pytest.raises(Unsupported) as exc:
        engine.write_file(image, "/g", b"x")

    assert (exc.value.status, exc.value.code) == (422, "volume_unsupported")
    assert "quota" in exc.value.message


def test_a_tool_that_runs_too_long_is_a_timeout(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("volumes.engine.debugfs.TOOL_TIMEOUT", 0.0001)  # where each run reads it

    with pytest.raises(ToolFailed) as exc:
        engine.stat(image, "/")

    assert (exc.value.status, exc.value.code) == (502, "volume_tool_failed")
    assert "timed out" in exc.value.message


def test_an_image_still_owned_by_qemu_is_a_tool_failure(image: Path) -> None:
    os.chown(image, 0, 0)

    with pytest.raises(ToolFailed) as exc:
        engine.stat(image, "/")

    assert "cannot open" in exc.value.message


def test_engine_errors_carry_status_and_code() -> None:
    codes = {
        cls.__name__: (cls.status, cls.code)
        for cls in (InvalidPath, NotFound, AlreadyExists, NotADirectory, IsADirectory, NoSpace, TooLarge)
    }

    assert codes == {
        "InvalidPath": (422, "invalid_path"),
        "NotFound": (404, "path_not_found"),
        "AlreadyExists": (409, "path_exists"),
        "NotADirectory": (422, "not_a_directory"),
        "IsADirectory": (422, "is_a_directory"),
        "NoSpace": (507, "not_enough_space"),
        "TooLarge": (413, "file_too_large"),
    }
    assert issubclass(Corrupt, EngineError) and EngineError("m").message == "m"


# --- the sandbox itself ---------------------------------------------------------------------------


SANDBOX_PROBE = r"""
echo "uid $(id -u) groups $(id -G)"
echo "root $(ls / | tr '\n' ' ')"
echo "etc $(ls /etc | tr '\n' ' ')"
for path in "$@" /etc/shadow /etc/watasu /var/lib /home /root /run /srv /proc/1/root/etc/shadow; do
    [ -e "$path" ] && echo "visible $path"
done
echo "interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
echo "processes $(ls /proc | grep -c '^[0-9]')"
for address in 127.0.0.1:5432 10.0.2.2:80 1.1.1.1:443; do
    python3 -c "import socket, sys; h, p = sys.argv[1].split(':'); socket.create_connection((h, int(p)), 2)" \
        "$address" 2>&1 | tail -1 | sed "s/^/connect $address: /"
done
unshare -U true 2>/dev/null && echo "nested userns" || echo "no nested userns"
"""


def test_the_sandbox_sees_no_host_secrets_network_or_other_images(tmp_path: Path) -> None:
    # given a secret and another volume's image on the host
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    other = tmp_path / "other.img"
    engine.create_image(other, 16 * MiB)

    out, rc = sandboxed(["/bin/sh", "-c", SANDBOX_PROBE, "probe", str(secret), str(other), str(tmp_path)])

    tools = pwd.getpwnam(engine.TOOLS_USER)
    lines = out.splitlines()
    assert rc == 0
    assert lines[:3] == [
        f"uid {tools.pw_uid} groups {tools.pw_gid}",
        "root bin dev etc lib lib64 proc sbin tmp usr ",
        "etc mke2fs.conf ",
    ]
    assert [line for line in lines if line.startswith("visible")] == []
    assert "interfaces lo " in lines
    assert "CapEff:\t0000000000000000" in lines
    assert "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    processes = next(int(line.split()[1]) for line in lines if line.startswith("processes"))
    assert processes < 10  # its own pid namespace: bwrap, the shell and this pipeline
    assert "connect 127.0.0.1:5432: ConnectionRefusedError: [Errno 111] Connection refused" in lines
    assert "connect 10.0.2.2:80: OSError: [Errno 101] Network is unreachable" in lines
    assert "connect 1.1.1.1:443: OSError: [Errno 101] Network is unreachable" in lines
    assert lines[-1] == "no nested userns"


def test_debugfs_in_the_sandbox_cannot_read_host_files(image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")

    out = debugfs(image, f"write {secret} stolen", "write /etc/passwd stolen2")
    names = [e.name for e in engine.list_dir(image, "/")]

    assert "stolen" not in names and "stolen2" not in names
    assert "No such file or directory" in out

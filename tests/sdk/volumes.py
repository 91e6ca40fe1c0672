"""Volumes through the public SDK, sync and async: create, inspect, detached files, mounts
into sandboxes, data carried from one sandbox to the next, destroy."""

import asyncio

from watasu import AsyncVolume, Sandbox, Volume
from watasu.exceptions import NotFoundException, SandboxException, VolumeException


def refused(call, *words):  # type: ignore[no-untyped-def]
    try:
        call()
    except Exception as exc:  # the SDK maps 409 to its own exceptions; the message is ours
        text = str(exc)
        assert all(word in text for word in words), (words, text)
        return exc
    raise AssertionError(f"expected a refusal mentioning {words}")


vol = Volume.create("data")
info = vol.get_info()
assert (info.name, info.state, info.size_bytes) == ("data", "ready", 10 * 2**30), info
assert info.raw["attached_sandbox_id"] is None, info.raw
assert "data" in [v.name for v in Volume.list()]
assert Volume.connect("data").volume_id == vol.volume_id
assert Volume.get_info(vol.volume_id).name == "data"
refused(lambda: Volume.create("data"), "already has a volume named data")

# detached files
made = vol.make_dir("/workspace")
assert made.type == "directory", made
written = vol.write_file("/workspace/status.txt", "ready\n", mode="0640")
assert (written.type, written.size, written.mode) == ("file", 6, 0o640), written
assert vol.read_file("/workspace/status.txt") == "ready\n"
assert vol.read_file("/workspace/status.txt", format="bytes") == b"ready\n"
assert vol.read_file("/workspace/status.txt", format="stream").read() == b"ready\n"
assert vol.exists("/workspace/status.txt") and not vol.exists("/workspace/missing")
stat = vol.get_info("/workspace/status.txt")
assert (stat.name, stat.size, stat.uid) == ("status.txt", 6, 0), stat
vol.write_file("/deep/er/file.bin", bytes(range(256)), force=True)
listed = {e.path: e.type for e in vol.list("/", depth=3)}
for path, kind in {
    "/workspace": "directory",
    "/workspace/status.txt": "file",
    "/deep/er/file.bin": "file",
}.items():
    assert listed.get(path) == kind, (path, listed)
assert "/workspace/status.txt" not in {e.path for e in vol.list("/", depth=1)}
assert vol.update_metadata("/workspace/status.txt", mode=0o600, uid=1000).mode == 0o600
assert vol.get_info("/workspace/status.txt").uid == 1000
refused(lambda: vol.read_file("/../etc/passwd"), "..")
assert vol.remove("/deep") is True
assert not vol.exists("/deep/er/file.bin")

# mounted: the sandbox sees what was written detached; the host keeps its hands off
one = Sandbox.create(volume_mounts={"/mnt/v": vol})
assert one.commands.run("cat /mnt/v/workspace/status.txt").stdout == "ready\n"
assert one.get_info().raw["volume_mounts"] == [{"name": "data", "path": "/mnt/v"}]
assert Volume.get_info("data").raw["attached_sandbox_id"] == one.sandbox_id
refused(lambda: vol.write_file("/x.txt", "x"), "attached to sandbox", one.sandbox_id)
refused(lambda: vol.destroy(), "attached")
refused(lambda: Sandbox.create(volume_mounts={"/other": "data"}), "in use by sandbox", one.sandbox_id)
one.commands.run("echo from-one > /mnt/v/one.txt")
# survives pause and resume
assert one.beta_pause() is True
one = Sandbox.connect(one.sandbox_id)
assert one.commands.run("cat /mnt/v/one.txt").stdout == "from-one\n"
one.kill()

# the next sandbox that mounts it (by name, the docs' form) reads what the first wrote
two = Sandbox.create(volume_mounts={"/data": "data"})
assert two.commands.run("cat /data/one.txt /data/workspace/status.txt").stdout == "from-one\nready\n"
two.kill()
assert vol.read_file("/one.txt") == "from-one\n"

# an unknown name on a mount creates the volume
three = Sandbox.create(volume_mounts={"/scratch": "made-on-mount"})
assert three.commands.run("mountpoint -q /scratch && echo yes").stdout == "yes\n"
three.kill()
assert Volume.get_info("made-on-mount").state == "ready"

assert vol.destroy() is True
assert Volume.destroy(vol.volume_id) is False
assert Volume.destroy("made-on-mount") is True
try:
    Volume.connect("data")
    raise AssertionError("a destroyed volume must be gone")
except (NotFoundException, VolumeException, SandboxException) as exc:
    assert "not found" in str(exc).lower(), exc


async def main() -> None:
    avol = await AsyncVolume.create("adata")
    assert (await AsyncVolume.get_info(avol.volume_id)).name == "adata"
    await avol.make_dir("/a")
    await avol.write_file("/a/b.txt", b"async\n")
    assert await avol.read_file("/a/b.txt") == "async\n"
    assert await avol.exists("/a/b.txt")
    assert [e.path for e in await avol.list("/a")] == ["/a/b.txt"]
    assert (await avol.update_metadata("/a/b.txt", mode="0755")).mode == 0o755
    assert await avol.remove("/a/b.txt") is True
    assert "adata" in [v.name for v in await AsyncVolume.list()]
    assert await avol.destroy() is True
    assert await AsyncVolume.destroy(avol.volume_id) is False


asyncio.run(main())
print("ok")

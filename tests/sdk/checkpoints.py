"""Checkpoints through the public SDK, sync and async: capture, list, create from a
snapshot (by id and by name), restore through the REST route, delete."""

import asyncio

from watasu import AsyncSandbox, Sandbox

source = Sandbox.create(metadata={"role": "source", "kept": "yes"}, envs={"GREETING": "hello"})
source.files.write("/root/before.txt", "written before the checkpoint\n")
source.commands.run("mkdir -p /srv/app && seq 1 1000 > /srv/app/numbers")

snap = source.create_snapshot(name="after-write", metadata={"reason": "test"})
assert (snap.status, snap.name, snap.sandbox_id) == ("ready", "after-write", source.sandbox_id), snap
assert snap.size_bytes and snap.size_bytes > 0, snap
assert snap.raw["quiesce_mode"] == "guest" and snap.raw["local_state"] == "present", snap.raw
assert snap.raw["metadata"] == {"reason": "test"}, snap.raw
assert source.get_info().state == "ready"
source.files.write("/root/after.txt", "written after\n")

mine = [s.snapshot_id for s in source.list_snapshots()]
assert mine == [snap.snapshot_id], mine
assert [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id)] == mine
assert snap.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots()]
crash = Sandbox.create_snapshot(source.sandbox_id, quiesce_mode="crash")
assert (crash.status, crash.raw["quiesce_mode"]) == ("ready", "crash"), crash.raw
page = Sandbox.list_snapshots(sandbox_id=source.sandbox_id, limit=1)
first = page.next_items()
assert [s.snapshot_id for s in first] == [crash.snapshot_id] and page.has_next, first
assert [s.snapshot_id for s in page.next_items()] == [snap.snapshot_id]

# create from the snapshot's id: the disk as it was, the source's env, the request's metadata
copy = Sandbox.create(snap.snapshot_id, metadata={"role": "copy"})
assert copy.sandbox_id != source.sandbox_id
assert copy.files.read("/root/before.txt") == "written before the checkpoint\n"
assert not copy.files.exists("/root/after.txt")
assert copy.commands.run("wc -l < /srv/app/numbers").stdout.strip() == "1000"
assert copy.commands.run("echo $GREETING").stdout == "hello\n"
copy_info = copy.get_info()
assert copy_info.metadata == {"role": "copy", "kept": "yes"}, copy_info.metadata
assert copy_info.raw["snapshot_id"] == int(snap.snapshot_id), copy_info.raw
assert copy.commands.run("hostname").stdout.strip() != source.commands.run("hostname").stdout.strip()
copy.kill()

# by name, and through the REST restore route (the SDK then connects to the new sandbox)
by_name = Sandbox.create("after-write")
assert by_name.files.read("/root/before.txt") == "written before the checkpoint\n"
by_name.kill()
restored_info = source.restore(snap.snapshot_id, timeout_seconds=120)
assert restored_info.sandbox_id not in (source.sandbox_id, "")
restored = Sandbox.connect(restored_info.sandbox_id)
assert restored.files.read("/root/before.txt") == "written before the checkpoint\n"
assert restored.get_info().metadata == {"role": "source", "kept": "yes"}
restored.kill()

# the source is untouched
assert source.files.read("/root/after.txt") == "written after\n"
assert source.get_info().state == "ready"

assert Sandbox.delete_snapshot(crash.snapshot_id) is True
assert Sandbox.delete_snapshot(crash.snapshot_id) is False
assert Sandbox.delete_snapshot("not-an-id") is False
assert source.delete_snapshot("999999999") is False


async def main() -> None:
    sbx = await AsyncSandbox.connect(source.sandbox_id)
    await sbx.files.write("/root/async.txt", "async\n")
    taken = await sbx.create_snapshot(name="async-one")
    assert taken.status == "ready", taken
    listed = [s.snapshot_id async for s in sbx.list_snapshots()]
    assert listed == [taken.snapshot_id, snap.snapshot_id], listed
    everyone = await AsyncSandbox.list_snapshots(sandbox_id=source.sandbox_id).list_items()
    assert [s.snapshot_id for s in everyone] == listed
    made = await AsyncSandbox.create(taken.snapshot_id)
    assert await made.files.read("/root/async.txt") == "async\n"
    await made.kill()
    info = await sbx.restore(checkpoint_id=taken.snapshot_id)
    again = await AsyncSandbox.connect(info.sandbox_id)
    assert await again.files.read("/root/async.txt") == "async\n"
    await again.kill()
    assert await AsyncSandbox.delete_snapshot(taken.snapshot_id) is True
    assert await sbx.delete_snapshot(taken.snapshot_id) is False


asyncio.run(main())

# the checkpoint outlives its source
source.kill()
after = Sandbox.create(snap.snapshot_id)
assert after.files.read("/root/before.txt") == "written before the checkpoint\n"
after.kill()
assert Sandbox.delete_snapshot(snap.snapshot_id) is True
print("ok")

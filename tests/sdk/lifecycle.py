"""Lifecycle through the public SDK: create, list with pagination, info, timeout,
pause, resume, connect, kill."""

from watasu import Sandbox
from watasu.exceptions import InvalidArgumentException, SandboxNotFoundException

first = Sandbox.create(timeout=300, metadata={"suite": "sdk"}, envs={"A": "1"})
second = Sandbox.create(metadata={"suite": "sdk"})

info = first.get_info()
assert (info.state, info.template_id, info.metadata) == ("ready", "base", {"suite": "sdk"}), info
assert info.end_at is not None and info.started_at is not None, info

listed = Sandbox.list(query={"metadata": {"suite": "sdk"}, "state": ["running"]}, limit=1)
pages = [listed.next_items(), listed.next_items()]
assert [len(page) for page in pages] == [1, 1], pages
assert sorted(i.sandbox_id for page in pages for i in page) == sorted(
    [first.sandbox_id, second.sandbox_id]
), pages
assert not listed.has_next

first.set_timeout(900)
extended = first.get_info()
assert extended.end_at > info.end_at
# connecting to a running sandbox, even with a shorter timeout, never pulls its deadline back
assert Sandbox.connect(first.sandbox_id, timeout=60).get_info().end_at >= extended.end_at
assert Sandbox.connect(first.sandbox_id).get_info().end_at >= extended.end_at

assert first.beta_pause() is True
assert first.beta_pause() is False  # already paused: 409
assert first.is_running() is False
assert [i.sandbox_id for i in Sandbox.list(query={"state": ["paused"]})] == [first.sandbox_id]

reconnected = Sandbox.connect(first.sandbox_id)
assert reconnected.get_info().state == "ready"
assert reconnected.is_running() is True

assert second.resume() is True
assert second.kill() is True
assert Sandbox.kill(first.sandbox_id) is True
assert first.is_running() is False
try:
    Sandbox.get_info("987654321")
    raise AssertionError("an unknown sandbox must raise")
except SandboxNotFoundException:
    pass
try:
    Sandbox.create(template="no-such-template")
    raise AssertionError("an unknown template must raise")
except InvalidArgumentException as exc:
    assert "no-such-template" in str(exc)
print("ok")

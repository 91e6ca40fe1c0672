"""The data plane through the public SDK and the edge: files, commands, PTY, watch, git,
and auto-resume of a paused sandbox by a file read."""

import contextlib
import time

from waiting import wait_until

from watasu import CommandExitException, PtySize, Sandbox
from watasu.exceptions import TimeoutException

sbx = Sandbox.create(timeout=600, lifecycle={"on_timeout": "pause", "auto_resume": True})
files, commands = sbx.files, sbx.commands

# --- files --------------------------------------------------------------------------------------
info = files.write("/tmp/dp/a.txt", "alpha")
assert info.path == "/tmp/dp/a.txt" and info.name == "a.txt", info
assert files.read("/tmp/dp/a.txt") == "alpha"
assert files.read("/tmp/dp/a.txt", format="bytes") == b"alpha"
written = files.write_files(
    [{"path": "/tmp/dp/b.txt", "data": "beta"}, {"path": "/tmp/dp/c.bin", "data": b"\x00\x01"}]
)
assert [w.name for w in written] == ["b.txt", "c.bin"], written
assert sorted(e.name for e in files.list("/tmp/dp")) == ["a.txt", "b.txt", "c.bin"]
assert files.exists("/tmp/dp/b.txt") and not files.exists("/tmp/dp/nope")
assert files.get_info("/tmp/dp/a.txt").size == 5
assert files.rename("/tmp/dp/b.txt", "/tmp/dp/d.txt").name == "d.txt"
assert files.make_dir("/tmp/dp/sub") is True
assert files.get_info("/tmp/dp/sub").type.value == "dir"
files.remove("/tmp/dp/d.txt")
assert not files.exists("/tmp/dp/d.txt")

# --- commands -----------------------------------------------------------------------------------
result = commands.run("echo hello; echo oops >&2")
assert (result.exit_code, result.stdout, result.stderr) == (0, "hello\n", "oops\n"), result
assert commands.run("echo $GREETING", envs={"GREETING": "hi"}).stdout == "hi\n"
try:
    commands.run("exit 3")
    raise AssertionError("a non-zero exit must raise")
except CommandExitException as exc:
    assert exc.exit_code == 3
started = time.monotonic()
try:
    commands.run("sleep 30", timeout=2)
    raise AssertionError("the command timeout must raise")
except (TimeoutException, CommandExitException):  # the runtime's own timer may kill it first
    assert time.monotonic() - started < 15
reader = commands.run("read line; echo got:$line", background=True, stdin=True)
commands.send_stdin(reader.pid, "ping\n")
assert reader.wait().stdout == "got:ping\n"

sleeper = commands.run("sleep 300", background=True)
assert sleeper.pid in [p.pid for p in commands.list()]
attached = commands.connect(sleeper.pid)
assert commands.kill(sleeper.pid) is True
with contextlib.suppress(CommandExitException):  # killed: non-zero exit
    attached.wait()

# --- PTY ----------------------------------------------------------------------------------------
output: list[bytes] = []
pty = sbx.pty.create(PtySize(rows=24, cols=80))
sbx.pty.resize(pty.pid, PtySize(rows=40, cols=100))
sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
with contextlib.suppress(CommandExitException):
    pty.wait(on_pty=lambda data: output.append(data))
assert b"40 100" in b"".join(output), output

# --- watch --------------------------------------------------------------------------------------
watcher = files.watch_dir("/tmp/dp")
files.write("/tmp/dp/watched.txt", "w")
events = []
wait_until(
    lambda: events.extend(watcher.get_new_events()) or any(e.name == "watched.txt" for e in events),
    30,
    "the watch to report watched.txt",
    seen=lambda: events,
)
watcher.stop()

# --- git ----------------------------------------------------------------------------------------
sbx.git.init("/tmp/repo", initial_branch="main")
sbx.git.configure_user("Edge Test", "edge@example.test", scope="local", path="/tmp/repo")
files.write("/tmp/repo/README", "hello")
sbx.git.add("/tmp/repo")
sbx.git.commit("/tmp/repo", "first")
status = sbx.git.status("/tmp/repo")
assert status.is_clean, status
assert commands.run("git -C /tmp/repo log --format=%s").stdout == "first\n"

# --- auto-resume ----------------------------------------------------------------------------------
assert sbx.beta_pause() is True
assert sbx.is_running() is False
assert files.read("/tmp/dp/a.txt") == "alpha"  # the same session token resumes it
assert sbx.is_running() is True

sbx.kill()
print("ok")

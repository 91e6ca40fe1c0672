"""No surprises on the data plane, through the public SDK: a process started without
stdin refuses input instead of swallowing it, an unknown process is named as such, and
a recursive watch reports what is created inside a directory made a moment before.

Run against a sandbox that already runs: `no_surprises.py <sandbox id> <directory>`.
"""

import sys

from waiting import wait_until

from watasu import Sandbox
from watasu.exceptions import NotFoundException, SandboxException

sandbox_id, root = sys.argv[1], sys.argv[2]
sbx = Sandbox.connect(sandbox_id)
commands, files = sbx.commands, sbx.files
files.make_dir(root)

# --- stdin to a process started without it ------------------------------------------------------
# (not killed: on a host, as in the tests, killing a login shell mid-profile can leave a lock behind)
sleeper = commands.run("sleep 20", background=True)  # the SDK's default: stdin=False
try:
    commands.send_stdin(sleeper.pid, "lost?\n", request_timeout=30)
    raise AssertionError("send_stdin to a process without stdin must raise")
except SandboxException as exc:  # the agent's refusal, not the request timing out
    assert "started without stdin" in str(exc), str(exc)
reader = commands.run("read line; echo got:$line", background=True, stdin=True)
commands.send_stdin(reader.pid, "ping\n")  # with stdin, input still arrives
assert reader.wait().stdout == "got:ping\n"

# --- a process that never existed ---------------------------------------------------------------
try:
    commands.kill("proc-never")
    raise AssertionError("killing an unknown process must raise")
except NotFoundException as exc:
    assert str(exc) == "no process proc-never was started in this sandbox", str(exc)

# --- a recursive watch sees inside a directory created a moment ago ------------------------------
watcher = files.watch_dir(root, recursive=True)
commands.run("mkdir -p a/b/c; echo z > a/b/c/f", cwd=root)
wanted = {"a", "a/b", "a/b/c", "a/b/c/f"}
seen: set[str] = set()


def all_created() -> bool:
    seen.update(e.path.removeprefix(root + "/") for e in watcher.get_new_events() if e.type.value == "create")
    return wanted <= seen


wait_until(all_created, 30, f"the watch to report {sorted(wanted)}", seen=lambda: seen)
watcher.stop()

print("ok")

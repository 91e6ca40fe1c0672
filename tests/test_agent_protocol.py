"""The guest agent's /runtime/v1 data plane (HTTP routes, WebSocket frames), driven on real VMs (no edge).

Each test restores a clone of the base template and talks to its agent through the
forwarded port with the agent secret as bearer, exactly as the edge does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import websocket

from sandboxes.runtime import lifecycle
from sandboxes.runtime.agent_client import role_secret
from sandboxes.runtime.driver import MemorySnapshot
from sandboxes.runtime.libvirt_driver import LibvirtDriver
from templates_app.models import TemplateVersion
from tests.conftest import VM_TEST_PREFIX
from tests.waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.django_db]

RT = "/runtime/v1"


@dataclass
class Agent:
    """HTTP + WebSocket access to one VM's agent, authenticated like the edge."""

    port: int
    secret: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.secret}", **kwargs.pop("headers", {})}
        return requests.request(method, self.base + path, headers=headers, timeout=120, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http(method, path, **kwargs)
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json() if r.content else {}

    def ws(self, path: str) -> websocket.WebSocket:
        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}{path}", timeout=60, header=[f"Authorization: Bearer {self.secret}"]
        )

    def start(self, script: str, **extra: Any) -> tuple[websocket.WebSocket, dict[str, Any]]:
        """Start ``bash -c script`` over WS; returns the socket and the ``started`` frame."""
        sock = self.ws(f"{RT}/process")
        sock.send(
            json.dumps(
                {
                    "type": "start",
                    "id": None,
                    "cmd": "/bin/bash",
                    "args": ["-c", script],
                    "cwd": None,
                    "user": None,
                    "environment": {},
                    "envs": {},
                    "stdin": False,
                    "timeout_ms": 60000,
                    **extra,
                }
            )
        )
        first = frame(sock)
        assert first["type"] == "started", first
        assert "cursor" not in first
        return sock, first

    def run(self, script: str, **extra: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        sock, started = self.start(script, **extra)
        return started, until_exit(sock)


def frame(sock: websocket.WebSocket) -> dict[str, Any]:
    while True:
        msg = sock.recv()
        assert isinstance(msg, str) and msg, f"expected a text frame, got {msg!r}"
        f = json.loads(msg)
        if f["type"] not in ("ready", "pong"):
            return f


def until_exit(sock: websocket.WebSocket) -> list[dict[str, Any]]:
    """Frames up to and including ``exit``; the server then closes."""
    frames = []
    while True:
        f = frame(sock)
        frames.append(f)
        if f["type"] == "exit":
            sock.close()
            return frames


def output(frames: list[dict[str, Any]], kind: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == kind)


@pytest.fixture
def agent(vm_cleanup: LibvirtDriver, base_version: TemplateVersion) -> Iterator[Agent]:
    snapshot: MemorySnapshot = lifecycle.load_template_snapshot(base_version.artifact_dir)
    name = f"{VM_TEST_PREFIX}agent-{secrets.token_hex(4)}"
    sandbox = lifecycle.start_from_snapshot(
        vm_cleanup, snapshot, name, vm_cleanup.state_dir, env_vars={"SANDBOX_GREETING": "from-init"}
    )
    assert sandbox.client.secret
    yield Agent(sandbox.spec.agent_host_port, sandbox.client.secret)
    vm_cleanup.destroy(name)


# --------------------------------------------------------------------------- files


def test_files_round_trip_stat_move_delete(agent: Agent) -> None:
    text = agent.ok("PUT", f"{RT}/files", params={"path": "/work/t/hello.txt"}, data=b"hi there\n")
    assert text["file"]["path"] == "/work/t/hello.txt" and text["file"]["type"] == "file"
    assert text["file"]["bytes"] == 9 and text["file"]["mode"] == 0o644
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/t/hello.txt"}).content == b"hi there\n"

    binary = bytes(range(256)) * 64
    agent.ok("PUT", f"{RT}/files", params={"path": "/work/t/bin.dat"}, data=binary)
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/t/bin.dat"}).content == binary

    chunked = agent.ok(
        "PUT", f"{RT}/files", params={"path": "/work/t/chunked"}, data=(bytes([i]) * 1000 for i in range(50))
    )
    assert chunked["file"]["bytes"] == 50_000

    stat = agent.ok("GET", f"{RT}/files/stat", params={"path": "/work/t"})["file"]
    assert stat["type"] == "dir" and isinstance(stat["mode"], int) and stat["modified_time"].endswith("Z")
    missing = agent.http("GET", f"{RT}/files/stat", params={"path": "/work/t/nope"})
    assert missing.status_code == 404 and missing.json()["error"] == "file_not_found"
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/t/nope"}).status_code == 404
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/t"}).json()["error"] == "is_a_directory"
    assert agent.http("GET", f"{RT}/files", params={"path": "relative"}).status_code == 422
    assert (
        agent.http(
            "GET", f"{RT}/files/stat", params={"path": "/work"}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )

    moved = agent.ok(
        "POST", f"{RT}/files/move", json={"from_path": "/work/t/hello.txt", "to_path": "/work/u/renamed.txt"}
    )
    assert moved["file"]["name"] == "renamed.txt" and moved["file"]["path"] == "/work/u/renamed.txt"
    assert agent.http("GET", f"{RT}/files/stat", params={"path": "/work/t/hello.txt"}).status_code == 404

    agent.ok("DELETE", f"{RT}/files", params={"path": "/work/u/renamed.txt"})
    agent.ok("DELETE", f"{RT}/files", params={"path": "/work/t"})  # recursive
    assert agent.http("DELETE", f"{RT}/files", params={"path": "/work/t"}).status_code == 404

    agent.run("ln -s /etc/hostname /work/link")
    link = agent.ok("GET", f"{RT}/files/stat", params={"path": "/work/link"})["file"]
    assert link["symlink_target"] == "/etc/hostname" and link["type"] != "file"


def test_large_file_streams_both_ways(agent: Agent) -> None:
    size = 50 * 2**20
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        block = os.urandom(2**20)
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    entry = agent.ok("PUT", f"{RT}/files", params={"path": "/tmp/big.bin"}, data=body())["file"]
    assert entry["bytes"] == size
    r = agent.http("GET", f"{RT}/files", params={"path": "/tmp/big.bin"}, stream=True)
    assert int(r.headers["Content-Length"]) == size
    back = hashlib.sha256()
    for chunk in r.iter_content(2**20):
        back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()


def test_write_files_directories_and_make_dir(agent: Agent) -> None:
    import gzip

    files = [
        {"path": f"/work/batch/{n}.txt", "data_base64": base64.b64encode(n.encode()).decode()}
        for n in ("c", "a", "b")
    ]
    files.append(
        {
            "path": "/work/batch/deep/z.gz",
            "gzip": True,
            "data_base64": base64.b64encode(gzip.compress(b"zipped")).decode(),
        }
    )
    written = agent.ok("POST", f"{RT}/files/write_files", json={"files": files})["files"]
    assert [f["path"] for f in written] == [f["path"] for f in files]
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/batch/deep/z.gz"}).content == b"zipped"

    top = agent.ok("GET", f"{RT}/directories", params={"path": "/work/batch"})["entries"]
    assert [e["name"] for e in top] == ["a.txt", "b.txt", "c.txt", "deep"]
    deep = agent.ok("GET", f"{RT}/directories", params={"path": "/work/batch", "depth": 2})["entries"]
    assert "/work/batch/deep/z.gz" in [e["path"] for e in deep]
    assert agent.http("GET", f"{RT}/directories", params={"path": "/work/none"}).status_code == 404
    assert agent.http("GET", f"{RT}/directories", params={"path": "/work/batch/a.txt"}).status_code == 422

    for _ in range(2):  # idempotent
        assert agent.ok("POST", f"{RT}/directories", params={"path": "/work/x/y/z"})["file"]["type"] == "dir"
    assert agent.http("POST", f"{RT}/directories", params={"path": "/work/batch/a.txt"}).status_code == 422


def test_apply_diff_add_update_delete_move(agent: Agent) -> None:
    agent.ok(
        "POST",
        f"{RT}/files/write_files",
        json={
            "files": [
                {"path": "/work/p/a.txt", "data_base64": base64.b64encode(b"alpha\nkeep\n").decode()},
                {"path": "/work/p/old.txt", "data_base64": base64.b64encode(b"bye\n").decode()},
                {
                    "path": "/work/p/src/x.py",
                    "data_base64": base64.b64encode(b"def f():\n    return 1\n").decode(),
                },
            ]
        },
    )
    diff = """*** Begin Patch
*** Add File: notes/new.txt
+first line
*** Update File: a.txt
@@
-alpha
+beta
 keep
*** Delete File: old.txt
*** Update File: src/x.py
*** Move to: src/y.py
@@ def f():
-    return 1
+    return 2
*** Update File: a.txt
@@
-nomatch
+x
*** End Patch
"""
    report = agent.ok("POST", f"{RT}/files/apply_diff", json={"diff": diff, "cwd": "/work/p"})
    assert report["status"] == "partial"
    assert [f["kind"] for f in report["files"]] == ["add", "update", "delete", "move"]
    assert report["files"][3]["source_path"] == "src/x.py"
    assert report["summary"] == {"requested": 5, "applied": 4, "failed": 1}
    read = {
        p: agent.http("GET", f"{RT}/files", params={"path": f"/work/p/{p}"})
        for p in ("notes/new.txt", "a.txt", "old.txt", "src/x.py", "src/y.py")
    }
    assert read["notes/new.txt"].content == b"first line\n"
    assert read["a.txt"].content == b"beta\nkeep\n"
    assert read["old.txt"].status_code == read["src/x.py"].status_code == 404
    assert read["src/y.py"].content == b"def f():\n    return 2\n"
    bad = agent.http("POST", f"{RT}/files/apply_diff", json={"diff": "*** Begin Patch\nnonsense\n"})
    assert bad.status_code == 422 and bad.json()["error"] == "patch_parse_failed"


# --------------------------------------------------------------------------- processes


def test_process_frames_env_exit_codes(agent: Agent) -> None:
    started, frames = agent.run(
        "echo hello; echo err >&2; echo $SANDBOX_GREETING $EXTRA",
        environment={"EXTRA": "extra"},
        envs={"EXTRA": "extra"},
    )
    assert started["pid"].startswith("proc-") and started["os_pid"] > 0
    assert [f["cursor"] for f in frames] == list(range(len(frames)))
    assert output(frames) == b"hello\nfrom-init extra\n" and output(frames, "stderr") == b"err\n"
    assert frames[-1] == {
        **frames[-1],
        "type": "exit",
        "exit_code": 0,
        "status": "exited",
        "pid": started["pid"],
    }

    _, frames = agent.run("exit 3")
    assert frames[-1]["exit_code"] == 3

    _, frames = agent.run("sleep 30", timeout_ms=1000)
    assert frames[-1]["status"] == "timed_out" and frames[-1]["exit_code"] != 0

    sock = agent.ws(f"{RT}/process")
    sock.send(json.dumps({"type": "start", "cmd": "/bin/true", "args": [], "cwd": "/nope"}))
    assert frame(sock)["type"] == "error"

    _, frames = agent.run("pwd", cwd="/tmp")
    assert output(frames) == b"/tmp\n"


LOGIN_REPORT = "env -0 | sort -z | tr '\\0' '\\n'; umask; shopt -q login_shell && echo login; declare -F"


def test_commands_run_sees_what_a_real_login_shell_sees(agent: Agent) -> None:
    """In the guest, the SDK's ``bash -l -c`` reads the profiles once (the agent's capture) and
    its environment equals a real login shell's (``bash -lc``), for root and for another user."""

    def report(args: list[str], user: str | None) -> bytes:
        _, frames = agent.run("", args=args, user=user, environment={"WHO": "ada"}, envs={"WHO": "ada"})
        assert frames[-1]["exit_code"] == 0, output(frames, "stderr")
        return output(frames)

    # given a script in /etc/profile.d (which counts its readings) and a `user` account
    profile_d = 'export FROM_PROFILE_D="yes $WHO"; echo "$WHO" >> /tmp/read-by.$UID'
    _, frames = agent.run(f"useradd -m -s /bin/bash user && echo '{profile_d}' > /etc/profile.d/x.sh")
    assert frames[-1]["exit_code"] == 0, output(frames, "stderr")

    for user in (None, "user"):
        # when the SDK's form runs twice (capture, then cache) and a real login shell once
        fast = [report(["-l", "-c", LOGIN_REPORT], user) for _ in range(2)]
        real = report(["-lc", LOGIN_REPORT], user)

        # then they are the same, and the profile.d script and the request's env are in them
        assert fast == [real, real], user
        assert b"FROM_PROFILE_D=yes ada\n" in real and b"\nlogin\n" in real
    # (counting the readings for this test's env: the agent's own capture after init may read x.sh too)
    _, frames = agent.run("grep -c ada /tmp/read-by.0; grep -c ada /tmp/read-by.$(id -u user)")
    assert output(frames) == b"2\n2\n"  # each: the capture and the real login shell

    # when the user's ~/.profile changes, the next command sees it
    agent.run("echo 'export EDITED=yes' >> /home/user/.profile")
    assert b"EDITED=yes\n" in report(["-l", "-c", "env"], "user")


def test_stdin_close_stdin_and_two_sockets(agent: Agent) -> None:
    sock, started = agent.start("cat", stdin=True)
    pid = started["pid"]
    other = agent.ws(f"{RT}/process/{pid}/connect?since=0")
    assert frame(other)["type"] == "started"
    sock.send(json.dumps({"type": "stdin", "data": base64.b64encode(b"one\n").decode()}))
    assert frame(sock)["type"] == "stdin_ack"
    got = [frame(sock)]
    assert got[0]["type"] == "stdout" and base64.b64decode(got[0]["data"]) == b"one\n"
    echoed = frame(other)
    assert echoed["cursor"] == got[0]["cursor"] and echoed["data"] == got[0]["data"]

    # a third, short-lived socket sends stdin and closes stdin (what commands.send_stdin does)
    helper = agent.ws(f"{RT}/process/{pid}/connect?since=0")
    helper.send(json.dumps({"type": "stdin", "data": base64.b64encode(b"two\n").decode()}))
    helper.send(json.dumps({"type": "close_stdin"}))
    types = []
    while "close_stdin_ack" not in types:
        types.append(frame(helper)["type"])
    assert "stdin_ack" in types
    helper.close()

    for s in (sock, other):
        frames = until_exit(s)
        assert output(frames) == b"two\n" and frames[-1]["exit_code"] == 0

    listed = agent.ok("GET", f"{RT}/process")["processes"]
    assert pid not in [p["id"] for p in listed]
    status = agent.ok("GET", f"{RT}/process/{pid}")
    assert status["status"] == "exited" and status["exit_code"] == 0 and status["id"] == pid


def test_reconnect_since_cursor_no_loss_no_duplicates(agent: Agent) -> None:
    sock, started = agent.start("for i in $(seq 1 40); do echo line$i; sleep 0.05; done")
    pid = started["pid"]
    seen: list[dict[str, Any]] = []
    while len(seen) < 5:
        seen.append(frame(sock))
    sock.close()  # drop mid-stream; the process keeps running
    assert agent.ok("GET", f"{RT}/process/{pid}")["status"] == "running"
    nxt = max(f["cursor"] for f in seen) + 1
    # reattach once the agent confirms output was produced while nobody was attached
    wait_until(
        lambda: agent.ok("GET", f"{RT}/process/{pid}/output", params={"since": nxt})["events"],
        30,
        "output recorded after the drop",
    )
    again = agent.ws(f"{RT}/process/{pid}/connect?since={nxt}")
    assert frame(again)["type"] == "started"
    rest = until_exit(again)
    cursors = [f["cursor"] for f in seen + rest]
    assert cursors == list(range(len(cursors)))
    assert output(seen + rest) == b"".join(f"line{i}\n".encode() for i in range(1, 41))

    out = agent.ok("GET", f"{RT}/process/{pid}/output", params={"since": 3})
    assert out["events"][0]["cursor"] == 3 and out["status"] == "exited"
    assert out["next_cursor"] == out["events"][-1]["cursor"] + 1 and not out["truncated_before_cursor"]
    limited = agent.ok("GET", f"{RT}/process/{pid}/output", params={"since": 0, "limit_bytes": 1})
    assert len(limited["events"]) == 1

    replay = agent.ws(f"{RT}/process/{pid}/connect?since=0")  # finished: full replay then exit
    assert frame(replay)["type"] == "started"
    assert output(until_exit(replay)) == output(seen + rest)

    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        agent.ws(f"{RT}/process/proc-999/connect?since=0")
    assert err.value.status_code == 404
    assert agent.http("GET", f"{RT}/process/proc-999").status_code == 404


def test_kill_list_and_background_survival(agent: Agent) -> None:
    sock, started = agent.start("trap 'exit 7' TERM; sleep 100 & wait", timeout_ms=0)
    pid = started["pid"]
    sock.close()
    listed = agent.ok("GET", f"{RT}/process")["processes"]
    assert pid in [p["id"] for p in listed] and pid in [p["pid"] for p in listed]
    record = agent.ok(
        "DELETE", f"{RT}/process/{pid}", params={"signal": "SIGKILL", "kill_group": "true", "grace_ms": 0}
    )
    assert record["status"] == "killed" and record["exit_code"] == -9
    again = agent.ws(f"{RT}/process/{pid}/connect?since=0")
    frames = until_exit(again)
    assert frames[-1]["status"] == "killed"
    assert agent.http("DELETE", f"{RT}/process/proc-999").status_code == 404

    sock, started = agent.start("trap 'exit 7' TERM; echo ready; while true; do sleep 0.1; done")
    assert frame(sock)["type"] == "stdout"  # the trap is installed
    record = agent.ok(
        "DELETE", f"{RT}/process/{started['pid']}", params={"signal": "TERM", "kill_group": "false"}
    )
    assert until_exit(sock)[-1]["exit_code"] == 7 and record["kill_requested_at"]


def test_lagged_reader_can_reconnect(agent: Agent) -> None:
    sock, started = agent.start("head -c 30000000 /dev/zero | base64 -w 1000")
    # do not read while it writes 40 MB: the socket's backlog overflows long before the end
    wait_until(
        lambda: agent.ok("GET", f"{RT}/process/{started['pid']}")["status"],
        120,
        "the unread process to finish",
        until=lambda status: status != "running",
    )
    frames, lagged = [], None
    while lagged is None:
        f = frame(sock)
        if f["type"] == "lagged":
            lagged = f
        elif f["type"] == "exit":
            raise AssertionError("the reader never lagged: the backlog bound is not enforced")
        else:
            frames.append(f)
    assert "cursor" not in lagged and lagged["dropped"] > 0
    sock.close()
    nxt = frames[-1]["cursor"] + 1 if frames else 0
    again = agent.ws(f"{RT}/process/{started['pid']}/connect?since={nxt}")
    assert frame(again)["type"] == "started"
    rest = until_exit(again)
    assert rest[-1]["exit_code"] == 0 and rest[0]["cursor"] >= nxt


# --------------------------------------------------------------------------- PTY, watch, git, preview


def test_pty_input_and_resize(agent: Agent) -> None:
    sock = agent.ws(f"{RT}/process")
    sock.send(
        json.dumps(
            {
                "type": "start",
                "cmd": "/bin/bash",
                "args": ["-i", "-l"],
                "cwd": None,
                "environment": {"TERM": "xterm-256color"},
                "stdin": True,
                "pty": {"cols": 80, "rows": 24},
                "timeout_ms": 60000,
            }
        )
    )
    started = frame(sock)
    assert started["type"] == "started" and started["process"]["pty"] is True
    pid = started["pid"]
    resize = agent.ws(f"{RT}/process/{pid}/connect?since=0")
    resize.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
    replayed = []  # the connect replays `started` and any output first
    while (got := frame(resize))["type"] != "resize_ack":
        replayed.append(got["type"])
    assert got == {"type": "resize_ack", "pid": pid} and set(replayed) <= {"started", "pty"}  # resized
    resize.close()
    sock.send(
        json.dumps(
            {"type": "stdin", "data": base64.b64encode(b"stty size; printf pty-%s ok; exit\n").decode()}
        )
    )
    frames = until_exit(sock)
    text = output(frames, "pty")
    assert {f["type"] for f in frames} <= {"pty", "stdin_ack", "exit"}
    assert b"30 100" in text and b"pty-ok" in text
    assert frames[-1]["exit_code"] == 0


def test_watch_reports_events(agent: Agent) -> None:
    agent.ok("POST", f"{RT}/directories", params={"path": "/work/w/sub"})
    sock = agent.ws(
        f"{RT}/files/watch?path=/work/w&recursive=true&include_entry=true&allow_network_mounts=false"
    )
    assert json.loads(sock.recv())["type"] == "ready"
    agent.ok("PUT", f"{RT}/files", params={"path": "/work/w/hello.txt"}, data=b"hello")
    agent.ok("PUT", f"{RT}/files", params={"path": "/work/w/sub/deep.txt"}, data=b"deep")
    agent.ok("POST", f"{RT}/files/move", json={"from_path": "/work/w/hello.txt", "to_path": "/work/w/b.txt"})
    agent.ok("DELETE", f"{RT}/files", params={"path": "/work/w/b.txt"})
    events: list[dict[str, Any]] = []

    def removed() -> bool:
        f = json.loads(sock.recv())
        if f["type"] == "events":
            events.extend(f["events"])
        return any(e["type"] == "remove" for e in events)

    sock.settimeout(60)
    wait_until(removed, 60, "the watch to report the remove", seen=lambda: events)
    sock.close()
    kinds = {(e["type"], e["path"]) for e in events}
    assert ("create", "/work/w/hello.txt") in kinds and ("write", "/work/w/hello.txt") in kinds
    assert ("create", "/work/w/sub/deep.txt") in kinds
    assert ("rename", "/work/w/hello.txt") in kinds and ("create", "/work/w/b.txt") in kinds
    assert ("remove", "/work/w/b.txt") in kinds
    created = next(e for e in events if e["path"] == "/work/w/sub/deep.txt" and "file" in e)
    assert created["file"]["name"] == "deep.txt"
    with pytest.raises(websocket.WebSocketBadStatusException):
        agent.ws(
            f"{RT}/files/watch?path=/work/none&recursive=false&include_entry=false&allow_network_mounts=false"
        )


def test_git_routes_on_a_local_repo(agent: Agent) -> None:
    repo = "/work/repo"
    g = agent.ok("POST", f"{RT}/git/init", json={"path": repo, "initial_branch": "main"})["git"]
    assert g["path"] == repo
    agent.ok("POST", f"{RT}/git/configure_user", json={"name": "T", "email": "t@example.com"})
    agent.ok("PUT", f"{RT}/files", params={"path": f"{repo}/a.txt"}, data=b"a\n")
    status = agent.ok("POST", f"{RT}/git/status", json={"path": repo})["git"]
    assert status["stdout"].startswith("## ") and "?? a.txt" in status["stdout"]
    agent.ok("POST", f"{RT}/git/add", json={"path": repo, "all": True})
    agent.ok("POST", f"{RT}/git/commit", json={"path": repo, "message": "first"})
    assert agent.ok("POST", f"{RT}/git/status", json={"path": repo})["git"]["stdout"].strip() == "## main"
    created = agent.ok("POST", f"{RT}/git/create_branch", json={"path": repo, "branch": "feature"})["git"]
    assert created["current_branch"] == "feature"
    branches = agent.ok("POST", f"{RT}/git/branches", json={"path": repo})["git"]
    assert sorted(branches["branches"]) == ["feature", "main"] and branches["current_branch"] == "feature"
    agent.ok("POST", f"{RT}/git/checkout", json={"path": repo, "ref": "main"})
    agent.ok("POST", f"{RT}/git/delete_branch", json={"path": repo, "branch": "feature", "force": True})
    missing = agent.ok("POST", f"{RT}/git/remote_get", json={"path": repo, "name": "origin"})
    assert missing["git"]["value"] is None
    agent.ok("POST", f"{RT}/git/remote_add", json={"path": repo, "name": "origin", "url": "/work/remote.git"})
    got = agent.ok("POST", f"{RT}/git/remote_get", json={"path": repo, "name": "origin"})["git"]
    assert got["value"] == "/work/remote.git"
    agent.ok(
        "POST", f"{RT}/git/set_config", json={"path": repo, "key": "x.y", "value": "z", "scope": "local"}
    )
    cfg = agent.ok("POST", f"{RT}/git/get_config", json={"path": repo, "key": "x.y", "scope": "local"})
    assert cfg["git"]["value"] == "z"
    failed = agent.http("POST", f"{RT}/git/commit", json={"path": repo, "message": "nothing to commit"})
    assert failed.status_code == 422 and failed.json()["error"] == "git_command_failed"
    agent.ok(
        "POST", f"{RT}/git/init", json={"path": "/work/remote.git", "bare": True, "initial_branch": "main"}
    )
    pushed = agent.ok("POST", f"{RT}/git/push", json={"path": repo, "remote": "origin", "set_upstream": True})
    assert pushed["git"]["branch"] == "main"
    clone = agent.ok("POST", f"{RT}/git/clone", json={"url": "/work/remote.git", "path": "/work/clone"})
    assert agent.http("GET", f"{RT}/files", params={"path": "/work/clone/a.txt"}).content == b"a\n"
    assert clone["git"]["path"] == "/work/clone"


def test_preview_proxy_forwards_to_a_guest_port(agent: Agent) -> None:
    preview = {"Authorization": f"Bearer {role_secret(agent.secret, 'preview')}"}
    assert agent.http("GET", "/proxy/8123/", headers=preview).status_code == 502
    agent.ok("PUT", f"{RT}/files", params={"path": "/work/site/index.html"}, data=b"<h1>hi</h1>")
    sock, started = agent.start("cd /work/site && exec python3 -m http.server 8123", timeout_ms=0)
    sock.close()
    r = wait_until(
        lambda: agent.http("GET", "/proxy/8123/index.html", params={"q": "1"}, headers=preview),
        60,
        "the guest's web server to answer through the proxy",
        until=lambda r: r.status_code == 200,
    )
    assert r.content == b"<h1>hi</h1>"
    assert agent.http("GET", "/proxy/8123/missing", headers=preview).status_code == 404
    assert agent.http("GET", "/proxy/8123/", headers={"Authorization": "Bearer nope"}).status_code == 401
    # the agent secret itself is not a preview credential
    assert agent.http("GET", "/proxy/8123/").status_code == 401
    agent.ok("DELETE", f"{RT}/process/{started['pid']}", params={"signal": "KILL"})


def test_the_volume_routes_are_the_hosts_alone(agent: Agent) -> None:
    # given the data plane's credential, as the edge would send it
    dataplane = {"Authorization": f"Bearer {role_secret(agent.secret, 'dataplane')}"}

    # then no volume route takes it: mounting and freezing are the host's
    for path in ("/volumes/mount", "/volumes/sync", "/volumes/freeze"):
        assert agent.http("POST", path, json={}, headers=dataplane).status_code == 401, path
    # and with the agent secret, a bad body is a 400 and a disk that never comes a clean 504
    assert agent.http("POST", "/volumes/mount", json={"mounts": "sda"}).status_code == 400
    never = {"mounts": [{"unit": 9, "path": "/m"}], "timeout": 0.2}
    missing = agent.http("POST", "/volumes/mount", json=never)
    assert missing.status_code == 504 and missing.json()["error"] == "volume_disk_missing"
    assert agent.ok("POST", "/volumes/freeze", json={"paths": []}) == {"failed": []}

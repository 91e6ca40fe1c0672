"""The agent's ``/runtime/v1/code`` routes: forwarded to the in-guest code server, streamed, guarded.

Both are the real programs, run on the host: the agent zipapp the image holds, and the code
server the ``code-interpreter`` template ships (``templates_app/provider/guest/code_server.py``).
The host has no Jupyter, so these tests drive the server's bash contexts, which need none;
Python kernels are covered on a VM (tests/test_code_interpreter_vm.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import requests

from sandboxes.runtime.agent_client import AgentClient, role_secret
from templates_app.provider import GUEST_DIR
from tests.edge_support import RealAgent, free_port
from tests.waiting import wait_until

SECRET = "code-agent-secret-" + "c" * 22
RUN = "/runtime/v1/code/run"


class CodeServer:
    """``code_server.py`` as a host process on a free port (its Python warm-up fails without
    Jupyter; bash contexts work)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix="watasu-code-test-")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CodeServer:
        env = {**os.environ, "WATASU_CODE_PORT": str(self.port), "WATASU_CODE_STATE_DIR": self.state}
        self.process = subprocess.Popen([sys.executable, str(GUEST_DIR / "code_server.py")], env=env)
        try:
            wait_until(self._listening, timeout=30, what="the code server listens")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=15)
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def code_server() -> Iterator[CodeServer]:
    with CodeServer() as server:
        yield server


@pytest.fixture(scope="module")
def agent(code_server: CodeServer) -> Iterator[RealAgent]:
    with mock.patch.dict(os.environ, {"WATASU_CODE_PORT": str(code_server.port)}), RealAgent(SECRET) as real:
        AgentClient(real.port, secret=SECRET).init(auth=SECRET, secret=SECRET, env_vars={"SANDBOX_VAR": "sv"})
        yield real


def _dataplane(agent: RealAgent) -> dict[str, str]:
    return {"Authorization": f"Bearer {role_secret(SECRET, 'dataplane')}"}


def _run(agent: RealAgent, body: dict[str, object], **headers: str) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{agent.port}{RUN}", json=body, headers={**_dataplane(agent), **headers}, timeout=60
    )


def test_a_run_is_forwarded_and_answered_with_the_servers_body(agent: RealAgent) -> None:
    # given a bash run through the agent with the data-plane credential
    r = _run(agent, {"code": "echo code-ok; echo oops >&2", "language": "bash"})
    # then the code server's execution comes back unchanged
    assert r.status_code == 200, r.text
    logs = r.json()["execution"]["logs"]
    assert [m["line"] for m in logs["stdout"]] == ["code-ok\n"]
    assert [m["line"] for m in logs["stderr"]] == ["oops\n"]
    assert all(isinstance(m["timestamp"], float) for m in logs["stdout"])


def test_the_servers_errors_pass_through_in_the_error_shape(agent: RealAgent) -> None:
    # an unknown context and an unknown language keep their status and code
    missing = _run(agent, {"code": "true", "context_id": "nope"})
    assert (missing.status_code, missing.json()["error"]) == (404, "context_not_found")
    language = _run(agent, {"code": "1", "language": "cobol"})
    assert (language.status_code, language.json()["error"]) == (422, "language_unavailable")
    assert "python, bash" in language.json()["message"]


def test_contexts_are_created_listed_and_removed_through_the_agent(agent: RealAgent) -> None:
    base = f"http://127.0.0.1:{agent.port}/runtime/v1/code/contexts"
    body = {"language": "bash", "cwd": "/tmp"}
    created = requests.post(base, json=body, headers=_dataplane(agent), timeout=30)
    assert created.status_code == 200, created.text
    ctx = created.json()
    assert (ctx["language"], ctx["cwd"]) == ("bash", "/tmp")
    assert (
        _run(agent, {"code": "pwd", "context_id": ctx["id"]}).json()["execution"]["logs"]["stdout"][0]["line"]
        == "/tmp\n"
    )
    listed = requests.get(base, headers=_dataplane(agent), timeout=30).json()["contexts"]
    assert ctx["id"] in [c["id"] for c in listed]
    removed = requests.delete(f"{base}/{ctx['id']}", headers=_dataplane(agent), timeout=30)
    assert removed.status_code == 200
    assert _run(agent, {"code": "pwd", "context_id": ctx["id"]}).status_code == 404


def test_the_sandbox_env_reaches_code_and_a_clients_own_env_header_does_not(agent: RealAgent) -> None:
    # given the env vars /init gave the sandbox, and a client trying to set that header itself
    forged = base64.b64encode(json.dumps({"SANDBOX_VAR": "forged", "OTHER": "x"}).encode()).decode()
    r = _run(
        agent,
        {"code": 'echo "$SANDBOX_VAR|${OTHER-unset}"', "language": "bash"},
        **{"X-Watasu-Sandbox-Env": forged},
    )
    # then code sees the sandbox's value, never the client's
    assert r.json()["execution"]["logs"]["stdout"][0]["line"] == "sv|unset\n"


def test_per_run_envs_apply_to_that_run_only(agent: RealAgent) -> None:
    first = _run(agent, {"code": "echo $RUN_VAR", "language": "bash", "envs": {"RUN_VAR": "yes"}})
    assert first.json()["execution"]["logs"]["stdout"][0]["line"] == "yes\n"
    after = _run(agent, {"code": 'echo "${RUN_VAR-unset}"', "language": "bash"})
    assert after.json()["execution"]["logs"]["stdout"][0]["line"] == "unset\n"


def test_code_routes_refuse_a_missing_or_preview_credential(agent: RealAgent) -> None:
    body = {"code": "echo hi", "language": "bash"}
    anonymous = requests.post(f"http://127.0.0.1:{agent.port}{RUN}", json=body, timeout=30)
    assert anonymous.status_code == 401
    preview = _run(agent, body, Authorization=f"Bearer {role_secret(SECRET, 'preview')}")
    assert preview.status_code in (401, 403)


def test_a_streamed_run_reaches_the_client_line_by_line(agent: RealAgent, tmp_path: Path) -> None:
    # given a run that prints a line, then waits for a file the test creates only after seeing it
    gate = tmp_path / "gate"
    code = f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two"
    with requests.post(
        f"http://127.0.0.1:{agent.port}{RUN}",
        json={"code": code, "language": "bash"},
        headers={**_dataplane(agent), "Accept": "application/x-ndjson"},
        stream=True,
        timeout=60,
    ) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        lines = r.iter_lines()
        first = json.loads(next(lines))
        # then the first line arrived while the run still waits
        assert (first["type"], first["line"]) == ("stdout", "one\n")
        gate.touch()
        rest = [json.loads(line) for line in lines if line]
    assert [e["type"] for e in rest] == ["stdout", "end"]
    assert rest[0]["line"] == "two\n"
    assert [m["line"] for m in rest[-1]["execution"]["logs"]["stdout"]] == ["one\n", "two\n"]


def test_a_run_past_its_timeout_is_interrupted_and_the_context_keeps_its_state(agent: RealAgent) -> None:
    _run(agent, {"code": "KEPT=1", "language": "bash"})
    started = time.monotonic()
    timed_out = _run(agent, {"code": "sleep 60; echo never", "language": "bash", "timeout_seconds": 1})
    assert time.monotonic() - started < 30
    assert (timed_out.status_code, timed_out.json()["error"]) == (408, "execution_timeout")
    assert "Execution timed out" in timed_out.json()["message"]
    after = _run(agent, {"code": "echo kept=$KEPT", "language": "bash"})
    assert [m["line"] for m in after.json()["execution"]["logs"]["stdout"]] == ["kept=1\n"]


def test_a_client_that_hangs_up_interrupts_its_run(agent: RealAgent, tmp_path: Path) -> None:
    # given a run that signals it started and then sleeps a minute
    marker = tmp_path / "started"
    body = json.dumps({"code": f"touch {marker}; sleep 60", "language": "bash"}).encode()
    head = (
        f"POST {RUN} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {role_secret(SECRET, 'dataplane')}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
    sock.sendall(head + body)
    wait_until(marker.exists, timeout=30, what="the run started")
    # when the client hangs up
    sock.close()
    # then the context is free again long before the minute is over
    started = time.monotonic()
    after = _run(agent, {"code": "echo free", "language": "bash"})
    assert after.json()["execution"]["logs"]["stdout"][0]["line"] == "free\n"
    assert time.monotonic() - started < 30


def test_without_a_code_server_the_answer_says_which_template_has_one() -> None:
    # given an agent whose code port has nothing listening
    with mock.patch.dict(os.environ, {"WATASU_CODE_PORT": str(free_port())}), RealAgent(SECRET) as real:
        r = _run(real, {"code": "1"})
        contexts = requests.get(
            f"http://127.0.0.1:{real.port}/runtime/v1/code/contexts", headers=_dataplane(real), timeout=30
        )
    # then a 404 names the template to start from
    assert (r.status_code, r.json()["error"]) == (404, "code_interpreter_unavailable")
    assert "`code-interpreter`" in r.json()["message"]
    assert contexts.status_code == 404

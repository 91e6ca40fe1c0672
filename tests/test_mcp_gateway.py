"""The in-guest `mcp-gateway` program, run on the host: it is stdlib-only Python, so the
real program serves a real MCP server (one made with the `mcp` package) to the real `mcp`
client here, without a VM. tests/test_mcp_vm.py runs it in a sandbox through the edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from templates_app.provider import GUEST_DIR
from tests.edge_support import free_port, raw_request
from tests.waiting import wait_until

PROGRAM = GUEST_DIR / "mcp_gateway.py"
# The guest runs Debian 12's python3 (3.11); the host's, when it has one, is the closest stand-in.
PYTHON = shutil.which("python3.11") or "/usr/bin/python3"
ECHO_SERVER = """
import os
from mcp.server import MCPServer

app = MCPServer("echo")

@app.tool()
def echo(text: str) -> str:
    \"\"\"Echo text after the server's GREETING.\"\"\"
    return os.environ.get("GREETING", "") + text

app.run()
"""
TOKEN = "t" * 43


@dataclass
class Gateway:
    url: str
    etc: Path
    process: subprocess.Popen[bytes]

    def health(self, wait: float = 60) -> tuple[int, dict[str, Any]]:
        """`mcp-gateway health --wait`, as the platform asks it in the guest."""
        done = subprocess.run(
            [*_program(self.etc), "health", "--wait", str(wait), "--port", self.url.split(":")[2][:-4]],
            capture_output=True,
            timeout=wait + 30,
        )
        return done.returncode, json.loads(done.stdout)


def _program(etc: Path) -> list[str]:
    """The program with its files under `etc` instead of /etc/mcp-gateway and /opt."""
    return [PYTHON, str(PROGRAM), "--etc", str(etc), "--servers-dir", str(etc / "servers")]


@contextlib.contextmanager
def gateway_started(tmp_path: Path, servers: dict[str, Any], port: int | None = None) -> Iterator[Gateway]:
    """The gateway program serving `servers` (`echo` is installed) on `port`, stopped after."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / ".token").write_text(TOKEN + "\n")
    (etc / "config.json").write_text(json.dumps({"servers": servers}))
    (tmp_path / "echo.py").write_text(ECHO_SERVER)
    (etc / "servers.json").write_text(
        json.dumps({"echo": {"command": sys.executable, "args": [str(tmp_path / "echo.py")]}})
    )
    port = port or free_port()
    process = subprocess.Popen(
        [*_program(etc), "serve", "--port", str(port), "--pidfile", str(etc / "pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Gateway(f"http://127.0.0.1:{port}/mcp", etc, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """One gateway serving the echo server with an env of its own."""
    with gateway_started(tmp_path, {"echo": {"env": {"GREETING": "hi "}}}) as started:
        yield started


async def _session(url: str, token: str, host: str | None = None) -> tuple[list[str], Any]:
    """The real client: handshake, list the tools, call one (`host`: the edge's MCP host)."""
    headers = {"Authorization": f"Bearer {token}", **({"Host": host} if host else {})}
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        result = await session.call_tool("echo__echo", {"text": "there"})
    return [tool.name for tool in tools.tools], result


def test_a_client_with_the_token_lists_and_calls_the_servers_tools(gateway: Gateway) -> None:
    # given a gateway whose server is up
    status, health = gateway.health()
    assert (status, health["state"], health["servers"]) == (0, "ready", {"echo": {"state": "ready"}})

    # when the real MCP client connects with the token
    names, result = asyncio.run(_session(gateway.url, TOKEN))

    # then the tool is named <server>__<tool> and runs with the server's own env
    assert names == ["echo__echo"]
    assert result.is_error is False
    assert [c.text for c in result.content] == ["hi there"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_without_the_token_every_route_is_a_401(gateway: Gateway, authorization: str | None) -> None:
    assert gateway.health()[0] == 0
    headers = {"Authorization": authorization} if authorization else {}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}

    answers = [
        httpx.post(gateway.url, json=init, headers=headers),
        httpx.get(gateway.url.replace("/mcp", "/health"), headers=headers),
        httpx.delete(gateway.url, headers=headers),
    ]

    assert [a.status_code for a in answers] == [401, 401, 401]
    assert answers[0].headers["www-authenticate"] == 'Bearer realm="mcp-gateway"'
    assert "Mcp-Session-Id" not in answers[0].headers


def test_the_transport_follows_streamable_http(gateway: Gateway) -> None:
    assert gateway.health()[0] == 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-03-26"}}

    # an event-stream-only client gets its answer as one SSE event, with a session id
    first = httpx.post(gateway.url, json=init, headers={**auth, "Accept": "text/event-stream"})
    assert first.headers["content-type"] == "text/event-stream"
    event = json.loads(first.text.split("data: ", 1)[1])
    assert event["result"]["protocolVersion"] == "2025-03-26"
    session = {**auth, "Mcp-Session-Id": first.headers["mcp-session-id"]}

    # a request without the session, or with an unknown one, is refused; GET is a 405
    tools = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    assert httpx.post(gateway.url, json=tools, headers=auth).status_code == 400
    assert httpx.post(gateway.url, json=tools, headers={**auth, "Mcp-Session-Id": "nope"}).status_code == 404
    assert httpx.get(gateway.url, headers=session).status_code == 405
    # a notification is a 202; an unknown method a JSON-RPC error; a call to no server says so
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert httpx.post(gateway.url, json=note, headers=session).status_code == 202
    unknown = httpx.post(gateway.url, json={**tools, "method": "nope/x"}, headers=session).json()
    assert unknown["error"]["code"] == -32601
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "other__x"}}
    assert (
        "unknown tool 'other__x'"
        in httpx.post(gateway.url, json=call, headers=session).json()["error"]["message"]
    )
    # DELETE ends the session
    assert httpx.delete(gateway.url, headers=session).status_code == 204
    assert httpx.post(gateway.url, json=tools, headers=session).status_code == 404


def test_a_server_that_cannot_start_is_failed_with_its_error_and_stderr(tmp_path: Path) -> None:
    crash = "import sys; sys.stderr.write('missing API_KEY\\n'); sys.exit(3)"
    servers = {"echo": {}, "broken": {"command": sys.executable, "args": ["-c", crash]}, "absent": {}}

    with gateway_started(tmp_path, servers) as gateway:
        # the first failure ends the platform's wait (`absent` fails at once); this one exits
        status, health = wait_until(
            lambda: gateway.health(wait=0),
            30,
            "the crashing server to be reported failed",
            until=lambda answer: answer[1].get("servers", {}).get("broken", {}).get("state") == "failed",
        )

        assert status == 1 and health["state"] == "failed"
        broken = health["servers"]["broken"]
        assert broken["state"] == "failed"
        assert "exit status 3" in broken["error"] and "missing API_KEY" in broken["error"]
        assert broken["stderr_tail"] == "missing API_KEY"
        assert health["servers"]["absent"]["error"].startswith(
            "it is not installed in this template; build a template from mcp-gateway "
            "with add_mcp_server('absent') (installed: echo)"
        )


@pytest.mark.parametrize(
    ("arg", "says"),
    [
        ("nosuch", "unknown MCP server 'nosuch': use one of everything, fetch, filesystem, git"),
        ("pypi:foo;rm -rf /", "'pypi:foo;rm -rf /' is not a server"),
        ("npm:../x", "'npm:../x' is not a server"),
        ("Bad=pypi:x", "'Bad=pypi:x' is not a server"),
    ],
)
def test_pull_refuses_what_it_cannot_install_before_installing_anything(
    tmp_path: Path, arg: str, says: str
) -> None:
    done = subprocess.run(
        [*_program(tmp_path), "pull", "time", arg],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    assert says in done.stderr
    assert not (tmp_path / "servers").exists() and not (tmp_path / "servers.json").exists()


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        ("time", "time"),
        ("pypi:mcp-server-time==2025.9.25", "time"),
        ("npm:@modelcontextprotocol/server-filesystem@1.0.0", "filesystem"),
        ("npm:weather-mcp", "weather"),
        ("clock=pypi:mcp-server-time", "clock"),
    ],
)
def test_pull_names_servers_as_tools_will_be_prefixed(arg: str, name: str) -> None:
    sys.path.insert(0, str(GUEST_DIR))
    try:
        import mcp_gateway
    finally:
        sys.path.remove(str(GUEST_DIR))

    assert mcp_gateway.parse_pull(arg)[0] == name


def test_bodies_chunked_or_hostile_are_read_or_refused_cleanly(gateway: Gateway) -> None:
    assert gateway.health()[0] == 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}).encode()

    chunked = httpx.post(gateway.url, content=iter([init[:10], init[10:]]), headers=auth)
    port = int(gateway.url.split(":")[2][:-4])
    bad_length = raw_request(port, "POST", "/mcp", {**auth, "Content-Length": "²"}, b"{}")
    too_large = raw_request(port, "POST", "/mcp", {**auth, "Content-Length": str(5 * 2**20)}, b"x")
    not_json = httpx.post(gateway.url, content=b"{", headers=auth)

    assert chunked.status_code == 200 and chunked.json()["result"]["serverInfo"]["name"] == "mcp-gateway"
    assert [bad_length[0], too_large[0], not_json.status_code] == [400, 413, 400]
    assert not_json.json()["error"]["code"] == -32700

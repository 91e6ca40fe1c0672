"""`mcp` on create through the public SDK, and a real MCP client through the edge.

Without a template the create runs `mcp-gateway`, which carries the `time` server: a server
it does not have (`git`) is a 422 naming the server, and `time` is served: `get_mcp_url()` is
the preview host of port 50005, `get_mcp_token()` the token, and the `mcp` client does the
handshake and a tool call with it; without it, or with another, the gateway answers 401.
Another team's key does not find the sandbox. A template built from `mcp-gateway` with
`add_mcp_server("time")` (the SDK's helper: `mcp-gateway pull time` as root in the build VM,
a no-op for a server already there) serves it too, and its copy from a disk-only checkpoint
serves the same servers with a new token. Prints the timings as JSON.

Argument: another team's API key. The embedded edge is plain HTTP and `*.localhost` names
need not resolve here: the client connects to the edge's address with the MCP URL's host
in `Host`, as a TLS terminator in front would forward it.
"""

import asyncio
import json
import os
import re
import sys
import time
from urllib.parse import urlsplit

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from watasu import Sandbox, Template
from watasu.exceptions import InvalidArgumentException, NotFoundException

outsider_key = sys.argv[1]
edge = urlsplit(os.environ["WATASU_API_URL"])
timings: dict[str, float] = {}


def seconds(since: float) -> float:
    return round(time.monotonic() - since, 1)


async def call_time_tool(host: str, token: str) -> tuple[list[str], str]:
    """The real client, over the edge, with the gateway token."""
    headers = {"Authorization": f"Bearer {token}", "Host": host}
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(f"http://{edge.netloc}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        result = await session.call_tool("time__get_current_time", {"timezone": "UTC"})
    assert result.is_error is False, result
    return sorted(tool.name for tool in tools.tools), result.content[0].text


# mcp without a template: the mcp-gateway template, which carries `time` and nothing else.
started = time.monotonic()
try:
    Sandbox.create(mcp={"git": {}}, timeout=120)
    raise AssertionError("a server the template does not have was started")
except InvalidArgumentException as exc:
    assert "MCP server 'git' failed to start" in str(exc), exc
    assert "not installed in this template" in str(exc) and "add_mcp_server('git')" in str(exc), exc
timings["create_refused_s"] = seconds(started)

started = time.monotonic()
sandbox = Sandbox.create(mcp={"time": {"env": {"TZ": "UTC"}}}, timeout=300)
timings["create_with_mcp_s"] = seconds(started)
try:
    url = urlsplit(sandbox.get_mcp_url())
    token = sandbox.get_mcp_token()
    assert url.scheme == "https" and url.path == "/mcp", url
    assert re.fullmatch(rf"p50005-[a-z0-9]+\.sandbox\.localhost:{edge.port}", url.netloc), url
    assert token and len(token) >= 32, token

    started = time.monotonic()
    names, text = asyncio.run(call_time_tool(url.netloc, token))
    timings["handshake_and_call_s"] = seconds(started)
    assert names == ["time__convert_time", "time__get_current_time"], names
    assert json.loads(text)["timezone"] == "UTC", text

    probe = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    for authorization in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = httpx.post(
            f"http://{edge.netloc}/mcp", json=probe, headers={"Host": url.netloc, **authorization}
        )
        assert refused.status_code == 401, (refused.status_code, refused.text)

    for attempt in (Sandbox.connect, Sandbox.get_info):
        try:
            attempt(sandbox.sandbox_id, api_key=outsider_key)
            raise AssertionError("another team reached the sandbox")
        except NotFoundException:
            pass
finally:
    sandbox.kill()

# A template with servers, built as customers build one (`time` is already there: a no-op pull).
logs: list[str] = []
started = time.monotonic()
Template.build(
    Template().from_template("mcp-gateway").add_mcp_server("time"),
    "mcp-time",
    cpu_count=1,
    memory_mb=512,
    on_build_logs=lambda entry: logs.append(str(getattr(entry, "message", ""))),
)
timings["template_build_s"] = seconds(started)
assert any(m.startswith("mcp-gateway: time already installed") for m in logs), logs[-20:]

sandbox = Sandbox.create("mcp-time", mcp={"time": {}}, timeout=300)
try:
    token = sandbox.get_mcp_token()
    # A disk-only checkpoint holds the config but no process: its copy starts the gateway
    # again, with a token of its own.
    snapshot = sandbox.create_snapshot()
    started = time.monotonic()
    copy = Sandbox.create(snapshot.snapshot_id)
    timings["restore_with_mcp_s"] = seconds(started)
    try:
        copy_token = copy.get_mcp_token()
        assert copy_token and copy_token != token, (copy_token, token)
        names, text = asyncio.run(call_time_tool(urlsplit(copy.get_mcp_url()).netloc, copy_token))
        assert "datetime" in json.loads(text), text
    finally:
        copy.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)
finally:
    sandbox.kill()

print(json.dumps(timings))

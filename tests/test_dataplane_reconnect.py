"""The real SDK reconnects a process stream after the edge drops its socket."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.conftest import Actor
from tests.edge_support import ServerThread, free_port
from tests.sdk import HERE, scenario_env

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]


def test_stream_resumes_at_the_right_cursor_after_a_dropped_socket(
    owner: Actor, base_version, vm_cleanup, settings
) -> None:  # type: ignore[no-untyped-def]
    from watasu.asgi import application

    sockets: list[str] = []

    async def recording(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "websocket":
            sockets.append(f"{scope['path']}?{scope['query_string'].decode()}")
        await application(scope, receive, send)

    port = free_port()
    settings.PUBLIC_URL = f"http://127.0.0.1:{port}"
    first = ServerThread(recording, port).__enter__()
    created = requests.post(
        f"{first.url}/v1/sandboxes",
        json={"timeout": 300},
        timeout=150,
        headers={"Authorization": f"Bearer {owner.write_key}"},
    )
    assert created.status_code == 201, created.text
    env = scenario_env(
        api_url=f"{first.url}/v1", api_key=owner.write_key, SANDBOX_ID=str(created.json()["sandbox"]["id"])
    )
    client = subprocess.Popen(
        [sys.executable, "-P", str(HERE / "reconnect.py")],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        # given the command is streaming to the client
        assert client.stdout is not None and client.stdout.readline() == "STARTED\n"
        # and has received its first lines (the drop lands mid-stream, past line 1)
        assert client.stdout.readline() == "STREAMING\n"
        # when the edge goes away (every socket dropped) and comes back on the same port
        first.__exit__(None, None, None)
        dropped_at = len(sockets)
        with ServerThread(recording, port):
            out, err = client.communicate(timeout=120)
    finally:
        client.kill()
    # then the client saw every line once, in order
    assert client.returncode == 0, f"{out}\n{err}"
    assert out == "ok\n"
    # and it got there by reattaching to the same process after the drop, past line 1
    reattached = sockets[dropped_at:]
    assert len(reattached) >= 1 and all("/connect?since=" in s for s in reattached), sockets
    assert int(reattached[0].rsplit("=", 1)[1]) > 0

"""The dashboard terminal's ticket at the edge: a process WebSocket may carry `?ticket=`
instead of `Authorization` (a browser cannot set that header on a WebSocket), only from
the platform's own origin, only on the process routes, and the agent never sees it.

The edge runs for real (uvicorn serving `watasu.asgi.application`) in front of the real
guest agent run on the host (tests/edge_support.RealAgent); one test uses the fake agent
only to read the query string the agent receives.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
import requests
from django.core import signing
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from sandboxes import sessions
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.agent_client import AgentClient
from sandboxes.sessions import dashboard_ticket_mint, data_plane_url, session_mint
from teams.models import Membership, Role, Team, User
from tests.conftest import Actor
from tests.edge_support import FakeAgent, RealAgent, ServerThread
from tests.factories import SandboxFactory
from tests.waiting import wait_until
from watasu import crypto

SECRET = "terminal-agent-secret-" + "t" * 20
edge_db = pytest.mark.django_db(transaction=True)
PROCESS = "/runtime/v1/process"


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


def _sandbox(team: Team, port: int, **fields) -> Sandbox:  # type: ignore[no-untyped-def]
    return SandboxFactory(
        team=team,
        state=SandboxState.READY,
        agent_port=port,
        agent_secret_encrypted=crypto.encrypt_text(SECRET),
        **fields,
    )


def _ws(sandbox: Sandbox, path: str, ticket: str) -> str:
    return data_plane_url(sandbox).replace("http://", "ws://") + f"{path}?ticket={ticket}"


def _refusal(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=headers or {}, open_timeout=10)
    response = refused.value.response
    return response.status_code, json.loads(response.body)["error"]


def _run(ws: ClientConnection, command: str) -> bytes:
    """Start `command` in a PTY over the socket; its output until it exits."""
    ws.send(
        json.dumps(
            {"type": "start", "cmd": "/bin/sh", "args": ["-c", command], "pty": {"cols": 90, "rows": 20}}
        )
    )
    output, frames = b"", []

    def exited() -> bool:
        nonlocal output
        frame = json.loads(ws.recv(timeout=30))
        frames.append(frame["type"])
        if frame["type"] == "pty":
            output += base64.b64decode(frame["data"])
        return frame["type"] == "exit"

    wait_until(exited, 60, "the process to exit", seen=lambda: frames)
    assert frames[0] == "started"
    return output


@edge_db
def test_a_ticket_opens_a_pty_from_the_platforms_origin(
    edge: ServerThread, real_agent: RealAgent, owner: Actor
) -> None:
    # given a sandbox and a ticket minted for its owner
    sandbox = _sandbox(owner.personal_team, real_agent.port)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)

    # when the dashboard's page opens a process socket with it, from the platform's origin
    with ws_connect(
        _ws(sandbox, PROCESS, ticket), additional_headers={"Origin": edge.url}, open_timeout=10
    ) as ws:
        output = _run(ws, "stty size; echo from-the-pty")

    # then the command ran in a PTY of the asked size
    assert b"20 90" in output and b"from-the-pty" in output


@edge_db
def test_a_ticket_opens_one_socket_only(edge: ServerThread, real_agent: RealAgent, owner: Actor) -> None:
    # given a ticket that opened its socket
    sandbox = _sandbox(owner.personal_team, real_agent.port)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)
    url, origin = _ws(sandbox, PROCESS, ticket), {"Origin": edge.url}
    with ws_connect(url, additional_headers=origin, open_timeout=10) as ws:
        _run(ws, "true")

    # when it is presented again, within its lifetime
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=origin, open_timeout=10)

    # then the handshake is refused: a leaked ticket opens nothing more
    assert refused.value.response.status_code == 401
    assert b"used already" in refused.value.response.body


@edge_db
def test_an_open_terminal_is_closed_when_its_user_is_demoted(
    edge: ServerThread, real_agent: RealAgent, member: Actor, acme: Team, settings
) -> None:
    # given a member's terminal, open on a long-running shell
    settings.EDGE_ACCESS_RECHECK_SECONDS = 1
    sandbox = _sandbox(acme, real_agent.port)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=member.user)
    with ws_connect(
        _ws(sandbox, PROCESS, ticket), additional_headers={"Origin": edge.url}, open_timeout=10
    ) as ws:
        ws.send(
            json.dumps({"type": "start", "cmd": "sleep", "args": ["60"], "pty": {"cols": 80, "rows": 24}})
        )
        started = json.loads(ws.recv(timeout=30))
        assert started["type"] == "started"

        # when an owner makes the member a viewer
        Membership.objects.filter(user=member.user, team=acme).update(role=Role.VIEWER)

        # then the socket is closed within the re-check interval, saying why
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    AgentClient(real_agent.port, secret=SECRET).request("DELETE", f"{PROCESS}/{started['pid']}?signal=KILL")


@edge_db
def test_a_ticket_attaches_to_a_running_process(
    edge: ServerThread, real_agent: RealAgent, owner: Actor
) -> None:
    sandbox = _sandbox(owner.personal_team, real_agent.port)
    pid = _start_sleeper(sandbox)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)

    url = _ws(sandbox, f"{PROCESS}/{pid}/connect", ticket)
    with ws_connect(url, additional_headers={"Origin": edge.url}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
    AgentClient(real_agent.port, secret=SECRET).request("DELETE", f"{PROCESS}/{pid}?signal=KILL")


def _start_sleeper(sandbox: Sandbox) -> str:
    url = data_plane_url(sandbox).replace("http://", "ws://") + PROCESS
    headers = {"Authorization": f"Bearer {session_mint(sandbox=sandbox).token}"}
    with ws_connect(url, additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "cmd": "sleep", "args": ["60"]}))
        return str(json.loads(ws.recv(timeout=30))["pid"])


def _expired(sandbox: Sandbox, user: User) -> str:
    payload = {
        "s": sandbox.pk,
        "e": sandbox.session_epoch,
        "u": user.pk,
        "x": int(time.time()) - 1,
        "n": "00",
    }
    return sessions.TICKET_PREFIX + signing.dumps(payload, salt=sessions._TICKET_SALT)


@edge_db
def test_tickets_are_refused_at_the_handshake(
    edge: ServerThread, real_agent: RealAgent, owner: Actor, member: Actor, acme: Team
) -> None:
    # given a sandbox of acme, another one, and tickets that must not open it
    sandbox, other = _sandbox(acme, real_agent.port), _sandbox(acme, real_agent.port)
    good = dashboard_ticket_mint(sandbox=sandbox, user=member.user)
    demoted = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)
    Membership.objects.filter(user=owner.user, team=acme).update(role=Role.VIEWER)
    mine = {"Origin": edge.url}
    cases = {
        "foreign origin": (_ws(sandbox, PROCESS, good), {"Origin": "https://evil.test"}, (403, "forbidden")),
        "preview origin": (
            _ws(sandbox, PROCESS, good),
            {"Origin": f"http://p3000-{sandbox.route_token}.sandbox.localhost:{edge.port}"},
            (403, "forbidden"),
        ),
        "null origin": (_ws(sandbox, PROCESS, good), {"Origin": "null"}, (403, "forbidden")),
        "no origin": (_ws(sandbox, PROCESS, good), {}, (403, "forbidden")),
        "expired": (_ws(sandbox, PROCESS, _expired(sandbox, member.user)), mine, (401, "unauthorized")),
        "other sandbox": (_ws(other, PROCESS, good), mine, (401, "unauthorized")),
        "demoted to viewer": (_ws(sandbox, PROCESS, demoted), mine, (401, "unauthorized")),
        "session token as ticket": (
            _ws(sandbox, PROCESS, session_mint(sandbox=sandbox).token),
            mine,
            (401, "unauthorized"),
        ),
        "garbage": (_ws(sandbox, PROCESS, "wdt_nonsense"), mine, (401, "unauthorized")),
        "file watch route": (
            _ws(sandbox, "/runtime/v1/files/watch", good) + "&path=/tmp",
            mine,
            (401, "unauthorized"),
        ),
    }

    agent = AgentClient(real_agent.port, secret=SECRET)
    before = len(agent.processes())

    # when each is tried, then each is refused, and no process was started
    for case, (url, headers, expected) in cases.items():
        assert _refusal(url, headers) == expected, case
    assert len(agent.processes()) == before
    # while the good ticket from the right origin still works
    with ws_connect(_ws(sandbox, PROCESS, good), additional_headers=mine, open_timeout=10) as ws:
        assert b"still-fine" in _run(ws, "echo still-fine")


@edge_db
def test_a_destroyed_sandbox_refuses_its_tickets(
    edge: ServerThread, real_agent: RealAgent, owner: Actor
) -> None:
    sandbox = _sandbox(owner.personal_team, real_agent.port)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=SandboxState.DESTROYED)

    assert _refusal(_ws(sandbox, PROCESS, ticket), {"Origin": edge.url}) == (404, "sandbox_not_found")


@edge_db
def test_a_ticket_does_nothing_over_plain_http(
    edge: ServerThread, real_agent: RealAgent, owner: Actor
) -> None:
    sandbox = _sandbox(owner.personal_team, real_agent.port)
    ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)
    base = data_plane_url(sandbox)

    for path in (PROCESS, "/runtime/v1/files", "/runtime/v1/directories"):
        response = requests.get(
            f"{base}{path}",
            params={"ticket": ticket, "path": "/tmp"},
            headers={"Origin": edge.url},
            timeout=10,
        )
        assert response.status_code == 401, path
        assert response.json()["error"] == "unauthorized", path


@edge_db
def test_the_agent_never_sees_the_ticket_and_bearer_sessions_are_unchanged(
    edge: ServerThread, owner: Actor
) -> None:
    fake = FakeAgent(SECRET)
    with ServerThread(fake) as agent_server:
        sandbox = _sandbox(owner.personal_team, agent_server.port)
        ticket = dashboard_ticket_mint(sandbox=sandbox, user=owner.user)
        url = _ws(sandbox, PROCESS, ticket) + "&since=3&tick%65t=again"
        with ws_connect(url, additional_headers={"Origin": edge.url}, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10)) == {"type": "ready"}

        # a Bearer session with a stray `ticket` in its query is served as before, query and all
        bearer = {"Authorization": f"Bearer {session_mint(sandbox=sandbox).token}"}
        plain = data_plane_url(sandbox).replace("http://", "ws://") + PROCESS + "?ticket=x"
        with ws_connect(plain, additional_headers=bearer, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10)) == {"type": "ready"}

    assert [r["query"] for r in fake.requests if "query" in r] == ["since=3", "ticket=x"]

"""The edge against the real guest agent: traversal, credentials per route, cookies, headers.

The agent runs on the host (tests/edge_support.RealAgent), so what reaches it is judged
by the code that runs in every VM, not by a stand-in. Each traversal form is sent byte
for byte (http.client; requests would remove dot segments before sending), and the
proof that nothing got through is the agent's own effect: a command that would touch a
marker file on this host (a file write the agent would make) or the agent still holding
its secret (an /init that would have taken it over).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.agent_client import AgentClient, role_secret
from sandboxes.sessions import session_mint
from teams.models import Team
from tests.edge_support import EchoApp, RealAgent, raw_request
from tests.factories import SandboxFactory
from watasu import crypto
from watasu.logredact import RedactRouteTokens, redact

SECRET = "real-agent-secret-" + "s" * 20
edge_db = pytest.mark.django_db(transaction=True)

# Every way found to make a path mean something else one hop later; TARGET is the route
# each test aims at (one that would do harm if the path reached it).
TRAVERSALS = [
    "/../../TARGET",
    "/%2e%2e/%2e%2e/TARGET",
    "/%2E%2E/%2e./TARGET",
    "/.%2e/.%2E/TARGET",
    "/..%2f..%2fTARGET",
    "/a/..%2F..%2F..%2FTARGET",
    "/x%2F..%2F..%2FTARGET",
    "/./TARGET",
    "/%2e/TARGET",
    "//TARGET",
    "/a//b",
    "/..%5c..%5cTARGET",
    "/%252e%252e/%252e%252e/TARGET",
    "/a%00/TARGET",
    "/a%0d%0aX-Injected:%201",
    "/%ff%fe/x",
    "/..",
]


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


def _sandbox(team: Team, agent: RealAgent) -> Sandbox:
    return SandboxFactory(
        team=team,
        state=SandboxState.READY,
        agent_port=agent.port,
        agent_secret_encrypted=crypto.encrypt_text(SECRET),
    )


def _write_target(marker: Path) -> str:
    """The data-plane file write that would create ``marker`` (PUT, the body as its contents)."""
    return f"runtime/v1/files?path={quote(str(marker))}"


# --- traversal ------------------------------------------------------------------------------------


@edge_db
@pytest.mark.parametrize("tail", TRAVERSALS)
def test_preview_traversal_never_reaches_the_agents_other_routes(
    edge, real_agent, owner, tail, tmp_path
) -> None:
    # given a sandbox whose preview route token is public, and no credentials at all
    sandbox = _sandbox(owner.personal_team, real_agent)
    marker = tmp_path / "ran"

    # when the path form and the host form are sent paths that climb out of /proxy/<port>
    # to the data plane's file write
    tail = tail.replace("TARGET", _write_target(marker))
    path_form = raw_request(
        edge.port, "PUT", f"/sandboxes-preview/{sandbox.route_token}/1{tail}", body=b"ran"
    )
    host_form = raw_request(
        edge.port, "PUT", tail, body=b"ran", headers={"Host": f"p1-{sandbox.route_token}.sandbox.localhost"}
    )

    # then the edge refuses both before the agent, in the error shape, and nothing was written
    for status, headers, body in (path_form, host_form):
        assert status == 400, body
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "invalid_path"
    assert not marker.exists()


@edge_db
@pytest.mark.parametrize("tail", [t.replace("TARGET", "init") for t in TRAVERSALS])
def test_data_plane_traversal_is_refused_even_with_a_valid_session(edge, real_agent, owner, tail) -> None:
    # given a valid session token for the sandbox
    sandbox = _sandbox(owner.personal_team, real_agent)
    token = session_mint(sandbox=sandbox).token

    # when the data-plane path climbs from /runtime/v1 to /init
    status, _, body = raw_request(
        edge.port,
        "POST",
        f"/sandboxes-dp/{sandbox.route_token}/runtime/v1{tail}",
        headers={"Authorization": f"Bearer {token}"},
        body=json.dumps({"secret": "x" * 40}).encode(),
    )

    # then it is refused, and the agent still holds its secret
    assert (status, json.loads(body)["error"]) == (400, "invalid_path")
    assert AgentClient(real_agent.port, secret=SECRET).processes() == []


@edge_db
def test_websocket_traversal_is_refused_at_the_handshake(edge, real_agent, owner) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    sandbox = _sandbox(owner.personal_team, real_agent)
    token = session_mint(sandbox=sandbox).token
    url = edge.url.replace("http://", "ws://") + f"/sandboxes-dp/{sandbox.route_token}/runtime/v1/%2e%2e/x"

    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10)

    assert refused.value.response.status_code == 400


@edge_db
def test_ordinary_paths_still_reach_the_agent(edge, real_agent, owner, tmp_path) -> None:
    # given a file on the host the real agent serves, and names with dots that are not segments
    sandbox = _sandbox(owner.personal_team, real_agent)
    (tmp_path / "a..b.txt").write_text("dots are fine")
    auth = {"Authorization": f"Bearer {session_mint(sandbox=sandbox).token}"}

    # when it is read through the data plane
    response = requests.get(
        f"{edge.url}/sandboxes-dp/{sandbox.route_token}/runtime/v1/files",
        params={"path": str(tmp_path / "a..b.txt")},
        headers=auth,
        timeout=30,
    )

    # then it arrives, and the agent names no server software
    assert (response.status_code, response.text) == (200, "dots are fine")
    assert "server" not in response.headers


# --- credentials per route, on the agent itself --------------------------------------------------


def test_the_agent_takes_each_credential_only_on_its_own_routes(real_agent, tmp_path) -> None:
    # given the three credentials the agent knows
    control, dataplane, preview = SECRET, role_secret(SECRET, "dataplane"), role_secret(SECRET, "preview")
    marker = tmp_path / "ran"

    def status(method: str, path: str, token: str, body: bytes = b"{}") -> int:
        return raw_request(real_agent.port, method, path, {"Authorization": f"Bearer {token}"}, body)[0]

    takeover = json.dumps({"secret": "y" * 40}).encode()

    # then the preview credential opens /proxy/* only (502: nothing listens on that port)
    assert status("GET", "/proxy/1/", preview) == 502
    assert status("GET", "/runtime/v1/files?path=/etc/hostname", preview) == 401
    assert status("PUT", "/" + _write_target(marker), preview, b"ran") == 401
    assert status("GET", "/runtime/v1/process", preview) == 401
    assert status("POST", "/init", preview, takeover) == 401
    # the data-plane credential opens /runtime/v1/* only
    assert status("GET", "/runtime/v1/files?path=/etc/hostname", dataplane) == 200
    assert status("GET", "/runtime/v1/process", dataplane) == 200
    assert status("GET", "/proxy/1/", dataplane) == 401
    assert status("POST", "/init", dataplane, takeover) == 401
    # and the agent's routes match literally: no traversal inside the agent either
    assert status("POST", "/runtime/v1/../init", dataplane, takeover) == 404
    assert status("PUT", "/proxy/1/../../" + _write_target(marker), preview, b"ran") == 502
    assert not marker.exists()
    # the host's legacy routes are gone, for every credential: one process registry
    assert status("POST", "/exec", control, json.dumps({"cmd": ["touch", str(marker)]}).encode()) == 404
    assert status("GET", "/processes", control) == 404
    assert status("GET", "/runtime/v1/process", control) == 200
    assert not marker.exists()
    # and the secret is still the agent's: none of the /init calls above took it over
    assert AgentClient(real_agent.port, secret=SECRET).processes() == []


def test_fragmented_websocket_messages_are_bounded_as_they_arrive(real_agent) -> None:
    # given a process socket on the agent
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(
        f"ws://127.0.0.1:{real_agent.port}/runtime/v1/process",
        max_size=None,
        additional_headers={"Authorization": f"Bearer {SECRET}"},
        open_timeout=10,
    ) as ws:
        # when a message arrives in 1 MiB fragments past the 64 MiB bound
        piece = "x" * 2**20
        with pytest.raises(ConnectionClosed):
            ws.send(iter([piece] * 100))
            ws.recv(timeout=60)

    # then the agent hung up on it (1009, or a reset while we were still sending) and serves on
    assert AgentClient(real_agent.port, secret=SECRET).processes() == []


# --- cookies and headers through previews --------------------------------------------------------


@edge_db
def test_no_cookie_or_header_crosses_from_one_team_to_another(edge, real_agent, owner, outsider) -> None:
    # given two teams' sandboxes behind the real agent, and an app that sets cookies
    with EchoApp() as app:
        ours, theirs = _sandbox(owner.personal_team, real_agent), _sandbox(outsider.personal_team, real_agent)
        ours_host = f"p{app.port}-{ours.route_token}.sandbox.localhost:{edge.port}"
        theirs_host = f"p{app.port}-{theirs.route_token}.sandbox.localhost:{edge.port}"

        # when our app sets a cookie, then their sandbox is asked without any cookie
        set_cookie = requests.get(f"{edge.url}/?set=session%3Dours", headers={"Host": ours_host}, timeout=30)
        status, _, body = raw_request(edge.port, "GET", "/", {"Host": theirs_host})

    # then our own origin got its host-only cookie, their app saw none, and no header
    # reached it that the client did not send (no Accept-Encoding, User-Agent, credential)
    assert set_cookie.headers["set-cookie"] == "session=ours"
    assert status == 200
    received = json.loads(body)["headers"]
    assert "cookie" not in received
    assert set(received) == {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
    assert received["host"] == received["x-forwarded-host"] == theirs_host  # not the agent's port


@edge_db
def test_mask_request_host_is_the_host_a_preview_app_sees(edge, real_agent, owner) -> None:
    # given a sandbox whose policy masks the Host previews forward with
    with EchoApp() as app:
        sandbox = _sandbox(owner.personal_team, real_agent)
        response = owner.client().put(
            f"/v1/sandboxes/{sandbox.pk}/network",
            {"mask_request_host": "${PORT}-app.example.com"},
            format="json",
        )
        assert response.status_code == 200, response.content
        host = f"p{app.port}-{sandbox.route_token}.sandbox.localhost:{edge.port}"

        status, _, body = raw_request(edge.port, "GET", "/", {"Host": host})

    # then the app sees the masked host, with the port previewed in it; the original is forwarded
    assert status == 200
    received = json.loads(body)["headers"]
    assert received["host"] == f"{app.port}-app.example.com"
    assert received["x-forwarded-host"] == host


@edge_db
def test_path_form_previews_get_no_cookies_and_a_sandboxed_origin(edge, real_agent, owner) -> None:
    # given a preview served under the platform's own origin (the path form)
    with EchoApp() as app:
        sandbox = _sandbox(owner.personal_team, real_agent)
        url = f"{edge.url}/sandboxes-preview/{sandbox.route_token}/{app.port}/"

        # when the browser sends the platform's cookies and the app tries to set one
        response = requests.get(
            url,
            params={"set": "stolen=1; Path=/"},
            headers={"Cookie": "sessionid=admin-session; csrftoken=t"},
            timeout=30,
        )

    # then the app never saw the cookies, its Set-Cookie was dropped, and the page is sandboxed
    assert response.status_code == 200
    assert "cookie" not in response.json()["headers"]
    assert "set-cookie" not in response.headers
    assert response.headers["content-security-policy"].startswith("sandbox ")
    assert "allow-same-origin" not in response.headers["content-security-policy"]


@edge_db
def test_host_form_previews_keep_their_cookies_to_their_own_host(edge, real_agent, owner) -> None:
    with EchoApp() as app:
        sandbox = _sandbox(owner.personal_team, real_agent)
        host = f"p{app.port}-{sandbox.route_token}.sandbox.localhost:{edge.port}"

        # when the app sets a host-only and a domain-wide cookie, and the client sends one
        response = requests.get(
            f"{edge.url}/",
            headers={"Host": host, "Cookie": "mine=1"},
            timeout=30,
            params=[("set", "host_only=1"), ("set", "wide=1; Domain=sandbox.localhost")],
        )

    # then the app's own cookie round-trips, the one that would reach sibling sandboxes is dropped
    assert response.json()["headers"]["cookie"] == "mine=1"
    assert response.raw.headers.getlist("set-cookie") == ["host_only=1"]
    assert response.headers["content-security-policy"] == "default-src *"


# --- logs -----------------------------------------------------------------------------------------


def test_route_tokens_are_redacted_from_log_lines(caplog) -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.WARNING,
        __file__,
        1,
        "GET %s from %s",
        ("/sandboxes-preview/abc123def/8080/x", "p8080-abc123def.sandbox.example.com"),
        None,
    )

    RedactRouteTokens().filter(record)

    assert record.getMessage() == (
        "GET /sandboxes-preview/<route>/8080/x from p8080-<route>.sandbox.example.com"
    )
    assert redact("/sandboxes-dp/zz9/runtime/v1/files") == "/sandboxes-dp/<route>/runtime/v1/files"


def test_an_access_log_line_keeps_its_arguments_for_uvicorns_formatter() -> None:
    from uvicorn.logging import AccessFormatter

    args = ("127.0.0.1:5000", "GET", "/sandboxes-dp/abc123def/runtime/v1/files?path=/", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )

    RedactRouteTokens().filter(record)
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s", use_colors=False).format(
        record
    )

    assert line == "127.0.0.1:5000 GET /sandboxes-dp/<route>/runtime/v1/files?path=/ HTTP/1.1 200 OK"


def test_route_tokens_are_redacted_from_tracebacks_too() -> None:
    import sys

    try:
        raise ValueError("Invalid HTTP_HOST header: 'p49983-746378a6f2bbfb31.sandbox.localhost.:8100'")
    except ValueError:
        record = logging.LogRecord(
            "django.security.DisallowedHost", logging.ERROR, __file__, 1, "Invalid host", None, sys.exc_info()
        )

    RedactRouteTokens().filter(record)
    line = logging.Formatter().format(record)

    assert "746378a6f2bbfb31" not in line and "p49983-<route>.sandbox.localhost." in line


# --- hostile input on every edge route ----------------------------------------------------------

HOSTILE_VALUES = [
    "²",
    "١٢",
    "1e400",
    "-1",
    "0",
    "99999",
    "%00",
    "%ff",
    "a" * 300,
    "AbC",
    "..",
    "%2e%2e",
    "x%0d%0ay",
    "😀",
]


@edge_db
def test_hostile_values_on_edge_routes_get_json_errors_never_5xx(edge, real_agent, owner) -> None:
    # given a real sandbox behind the edge, and every edge route with hostile values in each slot
    sandbox = _sandbox(owner.personal_team, real_agent)
    token, route = session_mint(sandbox=sandbox).token, sandbox.route_token
    targets: list[tuple[str, dict[str, Any]]] = []
    auth = {"Authorization": f"Bearer {token}"}
    for raw in HOSTILE_VALUES:
        value = quote(raw, safe="%.")  # non-ASCII travels percent-encoded in a request line
        header = raw.encode()  # and as raw UTF-8 bytes in a header
        dp, signed = f"/sandboxes-dp/{route}/runtime/v1", f"/sandboxes-dp/{route}/runtime/v1/files/signed"
        targets += [
            (f"/sandboxes-dp/{value}/runtime/v1/files?path=/etc/hostname", auth),
            (f"{dp}/files?path={value}", auth),
            (f"{dp}/process/{value}", {"Authorization": b"Bearer " + header}),
            (f"/sandboxes-preview/{route}/{value}/", {}),
            (f"/sandboxes-preview/{value}/8080/", {}),
            (f"{signed}?path=/a&op=read&expires={value}&sig=00", {}),
            (f"{signed}?path={value}&op={value}&expires=1&sig={value}", {}),
            ("/", {"Host": b"p" + header + f"-{route}.sandbox.localhost".encode()}),
            ("/", {"Host": header + b".sandbox.localhost"}),
        ]

    # when each is sent with each method
    answers = [
        (method, path, headers, raw_request(edge.port, method, path, headers))
        for path, headers in targets
        for method in ("GET", "POST", "PUT", "DELETE", "HEAD")
    ]

    # then none is a 5xx other than the agent's own 502 (nothing listens on that port), and
    # every refusal the edge makes is the JSON error shape
    for method, path, headers, (status, response_headers, body) in answers:
        assert status < 500 or status == 502, (method, path, headers, status, body)
        if status >= 400 and method != "HEAD":
            assert response_headers.get("content-type") == "application/json", (method, path, status, body)
            payload = json.loads(body)
            assert isinstance(payload["error"], str) and isinstance(payload["message"], str), payload


# --- request framing, the agent's port, and preview sockets (found by review) ---------------------


@edge_db
def test_chunked_bodies_arrive_whole_and_ambiguous_framing_is_refused(
    edge, real_agent, owner, tmp_path
) -> None:
    import http.client

    # given a data-plane session
    sandbox = _sandbox(owner.personal_team, real_agent)
    token = session_mint(sandbox=sandbox).token
    path = f"/sandboxes-dp/{sandbox.route_token}/runtime/v1/files?path={tmp_path}/chunked.txt"

    # when a file is uploaded chunked (no Content-Length), then with both framings declared
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    conn.request(
        "PUT",
        path,
        body=iter([b"chunked ", b"body"]),
        encode_chunked=True,
        headers={"Authorization": f"Bearer {token}", "Transfer-Encoding": "chunked"},
    )
    chunked = conn.getresponse()
    chunked_body = json.loads(chunked.read())
    conn.close()
    both = raw_request(
        edge.port,
        "PUT",
        path,
        {"Authorization": f"Bearer {token}", "Transfer-Encoding": "chunked"},
        b"0\r\n\r\n",
    )

    # then the chunked body arrived whole, and the ambiguous request is a 400 in the error shape
    assert chunked.status == 200, chunked_body
    assert (tmp_path / "chunked.txt").read_bytes() == b"chunked body"
    assert (both[0], json.loads(both[2])["error"]) == (400, "invalid_request")


@edge_db
def test_the_agents_own_port_is_no_preview(edge, real_agent, owner) -> None:
    sandbox = _sandbox(owner.personal_team, real_agent)

    status, _, body = raw_request(edge.port, "GET", f"/sandboxes-preview/{sandbox.route_token}/49983/health")

    assert (status, json.loads(body)["error"]) == (404, "not_found")


@edge_db
def test_preview_sockets_cannot_crowd_out_the_owners_streams(edge, real_agent, owner, settings) -> None:  # type: ignore[no-untyped-def]
    import contextlib
    import threading

    from websockets.sync.client import connect

    # given a WebSocket app in the "guest" and a cap of two sockets per sandbox and kind
    from websockets.sync.server import serve

    settings.EDGE_MAX_SOCKETS_PER_SANDBOX = 2
    sandbox = _sandbox(owner.personal_team, real_agent)

    def echo(websocket) -> None:  # type: ignore[no-untyped-def]
        for message in websocket:
            websocket.send(message)

    with serve(echo, "127.0.0.1", 0) as server, contextlib.ExitStack() as sockets:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        preview = edge.url.replace("http://", "ws://") + f"/sandboxes-preview/{sandbox.route_token}/{port}/"

        # when anonymous callers hold every preview socket there is
        for _ in range(2):
            sockets.enter_context(connect(preview, open_timeout=10))

        # then the owner still opens a process stream on the data plane
        data_plane = (
            f"{edge.url.replace('http://', 'ws://')}/sandboxes-dp/{sandbox.route_token}/runtime/v1/process"
        )
        token = session_mint(sandbox=sandbox).token
        with connect(
            data_plane, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ) as own:
            own.send(json.dumps({"type": "start", "cmd": "/bin/echo", "args": ["owner-ok"]}))
            output = b""
            while (frame := json.loads(own.recv(timeout=30)))["type"] != "exit":
                if frame["type"] == "stdout":
                    output += base64.b64decode(frame["data"])
        server.shutdown()

    assert output == b"owner-ok\n"

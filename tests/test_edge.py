"""The data-plane edge: auth, routing, streaming, WebSockets, previews and signed URLs.

The first part runs the real edge (uvicorn serving `watasu.asgi.application`) in front of
a fake agent, to pin the edge's own behaviour quickly; the `vm` part goes through real
sandboxes and their guest agents.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator

import pytest
import requests
from django.core import signing
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from sandboxes import sessions
from sandboxes.edge.signing import file_url_make
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.agent_client import role_secret
from sandboxes.sessions import session_mint
from tests.conftest import Actor
from tests.edge_support import FakeAgent, ServerThread, free_port
from tests.factories import SandboxFactory
from tests.waiting import wait_until
from watasu import crypto

SECRET = "agent-secret-" + "x" * 20
S = SandboxState


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    fake = FakeAgent(SECRET)
    with ServerThread(fake) as server:
        fake.port = server.port  # type: ignore[attr-defined]
        yield fake


def _sandbox(owner: Actor, agent: FakeAgent, **fields) -> Sandbox:  # type: ignore[no-untyped-def]
    fields.setdefault("state", S.READY)
    fields.setdefault("agent_port", agent.port)  # type: ignore[attr-defined]
    return SandboxFactory(
        team=owner.personal_team, agent_secret_encrypted=crypto.encrypt_text(SECRET), **fields
    )


def _dp(sandbox: Sandbox) -> str:
    return sessions.data_plane_url(sandbox)


def _auth(sandbox: Sandbox) -> dict[str, str]:
    return {"Authorization": f"Bearer {session_mint(sandbox=sandbox).token}"}


def _ws_url(sandbox: Sandbox, path: str) -> str:
    return _dp(sandbox).replace("http://", "ws://") + path


def _expired_token(sandbox: Sandbox) -> str:
    payload = {"s": sandbox.pk, "e": sandbox.session_epoch, "x": int(time.time()) - 10, "n": "0000"}
    return sessions.TOKEN_PREFIX + signing.dumps(payload, salt=sessions._SALT)


edge_db = pytest.mark.django_db(transaction=True)
# --- HTTP proxying --------------------------------------------------------------------------------


@edge_db
def test_request_reaches_the_agent_with_same_path_and_query_and_its_secret(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)

    response = requests.get(
        f"{_dp(sandbox)}/runtime/v1/process/proc%2F1?since=3&x=a%20b",
        headers={**_auth(sandbox), "Connection": "close", "X-Custom": "1"},
        timeout=10,
    )

    assert response.status_code == 200, response.text
    seen = agent.requests[-1]
    assert seen["raw_path"] == b"/runtime/v1/process/proc%2F1"
    assert seen["query"] == "since=3&x=a%20b"
    assert seen["headers"]["authorization"] == f"Bearer {role_secret(SECRET, 'dataplane')}"
    assert seen["headers"]["x-custom"] == "1"
    assert seen["headers"].get("connection") != "close"


def _bad_tokens(sandbox: Sandbox, other: Sandbox) -> dict[str, dict[str, str]]:
    return {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {session_mint(sandbox=sandbox).token}"},
        "garbage": {"Authorization": "Bearer wsess_nonsense"},
        "other sandbox": _auth(other),
        "expired": {"Authorization": f"Bearer {_expired_token(sandbox)}"},
        "agent secret": {"Authorization": f"Bearer {SECRET}"},
    }


@edge_db
def test_bad_session_tokens_are_refused_over_http(edge, agent, owner) -> None:
    sandbox, other = _sandbox(owner, agent), _sandbox(owner, agent)

    for case, headers in _bad_tokens(sandbox, other).items():
        response = requests.get(
            f"{_dp(sandbox)}/runtime/v1/files?path=/etc/hostname", headers=headers, timeout=10
        )
        assert response.status_code == 401, case
        assert response.json()["error"] == "unauthorized", case
        assert response.json()["message"], case
    assert agent.requests == []


@edge_db
def test_bad_session_tokens_are_refused_at_the_websocket_handshake(edge, agent, owner) -> None:
    sandbox, other = _sandbox(owner, agent), _sandbox(owner, agent)

    for case, headers in _bad_tokens(sandbox, other).items():
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(_ws_url(sandbox, "/runtime/v1/process"), additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 401, case
        assert json.loads(refused.value.response.body)["error"] == "unauthorized", case
    assert agent.requests == []


@edge_db
def test_unknown_and_destroyed_sandboxes_are_404(edge, agent, owner) -> None:
    destroyed = _sandbox(owner, agent)
    headers = _auth(destroyed)
    Sandbox.objects.filter(pk=destroyed.pk).update(state=S.DESTROYED)
    unknown = f"{edge.url}/sandboxes-dp/{secrets.token_hex(8)}/runtime/v1/files?path=/a"

    for url in (unknown, f"{_dp(destroyed)}/runtime/v1/files?path=/a"):
        response = requests.get(url, headers=headers, timeout=10)
        assert (response.status_code, response.json()["error"]) == (404, "sandbox_not_found")
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url.replace("http://", "ws://"), additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 404
    # a path outside /runtime/v1 is not served either
    assert requests.get(f"{_dp(destroyed)}/admin", timeout=10).status_code == 404
    # the message names what is gone: the SDK shows it as a FileNotFoundException
    gone = requests.get(f"{_dp(destroyed)}/runtime/v1/files?path=/a", headers=headers, timeout=10)
    assert gone.json()["message"] == (
        f"Sandbox {destroyed.pk} was destroyed; its files and processes are gone."
    )
    never = requests.get(unknown, headers=headers, timeout=10).json()["message"]
    assert never.startswith("No sandbox exists at this data-plane address")


@edge_db
def test_stopped_sandbox_without_auto_resume_is_409(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent, state=S.STOPPED, auto_resume=False)

    response = requests.get(f"{_dp(sandbox)}/runtime/v1/files?path=/a", headers=_auth(sandbox), timeout=10)

    assert (response.status_code, response.json()["error"]) == (409, "sandbox_not_running")


@edge_db
def test_silent_agent_is_503_sandbox_overloaded(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent, agent_port=free_port())  # nothing listens there

    response = requests.get(f"{_dp(sandbox)}/runtime/v1/files?path=/a", headers=_auth(sandbox), timeout=30)

    assert response.status_code == 503
    assert response.json()["error"] == "sandbox_overloaded"
    assert "guestd" in response.json()["reason"]["message"]
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            _ws_url(sandbox, "/runtime/v1/process"), additional_headers=_auth(sandbox), open_timeout=30
        )
    assert refused.value.response.status_code == 503


class RepeatReader:
    """A file-like body of `count` copies of `chunk`, never held whole in memory."""

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk, self.left = chunk, count

    def __len__(self) -> int:
        return len(self.chunk) * self.left

    def read(self, size: int = -1) -> bytes:
        if not self.left:
            return b""
        self.left -= 1
        return self.chunk


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


@edge_db
def test_large_bodies_stream_both_ways_in_flat_memory(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)
    size = 512 * 2**20
    chunk = secrets.token_bytes(2**20)
    expected = hashlib.sha256()
    for _ in range(size // len(chunk)):
        expected.update(chunk)
    before = _peak_rss_kib()

    uploaded = requests.put(
        f"{_dp(sandbox)}/runtime/v1/files?path=/up.bin",
        data=RepeatReader(chunk, size // len(chunk)),
        headers=_auth(sandbox),
        timeout=120,
    )
    with requests.get(
        f"{_dp(sandbox)}/runtime/v1/files?path=/big/{size}", headers=_auth(sandbox), stream=True, timeout=120
    ) as download:
        received = sum(len(part) for part in download.iter_content(2**16))

    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["file"] == {"path": "/up.bin", "size": size, "sha256": expected.hexdigest()}
    assert received == size
    # the edge, the fake agent and this client share the process: none may hold a whole body
    assert _peak_rss_kib() - before < 96 * 1024


# --- WebSockets ---------------------------------------------------------------------------------


@edge_db
def test_websocket_frames_and_close_codes_pass_both_ways(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)
    url = _ws_url(sandbox, "/runtime/v1/process?x=1")

    with ws_connect(url, additional_headers={**_auth(sandbox), "Origin": edge.url}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "ready"}
        ws.send(json.dumps({"type": "start", "cmd": "true"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "echo", "frame": {"type": "start", "cmd": "true"}}
        ws.send(json.dumps({"type": "close", "code": 4001}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4001
    assert agent.requests[0]["headers"]["authorization"] == f"Bearer {role_secret(SECRET, 'dataplane')}"
    assert agent.requests[0]["query"] == "x=1"

    # a client close reaches the agent with its code, after the frames sent before it
    with ws_connect(url, additional_headers=_auth(sandbox), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "stdin", "data": "last"}))
        ws.close(code=4002)
    wait_until(
        lambda: any("ws_closed" in r for r in agent.requests),
        30,
        "the close to reach the agent",
        seen=lambda: agent.requests,
    )
    assert [r for r in agent.requests if "ws_closed" in r] == [{"ws_closed": 4002}], agent.requests


@edge_db
def test_open_streams_per_sandbox_are_capped(edge, agent, owner, settings) -> None:  # type: ignore[no-untyped-def]
    import contextlib

    from sandboxes.edge import ws_proxy

    # given a cap of two streams per sandbox, and two open
    settings.EDGE_MAX_SOCKETS_PER_SANDBOX = 2
    sandbox, other = _sandbox(owner, agent), _sandbox(owner, agent)
    url = _ws_url(sandbox, "/runtime/v1/process")
    with contextlib.ExitStack() as streams:
        first, _ = (
            streams.enter_context(ws_connect(url, additional_headers=_auth(sandbox), open_timeout=10))
            for _ in range(2)
        )

        # when a third is opened, then it is refused at the handshake; another sandbox is not affected
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, additional_headers=_auth(sandbox), open_timeout=10)
        with ws_connect(
            _ws_url(other, "/runtime/v1/process"), additional_headers=_auth(other), open_timeout=10
        ) as elsewhere:
            assert json.loads(elsewhere.recv(timeout=10)) == {"type": "ready"}
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["error"] == "too_many_connections"

        # and once one closes, a new one opens
        first.close()
        wait_until(lambda: ws_proxy.open_sockets(sandbox.pk) == 1, 30, "the edge to count the close")
        with ws_connect(url, additional_headers=_auth(sandbox), open_timeout=10) as again:
            assert json.loads(again.recv(timeout=10)) == {"type": "ready"}


@edge_db
def test_agent_refusal_of_a_websocket_reaches_the_client_at_the_handshake(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)

    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            _ws_url(sandbox, "/runtime/v1/process/missing/connect"),
            additional_headers=_auth(sandbox),
            open_timeout=10,
        )

    assert refused.value.response.status_code == 404
    assert json.loads(refused.value.response.body)["error"] == "process_not_found"


@pytest.mark.slow
@edge_db
def test_idle_websocket_stays_open_for_more_than_two_minutes(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)

    with ws_connect(
        _ws_url(sandbox, "/runtime/v1/process"),
        additional_headers=_auth(sandbox),
        open_timeout=10,
        ping_interval=None,
    ) as ws:
        ws.recv(timeout=10)
        time.sleep(125)
        ws.send(json.dumps({"type": "still-there"}))
        assert json.loads(ws.recv(timeout=10))["frame"] == {"type": "still-there"}


# --- previews -----------------------------------------------------------------------------------


@edge_db
def test_preview_path_form_reaches_the_agent_proxy_route_without_auth(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)
    base = f"{edge.url}/sandboxes-preview/{sandbox.route_token}/8000"

    page = requests.get(f"{base}/a/b?q=1", headers={"Authorization": "Basic dXNlcg=="}, timeout=10)
    root = requests.get(base, timeout=10)
    redirect = requests.get(f"{base}/redirect", allow_redirects=False, timeout=10)
    own_host = f"p8000-{sandbox.route_token}.sandbox.localhost:{edge.port}"
    by_host = requests.get(
        f"{edge.url}/a", headers={"Host": own_host, "Authorization": "Basic dXNlcg=="}, timeout=10
    )

    assert page.json() == {"path": "/proxy/8000/a/b", "query": {"q": "1"}, "raw_path": "/proxy/8000/a/b"}
    assert agent.requests[0]["headers"]["authorization"] == f"Bearer {role_secret(SECRET, 'preview')}"
    assert agent.requests[0]["headers"]["x-forwarded-host"] == f"127.0.0.1:{edge.port}"
    # the platform's origin may carry the platform's credentials: they stay out of the sandbox;
    # on the preview's own origin, the client's credential is the app's own
    assert "x-watasu-forwarded-authorization" not in agent.requests[0]["headers"]
    assert by_host.status_code == 200
    assert agent.requests[-1]["headers"]["x-watasu-forwarded-authorization"] == "Basic dXNlcg=="
    assert root.json()["path"] == "/proxy/8000/"
    assert redirect.headers["location"] == f"/sandboxes-preview/{sandbox.route_token}/8000/target/"


@edge_db
def test_preview_is_refused_without_public_traffic(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent, network_policy={"allow_public_traffic": False})

    response = requests.get(f"{edge.url}/sandboxes-preview/{sandbox.route_token}/8000/", timeout=10)

    assert (response.status_code, response.json()["error"]) == (403, "forbidden")
    assert agent.requests == []


@edge_db
def test_host_forms_with_a_data_plane_domain(edge, agent, owner, settings) -> None:  # type: ignore[no-untyped-def]
    settings.DATA_PLANE_DOMAIN = "sbx.example.test"
    sandbox = _sandbox(owner, agent)

    host = f"{sandbox.route_token}.sandbox.sbx.example.test"
    dataplane = requests.get(
        f"{edge.url}/runtime/v1/files?path=/nope", headers={**_auth(sandbox), "Host": host}, timeout=10
    )
    preview = requests.get(
        f"{edge.url}/x?y=2",
        headers={"Host": f"p3000-{sandbox.route_token}.sandbox.sbx.example.test:443"},
        timeout=10,
    )
    control = requests.get(
        f"{edge.url}/v1/sandbox_limits", headers={"Authorization": f"Bearer {owner.read_key}"}, timeout=10
    )

    assert dataplane.status_code == 404 and dataplane.json()["error"] == "file_not_found"
    assert preview.json()["path"] == "/proxy/3000/x" and preview.json()["query"] == {"y": "2"}
    assert control.status_code == 200


@edge_db
def test_port_url_is_the_local_host_form_with_the_path_form_as_fallback(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)

    response = requests.get(
        f"{edge.url}/v1/sandboxes/{sandbox.pk}/ports/8000",
        headers={"Authorization": f"Bearer {owner.read_key}"},
        timeout=10,
    )

    port = response.json()["sandbox_port"]
    host = f"p8000-{sandbox.route_token}.sandbox.localhost:{edge.port}"
    assert (port["host"], port["url"]) == (host, f"http://{host}")
    assert port["path_url"] == f"{edge.url}/sandboxes-preview/{sandbox.route_token}/8000"
    # *.localhost is loopback for browsers and curl; requests needs the Host header set.
    assert requests.get(f"{edge.url}/", headers={"Host": host}, timeout=10).json()["path"] == "/proxy/8000/"
    assert requests.get(port["path_url"], timeout=10).json()["path"] == "/proxy/8000/"


# --- signed file URLs -----------------------------------------------------------------------------


def _file_url(edge: ServerThread, key: str, sandbox: Sandbox, kind: str, **body) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(
        f"{edge.url}/v1/sandboxes/{sandbox.pk}/files/{kind}_url",
        json={"path": "/workspace/in.bin", **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


@edge_db
def test_signed_urls_upload_and_download_without_a_header(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)

    upload = _file_url(edge, owner.write_key, sandbox, "upload").json()["file_url"]
    stored = requests.post(
        upload["url"],
        data=b"hello bytes",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    download = _file_url(edge, owner.write_key, sandbox, "download").json()["file_url"]
    fetched = requests.get(download["url"], timeout=10)

    assert upload["method"] == "POST" and download["method"] == "GET"
    assert upload["path"] == "/workspace/in.bin" and upload["url"].startswith(_dp(sandbox) + "/runtime/v1/")
    assert stored.status_code == 200 and stored.json()["file"]["size"] == 11
    assert "content-type" not in agent.requests[0]["headers"]
    assert fetched.content == b"hello bytes"
    # the URL is bound to its operation
    assert requests.get(upload["url"], timeout=10).status_code == 403
    assert requests.post(download["url"], data=b"x", timeout=10).status_code == 403


@edge_db
def test_a_guest_cannot_serve_a_page_or_cookies_on_the_platforms_origin(edge, agent, owner) -> None:
    # given a guest whose "agent" answers a download with a page, cookies and a loose CSP
    sandbox = _sandbox(owner, agent)
    signed = _file_url(edge, owner.write_key, sandbox, "download", path="/hostile.html").json()["file_url"]

    for response in (
        requests.get(signed["url"], timeout=10),
        requests.get(
            f"{_dp(sandbox)}/runtime/v1/files",
            params={"path": "/hostile.html"},
            headers=_auth(sandbox),
            timeout=10,
        ),
    ):
        # then the data plane's answer sets no cookie and cannot render as a page of the origin
        assert response.status_code == 200 and "<script>" in response.text
        passed = {name.lower() for name in response.headers}
        assert not passed & {
            "set-cookie",
            "refresh",
            "clear-site-data",
            "access-control-allow-origin",
            "service-worker-allowed",
            "location",
        }, passed
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["content-security-policy"].startswith("default-src 'none'; sandbox")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.raw.headers.getlist("content-disposition") == ['attachment; filename="x.html"']

    # and a redirect is never relayed (an open redirect on the platform's origin), nor a bare page
    redirect = _file_url(edge, owner.write_key, sandbox, "download", path="/redirect").json()["file_url"]
    answered = requests.get(redirect["url"], allow_redirects=False, timeout=10)
    assert answered.status_code == 502 and "location" not in answered.headers
    assert answered.headers["content-security-policy"].startswith("default-src 'none'; sandbox")
    bare = _file_url(edge, owner.write_key, sandbox, "download", path="/bare").json()["file_url"]
    assert requests.get(bare["url"], timeout=10).headers["content-disposition"] == "attachment"


@edge_db
def test_expired_or_tampered_signed_urls_are_403(edge, agent, owner) -> None:
    sandbox = _sandbox(owner, agent)
    expired = file_url_make(sandbox, path="/a", op="read", ttl=60, now=time.time() - 120).url
    good = file_url_make(sandbox, path="/a", op="read", ttl=60).url

    for url in (
        expired,
        good.replace("path=%2Fa", "path=%2Fb"),
        good[:-1] + ("1" if good.endswith("0") else "0"),  # another signature (never the same one)
        good.replace("expires=", "expires=9"),
    ):
        response = requests.get(url, timeout=10)
        assert (response.status_code, response.json()["error"]) == (403, "forbidden"), url
    assert agent.requests == []


@edge_db
def test_signed_url_endpoints_check_keys_teams_and_ttl(edge, agent, owner, outsider) -> None:
    sandbox = _sandbox(owner, agent)
    before = time.time()

    default = _file_url(edge, owner.write_key, sandbox, "download").json()["file_url"]
    capped = _file_url(edge, owner.write_key, sandbox, "download", expires_in_seconds=10**6).json()[
        "file_url"
    ]
    smaller = _file_url(
        edge, owner.write_key, sandbox, "upload", use_signature_expiration=900, expires_in_seconds=120
    ).json()["file_url"]

    def ttl(file_url: dict) -> float:
        from datetime import datetime

        return datetime.fromisoformat(file_url["expires_at"].replace("Z", "+00:00")).timestamp() - before

    assert 295 <= ttl(default) <= 305
    assert 24 * 3600 - 5 <= ttl(capped) <= 24 * 3600 + 5
    assert 115 <= ttl(smaller) <= 125
    assert _file_url(edge, owner.read_key, sandbox, "upload").status_code == 403
    # a download URL reads any file as root (/proc/*/environ too): read keys get none
    refused = _file_url(edge, owner.read_key, sandbox, "download")
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    assert _file_url(edge, outsider.write_key, sandbox, "download").status_code == 404
    assert _file_url(edge, owner.write_key, sandbox, "download", path="relative").status_code == 422


# --- real sandboxes -----------------------------------------------------------------------------


def _create(edge: ServerThread, owner: Actor, **body) -> tuple[int, str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """A sandbox created through the API: (id, data-plane URL, auth headers)."""
    response = requests.post(
        f"{edge.url}/v1/sandboxes",
        json={"timeout": 600, **body},
        headers={"Authorization": f"Bearer {owner.write_key}"},
        timeout=150,
    )
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    return (
        response.json()["sandbox"]["id"],
        session["data_plane_url"],
        {"Authorization": f"Bearer {session['token']}"},
    )


def _api(edge: ServerThread, owner: Actor, method: str, path: str) -> requests.Response:
    return requests.request(
        method, f"{edge.url}/v1{path}", timeout=150, headers={"Authorization": f"Bearer {owner.write_key}"}
    )


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_files_stream_through_the_edge_to_a_real_agent(edge, owner, base_version, vm_cleanup) -> None:
    _id, dp, auth = _create(edge, owner)
    size = 64 * 2**20
    chunk = secrets.token_bytes(2**20)
    expected = hashlib.sha256()
    for _i in range(size // len(chunk)):
        expected.update(chunk)

    small = requests.put(
        f"{dp}/runtime/v1/files?path=/tmp/edge/a.txt", data=b"hello", headers=auth, timeout=60
    )
    big = requests.put(
        f"{dp}/runtime/v1/files?path=/tmp/edge/big.bin",
        data=RepeatReader(chunk, size // len(chunk)),
        headers=auth,
        timeout=600,
    )
    digest = hashlib.sha256()
    with requests.get(
        f"{dp}/runtime/v1/files?path=/tmp/edge/big.bin", headers=auth, stream=True, timeout=600
    ) as download:
        for part in download.iter_content(2**16):
            digest.update(part)

    assert small.status_code == 200 and small.json()["file"]["name"] == "a.txt", small.text
    again = requests.get(f"{dp}/runtime/v1/files?path=/tmp/edge/a.txt", headers=auth, timeout=60)
    assert again.content == b"hello"
    assert big.status_code == 200, big.text
    assert digest.hexdigest() == expected.hexdigest()
    missing = requests.get(f"{dp}/runtime/v1/files/stat?path=/tmp/edge/nope", headers=auth, timeout=60)
    assert missing.status_code == 404
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            dp.replace("http://", "ws://") + "/runtime/v1/process",
            open_timeout=10,
            additional_headers={"Authorization": "Bearer wsess_wrong"},
        )
    assert refused.value.response.status_code == 401


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_paused_sandbox_with_auto_resume_comes_back_on_a_file_read(
    edge, owner, base_version, vm_cleanup
) -> None:
    sandbox_id, dp, auth = _create(edge, owner, lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert (
        requests.put(
            f"{dp}/runtime/v1/files?path=/tmp/kept.txt", data=b"kept", headers=auth, timeout=60
        ).status_code
        == 200
    )
    assert _api(edge, owner, "POST", f"/sandboxes/{sandbox_id}/pause").json()["sandbox"]["state"] == "stopped"

    response = requests.get(f"{dp}/runtime/v1/files?path=/tmp/kept.txt", headers=auth, timeout=150)

    assert (response.status_code, response.content) == (200, b"kept")
    assert Sandbox.objects.get(pk=sandbox_id).state == S.READY


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_paused_sandbox_without_auto_resume_is_409(edge, owner, base_version, vm_cleanup) -> None:
    sandbox_id, dp, auth = _create(edge, owner)
    _api(edge, owner, "POST", f"/sandboxes/{sandbox_id}/pause")

    response = requests.get(f"{dp}/runtime/v1/files?path=/etc/hostname", headers=auth, timeout=60)

    assert (response.status_code, response.json()["error"]) == (409, "sandbox_not_running")
    assert Sandbox.objects.get(pk=sandbox_id).state == S.STOPPED


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_signed_urls_on_a_real_sandbox(edge, owner, base_version, vm_cleanup) -> None:
    sandbox_id, _dp_url, _auth_headers = _create(edge, owner)
    sandbox = Sandbox.objects.get(pk=sandbox_id)

    upload = _file_url(edge, owner.write_key, sandbox, "upload").json()["file_url"]
    stored = requests.post(upload["url"], data=b"signed bytes", timeout=60)
    download = _file_url(edge, owner.write_key, sandbox, "download").json()["file_url"]

    assert stored.status_code == 200, stored.text
    assert requests.get(download["url"], timeout=60).content == b"signed bytes"


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_preview_url_reaches_an_http_server_in_the_guest(edge, owner, base_version, vm_cleanup) -> None:
    from sandboxes.runtime import vm

    sandbox_id, _dp_url, _auth_headers = _create(edge, owner)
    agent = vm.agent_client(Sandbox.objects.get(pk=sandbox_id))
    agent.exec("mkdir -p /tmp/site && echo preview-ok > /tmp/site/index.html")
    agent.exec("python3 -m http.server 8000 --bind 0.0.0.0 --directory /tmp/site", background=True)
    port = _api(edge, owner, "GET", f"/sandboxes/{sandbox_id}/ports/8000").json()["sandbox_port"]

    response = wait_until(
        lambda: requests.get(f"{port['path_url']}/index.html", timeout=30),
        60,
        "the guest's web server to answer on the preview URL",
        until=lambda r: r.status_code == 200,
    )
    by_host = requests.get(f"{edge.url}/index.html", headers={"Host": port["host"]}, timeout=30)

    assert response.status_code == 200, response.text
    assert response.text == by_host.text == "preview-ok\n"
    assert response.headers["content-security-policy"].startswith("sandbox ")
    assert "content-security-policy" not in by_host.headers


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_sdk_drives_the_data_plane_through_the_edge(edge, owner, base_version, vm_cleanup) -> None:
    from tests.sdk import run_scenario

    output = run_scenario("dataplane", api_url=f"{edge.url}/v1", api_key=owner.write_key)

    assert output == "ok\n"


# --- auto-resume never stalls the edge ------------------------------------------------------------


@edge_db
def test_requests_for_a_resuming_sandbox_share_one_bounded_wait(edge, agent, owner, settings) -> None:  # type: ignore[no-untyped-def]
    import threading

    from sandboxes.edge import resumes

    # given a paused sandbox whose resume never finishes (another process holds it in
    # `restoring`), and a ready sandbox of the same team
    settings.EDGE_RESUME_WAIT_SECONDS = 5
    stuck = _sandbox(owner, agent, state=S.RESTORING, auto_resume=True)
    ready = _sandbox(owner, agent)
    started = resumes.stats["resumes_started"]
    answers: list[requests.Response] = []

    def read() -> None:
        url = f"{_dp(stuck)}/runtime/v1/files?path=/x"
        answers.append(requests.get(url, headers=_auth(stuck), timeout=60))

    # when 12 requests for it arrive at once, more than the edge has lookup or resume threads
    callers = [threading.Thread(target=read) for _ in range(12)]
    for caller in callers:
        caller.start()
    wait_until(lambda: resumes.in_flight() == 1, 30, "the resume to start")
    other = requests.get(f"{_dp(ready)}/runtime/v1/files?path=/nope", headers=_auth(ready), timeout=30)
    still_waiting = sum(caller.is_alive() for caller in callers)
    for caller in callers:
        caller.join(timeout=60)

    # then the other sandbox was served while they all waited, one resume was started for
    # all twelve, and each got a 503 with Retry-After once the bound passed
    assert (other.status_code, other.json()["error"]) == (404, "file_not_found")
    assert still_waiting == 12
    assert resumes.stats["resumes_started"] - started == 1
    assert [(a.status_code, a.json()["error"], a.headers["retry-after"]) for a in answers] == (
        [(503, "sandbox_overloaded", "5")] * 12
    )
    wait_until(lambda: resumes.in_flight() == 0, 30, "the abandoned resume to end")

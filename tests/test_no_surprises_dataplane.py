"""No surprises on the data plane: data in equals data out, downloads name their file,
input to a process without stdin is refused, watches report what is created inside a new
directory, errors say what happened, previews carry one Date and one Server, and every
data-plane, signed-URL and preview route answers each method with its real behaviour or
a 405 in the error shape.

Everything runs through the edge in front of the real guest agent, run on the host
(tests/edge_support.RealAgent); the SDK scenario drives it through the public SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests

from sandboxes.edge import multipart
from sandboxes.edge.access import EdgeError
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime.guest.agent import processes as guest_processes
from sandboxes.runtime.guest.agent.routes import router as agent_router
from sandboxes.sessions import session_mint
from tests.conftest import Actor
from tests.edge_support import EchoApp, RealAgent, ServerThread, raw_request
from tests.factories import SandboxFactory
from tests.waiting import wait_until
from watasu import crypto

SECRET = "real-agent-secret-" + "n" * 20
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
edge_db = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


@pytest.fixture
def sandbox(owner: Actor, real_agent: RealAgent) -> Sandbox:
    return SandboxFactory(
        team=owner.personal_team,
        state=SandboxState.READY,
        agent_port=real_agent.port,
        agent_secret_encrypted=crypto.encrypt_text(SECRET),
    )


def _dp(edge: ServerThread, sandbox: Sandbox) -> str:
    return f"{edge.url}/sandboxes-dp/{sandbox.route_token}/runtime/v1"


def _auth(sandbox: Sandbox) -> dict[str, str]:
    return {"Authorization": f"Bearer {session_mint(sandbox=sandbox).token}"}


def _file_url(edge: ServerThread, owner: Actor, sandbox: Sandbox, kind: str, path: Path | str) -> str:
    response = requests.post(
        f"{edge.url}/v1/sandboxes/{sandbox.pk}/files/{kind}_url",
        json={"path": str(path)},
        timeout=10,
        headers={"Authorization": f"Bearer {owner.write_key}"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["file_url"]["url"])


# --- data in equals data out: signed uploads ---------------------------------------------------------


@edge_db
def test_a_multipart_signed_upload_stores_its_first_file_part(edge, owner, sandbox, tmp_path) -> None:
    # given an upload URL and a browser-form body: a field, the file, then another file
    target = tmp_path / "in.bin"
    url = _file_url(edge, owner, sandbox, "upload", target)
    content = bytes(range(256)) * 64 + b"\r\n--not-the-boundary\r\n"

    # when it is posted as multipart/form-data (what requests, curl -F and browsers send)
    response = requests.post(
        url,
        data={"note": "a field before the file"},
        files=[("file", ("in.bin", content)), ("other", ("b.bin", b"second file"))],
        timeout=30,
    )

    # then the file holds the first file part's bytes, not the envelope
    assert response.status_code == 200, response.text
    assert target.read_bytes() == content
    assert response.json()["file"]["size"] == len(content)


@edge_db
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/x-www-form-urlencoded",
        "application/json",
        "text/plain; charset=utf-8",
        "image/png",
        "multipart/mixed; boundary=x",
    ],
)
def test_any_other_signed_upload_body_is_stored_raw_whatever_its_type(
    edge, owner, sandbox, tmp_path, content_type
) -> None:
    target = tmp_path / "raw.bin"
    url = _file_url(edge, owner, sandbox, "upload", target)
    body = b'--x\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nnot parsed\r\n--x--\r\n'

    response = requests.post(
        url, data=body, headers={"Content-Type": content_type} if content_type else {}, timeout=30
    )

    assert response.status_code == 200, response.text
    assert target.read_bytes() == body


@edge_db
@pytest.mark.parametrize(
    ("content_type", "body", "problem"),
    [
        ("multipart/form-data", b"--x\r\n\r\nbody\r\n--x--\r\n", "no valid boundary"),
        ("multipart/form-data; boundary=x", b"just some bytes", "ends before a closing boundary"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
            "no file part",
        ),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="f"',
            "inside a part's headers",
        ),
    ],
)
def test_a_malformed_multipart_upload_is_a_400_and_leaves_the_file_alone(
    edge, owner, sandbox, tmp_path, content_type, body, problem
) -> None:
    target = tmp_path / "kept.txt"
    target.write_bytes(b"before")
    url = _file_url(edge, owner, sandbox, "upload", target)

    response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_multipart"
    assert problem in response.json()["message"]
    assert target.read_bytes() == b"before"


@edge_db
def test_a_multipart_upload_cut_inside_the_file_is_a_400_and_stores_nothing(
    edge, owner, sandbox, tmp_path
) -> None:
    target = tmp_path / "cut.bin"
    target.write_bytes(b"the old contents")
    target.chmod(0o600)
    url = _file_url(edge, owner, sandbox, "upload", target)
    body = b'--x\r\nContent-Disposition: form-data; name="f"; filename="cut.bin"\r\n\r\n' + b"a" * 100_000

    response = requests.post(
        url, data=body, headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=30
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_multipart"
    assert "ends inside the file part" in response.json()["message"]
    assert "the file is as it was" in response.json()["message"]
    assert target.read_bytes() == b"the old contents" and target.stat().st_mode & 0o777 == 0o600
    # and the agent drops what it had written beside the file once it sees the body end early
    # (the edge answers as soon as it knows; the agent notices a moment later)
    wait_until(
        lambda: sorted(p.name for p in tmp_path.iterdir()),
        30,
        "the partial upload to be removed",
        until=lambda names: names == ["cut.bin"],
    )


@edge_db
def test_a_raw_upload_cut_short_leaves_the_old_contents(edge, owner, sandbox, tmp_path) -> None:
    import socket
    from urllib.parse import urlsplit

    # given a file with contents, and an upload that promises 1 MB and sends 64 KiB, then hangs up
    target = tmp_path / "kept.bin"
    target.write_bytes(b"the old contents")
    url = urlsplit(_file_url(edge, owner, sandbox, "upload", target))
    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as conn:
        conn.sendall(
            f"POST {url.path}?{url.query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 1000000\r\n\r\n".encode()
            + b"n" * 65536
        )
        conn.shutdown(socket.SHUT_WR)
        conn.recv(65536)  # whatever the edge answers, or its hang-up

    # then the file is as it was, with nothing left beside it
    wait_until(
        lambda: sorted(p.name for p in tmp_path.iterdir()),
        30,
        "the agent to drop the partial upload",
        until=lambda names: names == ["kept.bin"],
    )
    assert target.read_bytes() == b"the old contents"


@edge_db
def test_an_upload_replaces_a_file_keeping_its_mode_and_writes_through_a_symlink(
    edge, owner, sandbox, tmp_path
) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(b"echo old")
    target.chmod(0o750)
    link = tmp_path / "link.sh"
    link.symlink_to(target)

    for path, body in ((target, b"echo new"), (link, b"echo via link")):
        response = requests.post(_file_url(edge, owner, sandbox, "upload", path), data=body, timeout=30)
        assert response.status_code == 200, response.text

    assert target.read_bytes() == b"echo via link" and target.stat().st_mode & 0o777 == 0o750
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link.sh", "script.sh"]


@edge_db
def test_a_large_multipart_upload_streams_through(edge, owner, sandbox, tmp_path) -> None:
    # given 24 MiB sent in a multipart body of unknown length (chunked)
    target = tmp_path / "big.bin"
    url = _file_url(edge, owner, sandbox, "upload", target)
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    head = b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(384):
            yield block
        yield b"\r\n--bnd--\r\n"

    response = requests.post(
        url, data=body(), headers={"Content-Type": "multipart/form-data; boundary=bnd"}, timeout=120
    )

    assert response.status_code == 200, response.text
    assert target.stat().st_size == 384 * len(block)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(block * 384).digest()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def _first_file(data: bytes, size: int) -> tuple[bytes, int]:
    parts, biggest = [], 0
    async for chunk in await multipart.first_file_part(_chunks(data, size), b"b0undary"):
        parts.append(chunk)
        biggest = max(biggest, len(chunk))
    return b"".join(parts), biggest


@pytest.mark.parametrize("size", [1, 2, 7, 13, 4096])
def test_the_multipart_parser_finds_the_file_whatever_the_chunking(size: int) -> None:
    content = b"line one\r\n--b0undar\r\n-b0undary\r" * 50
    body = (
        b'preamble\r\n--b0undary \t\r\nContent-Disposition: form-data; name="x"\r\n\r\nvalue\r\n'
        b"--b0undary\r\ncontent-disposition: form-data; name=\"f\"; filename*=UTF-8''%C3%A9.txt\r\n"
        b"Content-Type: text/plain\r\n\r\n" + content + b"\r\n--b0undary--\r\nepilogue"
    )

    stored, biggest = asyncio.run(_first_file(body, size))

    assert stored == content
    assert biggest <= max(size, 64)  # streamed: never more than a chunk and a delimiter at once


def test_a_multipart_body_cut_inside_the_file_is_malformed() -> None:
    body = b'--b0undary\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\nhalf of it'

    with pytest.raises(EdgeError) as refused:
        asyncio.run(_first_file(body, 4))

    assert (refused.value.status, refused.value.body["error"]) == (400, "invalid_multipart")


# --- downloads name their file ---------------------------------------------------------------------


@edge_db
@pytest.mark.parametrize(
    ("name", "disposition"),
    [
        ("report.csv", 'attachment; filename="report.csv"'),
        ('na"me\\.txt', "attachment; filename=\"na_me_.txt\"; filename*=UTF-8''na%22me%5C.txt"),
        ("naïve €.txt", "attachment; filename=\"na_ve _.txt\"; filename*=UTF-8''na%C3%AFve%20%E2%82%AC.txt"),
    ],
)
def test_downloads_carry_content_disposition_with_the_file_name(
    edge, owner, sandbox, tmp_path, name, disposition
) -> None:
    target = tmp_path / name
    target.write_bytes(b"data")

    read = requests.get(
        f"{_dp(edge, sandbox)}/files", params={"path": str(target)}, headers=_auth(sandbox), timeout=10
    )
    signed = requests.get(_file_url(edge, owner, sandbox, "download", target), timeout=10)

    for response in (read, signed):
        assert response.status_code == 200, response.text
        assert response.content == b"data"
        assert response.headers["content-disposition"] == disposition


# --- the SDK: stdin, unknown processes, recursive watches ----------------------------------------------


@edge_db
def test_sdk_stdin_refusal_unknown_process_and_recursive_watch(edge, owner, sandbox, tmp_path) -> None:
    from tests.sdk import run_scenario

    output = run_scenario(
        "no_surprises",
        api_url=f"{edge.url}/v1",
        api_key=owner.write_key,
        args=(str(sandbox.pk), str(tmp_path)),
        timeout=120,
    )

    assert output == "ok\n"


@pytest.mark.vm
@edge_db
def test_on_a_real_vm_uploads_downloads_stdin_and_watches_tell_the_truth(
    edge, owner, base_version, vm_cleanup
) -> None:
    from tests.sdk import run_scenario

    # given a sandbox created through the API, booted from the base template
    response = requests.post(
        f"{edge.url}/v1/sandboxes",
        json={"timeout": 600},
        timeout=150,
        headers={"Authorization": f"Bearer {owner.write_key}"},
    )
    assert response.status_code == 201, response.text
    sandbox = Sandbox.objects.get(pk=response.json()["sandbox"]["id"])

    # when a form uploads a file to a signed URL and a signed URL downloads it
    upload = requests.post(
        _file_url(edge, owner, sandbox, "upload", "/tmp/ns/été.txt"),
        files={"file": ("été.txt", b"summer")},
        timeout=60,
    )
    download = requests.get(_file_url(edge, owner, sandbox, "download", "/tmp/ns/été.txt"), timeout=60)

    # then the file's bytes went in and came out, named
    assert upload.status_code == 200, upload.text
    assert download.content == b"summer"
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"_t_.txt\"; filename*=UTF-8''%C3%A9t%C3%A9.txt"
    )
    # and the SDK's stdin, unknown-process and recursive-watch cases hold in the guest too
    output = run_scenario(
        "no_surprises",
        api_url=f"{edge.url}/v1",
        api_key=owner.write_key,
        args=(str(sandbox.pk), "/tmp/ns/watched"),
        timeout=300,
    )
    assert output == "ok\n"


@edge_db
def test_stdin_to_a_process_without_stdin_is_an_error_frame(edge, sandbox) -> None:
    from websockets.sync.client import connect

    url = _dp(edge, sandbox).replace("http://", "ws://") + "/process"
    with connect(url, additional_headers=_auth(sandbox)) as socket:
        socket.send(json.dumps({"type": "start", "cmd": "/bin/sleep", "args": ["30"], "stdin": False}))
        started = json.loads(socket.recv(timeout=10))
        socket.send(json.dumps({"type": "stdin", "data": "aGk="}))
        frame = json.loads(socket.recv(timeout=10))
        socket.send(json.dumps({"type": "signal", "signal": "SIGKILL"}))

    assert started["type"] == "started"
    assert (frame["type"], frame["code"]) == ("error", "stdin_not_enabled")
    assert frame["message"].startswith(f"process {started['pid']} was started without stdin")


@edge_db
def test_watch_event_names_are_relative_to_the_watched_directory(edge, sandbox, tmp_path) -> None:
    from websockets.sync.client import connect

    query = f"path={tmp_path}&recursive=true&include_entry=false&allow_network_mounts=false"
    url = _dp(edge, sandbox).replace("http://", "ws://") + f"/files/watch?{query}"
    events: list[dict] = []
    with connect(url, additional_headers=_auth(sandbox)) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "ready"}
        (tmp_path / "a/b/c").mkdir(parents=True)
        (tmp_path / "a/b/c/f").write_text("z")
        while {"a", "a/b", "a/b/c", "a/b/c/f"} - {e["name"] for e in events if e["type"] == "create"}:
            events += json.loads(socket.recv(timeout=10))["events"]

    creates = [(e["name"], e["path"]) for e in events if e["type"] == "create"]
    assert creates == [(name, f"{tmp_path}/{name}") for name in ("a", "a/b", "a/b/c", "a/b/c/f")]


@edge_db
def test_a_watch_sees_an_upload_as_the_write_of_its_file_never_its_temp_name(edge, sandbox, tmp_path) -> None:
    from websockets.sync.client import connect

    (tmp_path / "old.txt").write_text("old")
    query = f"path={tmp_path}&recursive=true&include_entry=false&allow_network_mounts=false"
    url = _dp(edge, sandbox).replace("http://", "ws://") + f"/files/watch?{query}"
    events: list[dict] = []
    with connect(url, additional_headers=_auth(sandbox)) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "ready"}
        # when a new file and an existing one are uploaded (each written beside itself, renamed in)
        for name in ("new.txt", "old.txt"):
            written = requests.put(
                f"{_dp(edge, sandbox)}/files",
                params={"path": str(tmp_path / name)},
                data=b"fresh",
                headers=_auth(sandbox),
                timeout=30,
            )
            assert written.status_code == 200, written.text

        def both_written() -> bool:
            events.extend(json.loads(socket.recv(timeout=30))["events"])
            return {("write", "new.txt"), ("write", "old.txt")} <= {(e["type"], e["name"]) for e in events}

        wait_until(both_written, 60, "the watch to report both uploads", seen=lambda: events)

    # then the new file is created and written, the old one written, and no temp name shows
    seen = [(e["type"], e["name"]) for e in events]
    assert seen[:3] == [("create", "new.txt"), ("write", "new.txt"), ("write", "old.txt")], seen
    assert not [name for _, name in seen if "watasu-" in name], seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.txt"]


def test_a_dropped_process_record_is_named_as_such(monkeypatch) -> None:
    # given an agent that keeps one finished record, and two finished processes
    monkeypatch.setattr(guest_processes, "FINISHED_KEEP", 1)
    manager = guest_processes.ProcessManager()
    for _ in range(2):
        proc = manager.start({"cmd": "/bin/true"}, {"PATH": guest_processes.DEFAULT_PATH}, "/")
        assert proc.wait_finished(10)
    manager.start({"cmd": "/bin/true"}, {"PATH": guest_processes.DEFAULT_PATH}, "/")

    with pytest.raises(guest_processes.HttpError) as first:
        manager.get("proc-1")
    with pytest.raises(guest_processes.HttpError) as never:
        manager.get("proc-99")

    assert first.value.status == never.value.status == 404
    assert first.value.message.startswith("process proc-1 finished at ")
    assert first.value.message.endswith(
        "its record was dropped: the sandbox keeps the 1 most recently finished processes"
    )
    assert never.value.message == "no process proc-99 was started in this sandbox"


# --- previews: one Date, one Server ------------------------------------------------------------------


@edge_db
def test_preview_responses_carry_one_date_and_the_apps_own_server(edge, sandbox) -> None:
    with EchoApp() as app:
        connection = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
        connection.request("GET", f"/sandboxes-preview/{sandbox.route_token}/{app.port}/hello")
        response = connection.getresponse()
        response.read()
        headers = [(name.lower(), value) for name, value in response.getheaders()]
        connection.close()

    assert response.status == 200
    assert [value for name, value in headers if name == "date"] != []
    assert len([name for name, _ in headers if name == "date"]) == 1, headers
    servers = [value for name, value in headers if name == "server"]
    assert len(servers) == 1 and servers[0].startswith("BaseHTTP/"), headers


# --- every route x every method ------------------------------------------------------------------------


def _agent_routes() -> dict[str, dict[str, bool]]:
    """Data-plane path (one value per parameter) -> {method: is a WebSocket}, from the agent's own table."""
    table: dict[str, dict[str, bool]] = {}
    for route in agent_router.routes:
        pattern = route.pattern.pattern
        if not pattern.startswith("^/runtime/v1"):
            continue
        path = pattern.strip("^$").replace("\\", "").replace("(?P<pid>[^/]+)", "proc-none")
        path = path.replace("(?P<op>[^/]+)", "status")
        methods = table.setdefault(path, {})
        methods[route.method] = methods.get(route.method, True) and route.websocket  # GET /process: both
    assert len(table) > 10, table  # the walk covers the real table
    return table


@edge_db
def test_every_data_plane_route_answers_only_its_methods(edge, sandbox, tmp_path) -> None:
    auth = _auth(sandbox)
    (tmp_path / "f").write_text("kept")
    walked = 0  # the routes that act (write, delete, move) act on this file, and only on it
    for path, methods in _agent_routes().items():
        for method in METHODS:
            url = f"/sandboxes-dp/{sandbox.route_token}{path}?path={tmp_path}/f"
            status, headers, body = raw_request(edge.port, method, url, headers=auth)
            implemented = method in methods
            if implemented and methods[method]:  # a WebSocket route asked over plain HTTP
                assert (status, json.loads(body)["error"]) == (426, "upgrade_required"), (method, path, body)
            elif implemented:
                assert status not in (405, 500), (method, path, status, body)
            else:
                assert status == 405, (method, path, status, body)
                assert set(headers["allow"].split(", ")) == set(methods), (method, path, headers)
                if method != "HEAD":
                    assert json.loads(body)["error"] == "method_not_allowed", (method, path, body)
            walked += 1
    assert walked > 80


@edge_db
def test_signed_urls_answer_get_post_put_and_405_the_rest(edge, owner, sandbox, tmp_path) -> None:
    target = tmp_path / "s.txt"
    target.write_bytes(b"signed")
    read, write = (_file_url(edge, owner, sandbox, kind, target) for kind in ("download", "upload"))
    for method in METHODS:
        url = write if method in ("POST", "PUT") else read
        body = b"new" if method in ("POST", "PUT") else None
        response = requests.request(method, url, data=body, timeout=10)
        if method == "GET":
            assert (response.status_code, response.content) == (200, b"signed")
        elif method in ("POST", "PUT"):
            assert response.status_code == 200, response.text
            assert target.read_bytes() == b"new"
            target.write_bytes(b"signed")
        else:
            assert response.status_code == 405, (method, response.status_code)
            assert response.headers["allow"] == "GET, POST, PUT"
            if method != "HEAD":
                assert response.json()["error"] == "method_not_allowed"
    assert target.read_bytes() == b"signed"


@edge_db
def test_previews_pass_every_method_to_the_app(edge, sandbox) -> None:
    with EchoApp() as app:
        for method in METHODS:
            direct, _, _ = raw_request(app.port, method, "/x")
            preview = f"/sandboxes-preview/{sandbox.route_token}/{app.port}/x"
            status, _, _ = raw_request(edge.port, method, preview)

            # then the preview answers what the app answers (EchoApp: GET only, 501 otherwise)
            assert status == direct, (method, status, direct)


@edge_db
@pytest.mark.parametrize(
    "path",
    [
        "/sandboxes-dp/{token}/",
        "/sandboxes-dp/{token}/runtime/v1/nope",
        "/sandboxes-dp/{token}/elsewhere",
        "/sandboxes-preview/{token}/0/x",
    ],
)
def test_addresses_outside_the_route_table_are_404_for_every_method(edge, sandbox, path) -> None:
    for method in METHODS:
        status, _, body = raw_request(
            edge.port, method, path.format(token=sandbox.route_token), headers=_auth(sandbox)
        )
        assert status == 404, (method, path, status, body)
        if method != "HEAD":
            assert json.loads(body)["error"] == "not_found", (method, path, body)

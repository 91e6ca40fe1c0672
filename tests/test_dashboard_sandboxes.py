"""The dashboard's sandbox pages: the live list, one sandbox's page, its actions, the
terminal's ticket and the file browser.

Pages are driven through their URLs with Django's test client; the file browser talks to
the real guest agent run on the host (tests/edge_support.RealAgent); the `vm` test opens
the terminal on a real sandbox through the edge.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from websockets.sync.client import connect as ws_connect

from sandboxes.edge.signing import file_url_check
from sandboxes.models import Checkpoint, Sandbox, SandboxEvent, SandboxState
from sandboxes.runtime.lifecycle import sandbox_spec
from sandboxes.sessions import dashboard_ticket_verify
from teams.models import AuditEvent, Team
from templates_app.models import Template
from tests.conftest import Actor
from tests.edge_support import RealAgent
from tests.factories import SandboxFactory, TeamFactory
from tests.fake_driver import FakeDriver
from tests.waiting import wait_until
from watasu import crypto

pytestmark = pytest.mark.django_db
S = SandboxState
LIST = "/dashboard/t/acme/sandboxes"
AGENT_SECRET = "dashboard-agent-secret-" + "d" * 20


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def page(actor: Actor, sandbox: Sandbox, tail: str = "") -> str:
    return f"{LIST}/{sandbox.pk}{tail}"


def row_ids(html: bytes) -> list[int]:
    return [int(found) for found in re.findall(rb'<tr data-sandbox-id="(\d+)"', html)]


# --- the list ---------------------------------------------------------------------------------


def test_the_list_shows_the_teams_sandboxes_newest_first(viewer: Actor, acme: Team) -> None:
    # given two sandboxes of the team, a destroyed one, and one of another team
    older, newer = SandboxFactory(team=acme), SandboxFactory(team=acme, metadata={"job": "a"})
    SandboxFactory(team=acme, state=S.DESTROYED)
    SandboxFactory(team=TeamFactory())

    # when a viewer opens the list
    response = signed_in(viewer).get(LIST)

    # then it shows the team's live sandboxes, newest first, with their facts and a live body
    assert response.status_code == 200
    assert row_ids(response.content) == [newer.pk, older.pk]
    html = response.content.decode()
    assert f'href="/dashboard/t/acme/sandboxes/{newer.pk}"' in html
    assert "<code>job=a</code>" in html
    assert "2 vCPU / 1024 MiB" in html
    assert 'hx-trigger="every 2s"' in html and "partial=1" in html


def test_the_list_filters_by_state_metadata_and_template(viewer: Actor, acme: Team) -> None:
    # given sandboxes in different states, with different metadata and templates
    template = Template.objects.create(slug="py", name="Python", team=acme)
    ready = SandboxFactory(team=acme, metadata={"job": "a", "env": "prod"}, template=template)
    stopped = SandboxFactory(team=acme, state=S.STOPPED, metadata={"job": "a"})
    destroyed = SandboxFactory(team=acme, state=S.DESTROYED, metadata={"job": "a"})
    client = signed_in(viewer)

    # when the list is filtered, then only the matching sandboxes are listed
    assert row_ids(client.get(LIST, {"state": "paused"}).content) == [stopped.pk]
    assert row_ids(client.get(LIST, {"state": "running"}).content) == [ready.pk]
    assert row_ids(client.get(LIST, {"state": "destroyed"}).content) == [destroyed.pk]
    assert row_ids(client.get(LIST, {"metadata": "job=a"}).content) == [stopped.pk, ready.pk]
    assert row_ids(client.get(LIST, {"metadata": "job=a, env=prod"}).content) == [ready.pk]
    assert row_ids(client.get(LIST, {"template": "py"}).content) == [ready.pk]


def test_a_filter_that_cannot_be_read_is_shown_never_ignored(viewer: Actor, acme: Team) -> None:
    SandboxFactory(team=acme)
    client = signed_in(viewer)

    bad_state = client.get(LIST, {"state": "sleeping"})
    bad_metadata = client.get(LIST, {"metadata": "no-equals-sign"})

    for response, words in ((bad_state, b"Unknown state"), (bad_metadata, b"key=value")):
        assert response.status_code == 200
        assert words in response.content
        assert row_ids(response.content) == []


def test_the_partial_is_the_table_body_and_shows_new_sandboxes_and_states(viewer: Actor, acme: Team) -> None:
    # given a list page that was rendered with one sandbox
    first = SandboxFactory(team=acme)
    client = signed_in(viewer)
    assert row_ids(client.get(LIST).content) == [first.pk]

    # when a sandbox is created and the first one pauses, and the body refreshes
    second = SandboxFactory(team=acme)
    Sandbox.objects.filter(pk=first.pk).update(state=S.STOPPED)
    response = client.get(LIST, {"partial": "1"})

    # then the body alone comes back, with both, and the new state
    html = response.content.decode()
    assert html.lstrip().startswith('<tbody id="sandbox-rows"')
    assert "<html" not in html
    assert row_ids(response.content) == [second.pk, first.pk]
    href = f"/dashboard/t/acme/sandboxes/{first.pk}"
    assert f'data-sandbox-id="{first.pk}" data-href="{href}" data-state="stopped"' in html


def test_the_list_pages_by_fifty_newest_first(viewer: Actor, acme: Team) -> None:
    # given 120 sandboxes
    made = [SandboxFactory(team=acme).pk for _ in range(120)]
    newest_first = made[::-1]
    client = signed_in(viewer)

    # when the pages are followed older, then newer again
    first = client.get(LIST)
    second = client.get(LIST, {"before": newest_first[49]})
    third = client.get(LIST, {"before": newest_first[99]})
    back = client.get(LIST, {"after": newest_first[100]})

    # then each holds its 50 (the last 20), with links both ways where there is more
    assert row_ids(first.content) == newest_first[:50]
    assert row_ids(second.content) == newest_first[50:100]
    assert row_ids(third.content) == newest_first[100:]
    assert row_ids(back.content) == newest_first[50:100]
    assert f"before={newest_first[49]}".encode() in first.content
    assert b"after=" not in first.content
    assert f"after={newest_first[50]}".encode() in second.content
    assert b'rel="next"' not in third.content


def test_the_list_takes_the_same_queries_for_3_or_30_rows(viewer: Actor, acme: Team) -> None:
    template = Template.objects.create(slug="py", name="Python", team=acme)
    client = signed_in(viewer)
    client.get(LIST)  # the first request of a session does one-off work

    def queries(rows: int) -> int:
        Sandbox.objects.filter(team=acme).delete()
        for _ in range(rows):
            SandboxFactory(team=acme, template=template, metadata={"k": "v"})
        with CaptureQueriesContext(connection) as captured:
            assert len(row_ids(client.get(LIST).content)) == rows
        return len(captured)

    assert queries(3) == queries(30)


def test_an_outsider_gets_404_for_the_list_and_a_sandbox(outsider: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    client = signed_in(outsider)
    assert client.get(LIST).status_code == 404
    assert client.get(page(outsider, sandbox)).status_code == 404


# --- one sandbox ----------------------------------------------------------------------------------


def test_the_sandbox_page_shows_state_policy_events_checkpoints_and_volumes(
    member: Actor, acme: Team, local_host
) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox with a lifecycle policy, events, a volume and a checkpoint
    template = Template.objects.create(slug="py", name="Python", team=acme)
    from templates_app.models import TemplateVersion

    version = TemplateVersion.objects.create(
        template=template, version="v1", status="ready", cpu=1, memory_mb=512, host=local_host
    )
    sandbox = SandboxFactory(
        team=acme,
        on_timeout="pause",
        auto_resume=True,
        deadline_at=timezone.now() + timedelta(minutes=5),
        volume_mounts=[{"name": "data", "path": "/mnt/data"}],
        template=template,
        template_version=version,
    )
    SandboxEvent.objects.create(sandbox=sandbox, from_state="creating", to_state="ready", at=timezone.now())
    Checkpoint.objects.create(
        team=acme,
        sandbox=sandbox,
        template_version=version,
        host=local_host,
        name="before-upgrade",
        cpu_count=1,
        memory_mb=512,
        status="ready",
    )

    # when a member opens it
    response = signed_in(member).get(page(member, sandbox))

    # then it shows all of it, live, and the member's controls are enabled
    html = response.content.decode()
    assert response.status_code == 200
    assert f'data-sandbox-id="{sandbox.pk}"' in html
    assert "data-sandbox-state>ready<" in html
    assert "<dd data-on-timeout>pause</dd>" in html and "<dd data-auto-resume>yes</dd>" in html
    assert 'data-event="ready"' in html
    assert "before-upgrade" in html
    assert "/mnt/data" in html
    assert f'hx-get="/dashboard/t/acme/sandboxes/{sandbox.pk}?partial=state"' in html
    assert re.search(r'data-action="pause" data-when="ready"\s*>', html)  # the role allows it
    assert "data-terminal-form" in html and 'id="file-browser"' in html


def test_the_state_partial_follows_the_sandbox(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=S.STOPPED)

    response = signed_in(viewer).get(page(viewer, sandbox), {"partial": "state"})

    html = response.content.decode()
    assert html.lstrip().startswith('<div class="grid" id="sandbox-live"')
    assert "data-sandbox-state>stopped<" in html
    assert "<html" not in html


def test_a_viewer_sees_disabled_controls_and_no_terminal_or_files(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)

    html = signed_in(viewer).get(page(viewer, sandbox)).content.decode()

    for action in ("pause", "resume", "kill", "timeout", "checkpoint"):
        pattern = (
            rf'data-action="{action}" data-[a-z]+="[a-z]+" disabled data-role-off title="Your role \(viewer\)'
        )
        assert re.search(pattern, html), action
    assert "data-terminal-form" not in html
    assert 'id="file-browser"' not in html
    assert "xterm.js" not in html


def test_another_teams_sandbox_is_404_under_this_team(owner: Actor, acme: Team) -> None:
    # given the owner is in two teams, each with a sandbox
    theirs = SandboxFactory(team=owner.personal_team)
    client = signed_in(owner)

    # when the other team's sandbox is asked for under acme, or a malformed id
    for path in (page(owner, theirs), f"{LIST}/²", f"{LIST}/999999"):
        assert client.get(path).status_code == 404, path
    assert client.post(page(owner, theirs, "/kill")).status_code == 404
    theirs.refresh_from_db()
    assert theirs.state == S.READY


def test_the_sandbox_page_takes_the_same_queries_for_3_or_30_events(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    client = signed_in(viewer)
    client.get(page(viewer, sandbox))  # the first request of a session does one-off work

    def queries(rows: int) -> int:
        SandboxEvent.objects.filter(sandbox=sandbox).delete()
        for _ in range(rows):
            SandboxEvent.objects.create(
                sandbox=sandbox, from_state="ready", to_state="stopped", at=timezone.now()
            )
        with CaptureQueriesContext(connection) as captured:
            assert client.get(page(viewer, sandbox)).content.count(b'data-event="stopped"') == rows
        return len(captured)

    assert queries(3) == queries(30)


def test_a_port_gets_its_preview_links(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    client = signed_in(viewer)

    shown = client.get(page(viewer, sandbox), {"port": "3000"}).content.decode()
    agent = client.get(page(viewer, sandbox), {"port": "49983"}).content.decode()
    junk = client.get(page(viewer, sandbox), {"port": "²"}).content.decode()

    assert 'data-preview-port="3000"' in shown
    assert f"p3000-{sandbox.route_token}.sandbox." in shown
    assert f"/sandboxes-preview/{sandbox.route_token}/3000/" in shown
    assert "data-port-error" in agent and "agent" in agent
    assert "between 1 and 65535" in junk


def test_metrics_are_empty_json_without_a_running_vm(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme, state=S.STOPPED)
    response = signed_in(viewer).get(page(viewer, sandbox, "/metrics"))
    assert response.status_code == 200
    assert response.json() == {"metrics": []}


# --- actions ----------------------------------------------------------------------------------------

ACTIONS = ["pause", "resume", "timeout", "checkpoint", "kill", "terminal", "files/upload-url"]


@pytest.mark.parametrize("action", ACTIONS)
def test_a_viewer_may_not_act(viewer: Actor, acme: Team, action: str) -> None:
    sandbox = SandboxFactory(team=acme)

    response = signed_in(viewer).post(page(viewer, sandbox, f"/{action}"), {"timeout": "60", "name": "x"})

    assert response.status_code == 403
    sandbox.refresh_from_db()
    assert sandbox.state == S.READY and sandbox.timeout == 300
    assert not AuditEvent.objects.filter(team=acme).exists()


def test_a_viewer_may_not_browse_or_download_files(viewer: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    client = signed_in(viewer)
    assert client.get(page(viewer, sandbox, "/files")).status_code == 403
    assert client.get(page(viewer, sandbox, "/files/download"), {"path": "/etc/passwd"}).status_code == 403


def test_actions_need_post(member: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme)
    assert signed_in(member).get(page(member, sandbox, "/kill")).status_code == 405
    sandbox.refresh_from_db()
    assert sandbox.state == S.READY


def _running_vm(driver: FakeDriver, sandbox: Sandbox) -> None:
    spec = sandbox_spec(
        sandbox.vm_name,
        driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=Path("/vmlinuz"),
        initrd=Path("/initrd.img"),
        cmdline="",
        backing=Path("/base.qcow2"),
    )
    driver.boot(spec)


def test_a_member_pauses_and_kills_a_sandbox_and_both_are_audited(
    member: Actor, acme: Team, local_host, base_version_row, fake_driver: FakeDriver
) -> None:  # type: ignore[no-untyped-def]
    # given a running sandbox of the team
    sandbox = SandboxFactory(
        team=acme, host=local_host, template=base_version_row.template, template_version=base_version_row
    )
    _running_vm(fake_driver, sandbox)
    client = signed_in(member)

    # when the member pauses it
    paused = client.post(page(member, sandbox, "/pause"), follow=True)

    # then it is paused, the page says so, and the audit log has it
    sandbox.refresh_from_db()
    assert sandbox.state == S.STOPPED
    assert fake_driver.domain_status(sandbox.vm_name) == "saved"
    assert f"Sandbox {sandbox.pk} paused: its state is stopped".encode() in paused.content

    # and when the member kills it, it is destroyed
    client.post(page(member, sandbox, "/kill"))
    sandbox.refresh_from_db()
    assert sandbox.state == S.DESTROYED
    audit = list(
        AuditEvent.objects.filter(team=acme).order_by("pk").values_list("action", "target", "source")
    )
    assert audit == [
        ("sandbox.pause", str(sandbox.pk), "dashboard"),
        ("sandbox.kill", str(sandbox.pk), "dashboard"),
    ]


def test_a_refused_action_is_a_message_and_no_audit(member: Actor, acme: Team) -> None:
    # given a paused sandbox
    sandbox = SandboxFactory(team=acme, state=S.STOPPED)

    # when it is paused again, or checkpointed
    paused = signed_in(member).post(page(member, sandbox, "/pause"), follow=True)
    checkpointed = signed_in(member).post(page(member, sandbox, "/checkpoint"), {"name": "x"}, follow=True)

    # then the page shows why, and nothing is audited
    assert paused.status_code == 200 and checkpointed.status_code == 200
    assert b'class="error"' in paused.content and b"stopped" in paused.content
    assert b'class="error"' in checkpointed.content
    assert not AuditEvent.objects.exists()


def test_a_member_sets_the_timeout(member: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme, deadline_at=timezone.now())
    client = signed_in(member)

    done = client.post(page(member, sandbox, "/timeout"), {"timeout": "3600"})
    too_long = client.post(page(member, sandbox, "/timeout"), {"timeout": "99999999"}, follow=True)
    not_a_number = client.post(page(member, sandbox, "/timeout"), {"timeout": "²"}, follow=True)

    assert done.status_code == 302 and done["Location"] == page(member, sandbox)
    sandbox.refresh_from_db()
    assert sandbox.timeout == 3600
    assert sandbox.deadline_at is not None and sandbox.deadline_at > timezone.now() + timedelta(minutes=59)
    assert b"at most" in too_long.content
    assert b"timeout:" in not_a_number.content
    assert list(AuditEvent.objects.values_list("action", "detail")) == [
        ("sandbox.timeout", {"timeout": 3600})
    ]


def test_a_suspended_team_cannot_resume(member: Actor, acme: Team) -> None:
    from billing.models import Account

    sandbox = SandboxFactory(team=acme, state=S.STOPPED)
    Account.objects.update_or_create(team=acme, defaults={"suspended_at": timezone.now()})

    response = signed_in(member).post(page(member, sandbox, "/resume"), follow=True)

    assert response.status_code == 200
    assert b"suspended" in response.content
    sandbox.refresh_from_db()
    assert sandbox.state == S.STOPPED
    assert not AuditEvent.objects.exists()


# --- terminal ticket ---------------------------------------------------------------------------------


def test_a_member_gets_a_terminal_ticket_for_the_process_socket(member: Actor, acme: Team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL, settings.DATA_PLANE_DOMAIN = "https://watasu.example", ""
    sandbox = SandboxFactory(team=acme)

    response = signed_in(member).post(page(member, sandbox, "/terminal"))

    assert response.status_code == 200
    body = response.json()
    url = urlsplit(body["url"])
    assert (url.scheme, url.netloc, url.path) == (
        "wss",
        "watasu.example",
        f"/sandboxes-dp/{sandbox.route_token}/runtime/v1/process",
    )
    ticket = parse_qs(url.query)["ticket"][0]
    assert dashboard_ticket_verify(ticket=ticket, sandbox=sandbox)
    assert body["expires_in"] == settings.DASHBOARD_TICKET_SECONDS
    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["sandbox.terminal"]


def test_no_terminal_for_a_destroyed_sandbox(member: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme, state=S.DESTROYED)
    response = signed_in(member).post(page(member, sandbox, "/terminal"))
    assert response.status_code == 409
    assert "destroyed" in response.json()["message"]


# --- files ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(AGENT_SECRET) as agent:
        yield agent


def _agent_sandbox(acme: Team, agent: RealAgent, **fields) -> Sandbox:  # type: ignore[no-untyped-def]
    return SandboxFactory(
        team=acme, agent_port=agent.port, agent_secret_encrypted=crypto.encrypt_text(AGENT_SECRET), **fields
    )


def test_the_file_browser_lists_a_directory_through_the_real_agent(
    member: Actor, acme: Team, real_agent: RealAgent, tmp_path: Path
) -> None:
    # given a directory in the "sandbox" (the agent runs on this host)
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    sandbox = _agent_sandbox(acme, real_agent)
    client = signed_in(member)

    # when the member lists it, and the default directory
    listing = client.get(page(member, sandbox, "/files"), {"path": str(tmp_path)})
    default = client.get(page(member, sandbox, "/files"))

    # then directories come first, files link to their download, and there is a way up
    html = listing.content.decode()
    assert listing.status_code == 200
    assert f'data-directory="{tmp_path}"' in html
    assert html.index('data-file="sub"') < html.index('data-file="notes.txt"')
    assert f"/files/download?path={tmp_path}/notes.txt" in html
    assert "data-files-up" in html
    assert default.status_code == 200 and b"data-files-error" not in default.content


def test_names_a_guest_can_make_are_listed_and_never_break_the_page(
    member: Actor, acme: Team, real_agent: RealAgent, tmp_path: Path
) -> None:
    # given names that are not UTF-8, hold control characters or markup
    raw = bytes(tmp_path)
    for name in (b"\xff\xfelatin", b"bad\x01ctl", b"<img src=x onerror=alert(1)>", b"fine.txt"):
        (Path(raw.decode()) / name.decode("utf-8", "surrogateescape")).write_bytes(b"x")
    sandbox = _agent_sandbox(acme, real_agent)

    # when the member lists the directory
    listing = signed_in(member).get(page(member, sandbox, "/files"), {"path": str(tmp_path)})

    # then the page renders; odd names are shown without a link, markup is escaped
    html = listing.content.decode()
    assert listing.status_code == 200
    assert "\ufffd\ufffdlatin" in html and "latin</a>" not in html
    assert "bad\x01ctl</a>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img src=x" not in html
    assert f"/files/download?path={tmp_path}/fine.txt" in html


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/dir", b"not an absolute path"),
        ("/tmp/../etc", b"segment"),
        ("/tmp/./x", b"segment"),
        ("/tmp\x00/x", b"control characters"),
        ("/nonexistent-dir-xyz", b"nonexistent-dir-xyz"),
    ],
)
def test_the_file_browser_refuses_bad_paths_with_a_message(
    member: Actor, acme: Team, real_agent: RealAgent, path: str, message: bytes
) -> None:
    sandbox = _agent_sandbox(acme, real_agent)
    response = signed_in(member).get(page(member, sandbox, "/files"), {"path": path})
    assert response.status_code == 200
    assert b"data-files-error" in response.content
    assert message in response.content


def test_the_file_browser_says_when_the_sandbox_is_not_running(member: Actor, acme: Team) -> None:
    sandbox = SandboxFactory(team=acme, state=S.STOPPED)
    response = signed_in(member).get(page(member, sandbox, "/files"))
    assert response.status_code == 200
    assert b"resume it to browse" in response.content


def test_download_and_upload_go_through_signed_urls(member: Actor, acme: Team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL, settings.DATA_PLANE_DOMAIN = "http://127.0.0.1:8000", ""
    sandbox = SandboxFactory(team=acme)
    client = signed_in(member)

    download = client.get(page(member, sandbox, "/files/download"), {"path": "/work/a b.txt"})
    upload = client.post(page(member, sandbox, "/files/upload-url"), {"directory": "/work", "name": "c.txt"})
    bad = client.post(page(member, sandbox, "/files/upload-url"), {"directory": "/work", "name": "../x"})
    bad_download = client.get(page(member, sandbox, "/files/download"), {"path": "/work/../etc/shadow"})

    assert download.status_code == 302
    read = urlsplit(download["Location"])
    params = {key: values[0] for key, values in parse_qs(read.query).items()}
    assert read.path == f"/sandboxes-dp/{sandbox.route_token}/runtime/v1/files/signed"
    assert params["path"] == "/work/a b.txt" and params["op"] == "read"
    assert (
        file_url_check(sandbox, path=params["path"], op="read", expires=params["expires"], sig=params["sig"])
        is None
    )
    assert upload.status_code == 200 and upload.json()["path"] == "/work/c.txt"
    written = {k: v[0] for k, v in parse_qs(urlsplit(upload.json()["url"]).query).items()}
    assert written["op"] == "write" and written["path"] == "/work/c.txt"
    assert bad.status_code == 422
    assert bad_download.status_code == 302 and bad_download["Location"] == page(member, sandbox)
    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["sandbox.upload"]


# --- the terminal on a real sandbox ------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.django_db(transaction=True)
def test_the_terminal_runs_a_shell_in_a_real_sandbox(edge, owner, base_version, vm_cleanup, acme) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox of acme created through the API, and its page's terminal ticket
    created = requests.post(
        f"{edge.url}/v1/sandboxes?team=acme",
        json={"timeout": 600},
        headers={"Authorization": f"Bearer {owner.write_key}"},
        timeout=150,
    )
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandbox"]["id"]
    client = signed_in(owner)
    assert client.get(LIST).content.count(f'data-sandbox-id="{sandbox_id}"'.encode()) == 1
    ticket = client.post(f"{LIST}/{sandbox_id}/terminal").json()

    # when the browser's socket opens from the platform's origin and starts a login shell in a PTY
    output = b""
    with ws_connect(ticket["url"], additional_headers={"Origin": edge.url}, open_timeout=30) as ws:
        start = {"type": "start", "cmd": "/bin/bash", "args": ["-l"], "pty": {"cols": 100, "rows": 30}}
        ws.send(json.dumps(start))
        assert json.loads(ws.recv(timeout=60))["type"] == "started"
        ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
        command = b"echo $((6*7)) $(stty size)\n"
        ws.send(json.dumps({"type": "stdin", "data": base64.b64encode(command).decode()}))

        def answered() -> bool:
            nonlocal output
            frame = json.loads(ws.recv(timeout=60))
            if frame["type"] == "pty":
                output += base64.b64decode(frame["data"])
            return b"42 40 120" in output

        # then the shell answers in the PTY, at the new size
        wait_until(answered, 120, "the shell's answer", seen=lambda: output[-500:])

    # and the file browser lists the guest's directories
    listing = client.get(f"{LIST}/{sandbox_id}/files", {"path": "/etc"})
    assert b'data-file="hostname"' in listing.content

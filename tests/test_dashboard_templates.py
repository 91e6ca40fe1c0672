"""The dashboard's template, volume and checkpoint pages: lists, details, the live build log,
cancelling and retrying builds, the volume file browser, restoring and deleting checkpoints.
Roles: a viewer sees everything with every control disabled and is refused (403) on POST;
another team's objects are 404."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import Account
from sandboxes import checkpoints as checkpoint_services
from sandboxes.models import Checkpoint, CheckpointStatus, Sandbox, SandboxState
from sandboxes.runtime import vm
from sandboxes.runtime.driver import free_tcp_port
from sandboxes.runtime.lifecycle import sandbox_spec
from teams.models import AuditEvent, Team
from templates_app.builds import BuildLog, build_cancel, build_vm_names
from templates_app.builds import worker as build_worker
from templates_app.models import Template, TemplateTag, TemplateVersion, VersionStatus
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.factories import SandboxFactory
from tests.fake_driver import FakeDriver
from tests.waiting import wait_until
from volumes import engine
from volumes import services as volume_services
from volumes.models import Volume
from watasu import crypto

pytestmark = pytest.mark.django_db
S = SandboxState


def _sandbox(**fields: object) -> Sandbox:
    return cast(Sandbox, SandboxFactory(**fields))


def signed_in(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def _version(
    template: Template, name: str, status: str = VersionStatus.READY, **fields: object
) -> TemplateVersion:
    return TemplateVersion.objects.create(
        template=template, version=name, status=status, cpu=2, memory_mb=1024, **fields
    )


@pytest.fixture
def lab(acme: Team, local_host) -> Template:
    """A team template with a ready version tagged `stable` and a failed one."""
    template = Template.objects.create(team=acme, slug="lab", name="Lab")
    v1 = _version(template, "v1", host=local_host, artifact_dir="/x", size_bytes=3 * 2**20)
    _version(template, "v2", VersionStatus.FAILED, last_error_message="step setup[0] failed")
    TemplateTag.objects.create(template=template, version=v1, tag="stable")
    return template


def _url(team: str, *parts: object) -> str:
    return "/dashboard/t/" + "/".join([team, *map(str, parts)])


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# --- templates ------------------------------------------------------------------------------


def test_the_list_shows_the_teams_and_the_providers_templates(
    owner: Actor, outsider: Actor, lab: Template, base_version_row: TemplateVersion
) -> None:
    # given another team's template too
    Template.objects.create(team=outsider.personal_team, slug="theirs", name="Theirs")

    # when the owner opens the templates page
    response = signed_in(owner).get(_url("acme", "templates"))

    # then it lists acme's template (latest version failed, tagged, with its shape) and `base`
    assert response.status_code == 200
    page = response.content.decode()
    rows = re.findall(r'data-template-id="(\d+)"', page)
    assert rows == [str(base_version_row.template_id), str(lab.pk)]
    assert "theirs" not in page
    assert '<span class="badge failed">failed</span>' in page
    assert '<code title="→ v1">stable</code>' in page
    assert "2 vCPU / 1024 MiB" in page and "3.0\xa0MB" in page
    assert ">provider</span>" in page


def test_the_template_list_costs_the_same_queries_for_3_or_30_templates(owner: Actor, acme: Team) -> None:
    client = signed_in(owner)

    def queries_with(count: int) -> int:
        Template.objects.all().delete()
        for n in range(count):
            template = Template.objects.create(team=acme, slug=f"t{n}", name=f"T{n}")
            ready = _version(template, "v1")
            _version(template, "v2", VersionStatus.BUILDING)
            TemplateTag.objects.create(template=template, version=ready, tag="stable")
        client.get(_url("acme", "templates"))  # the session's first request does more
        with CaptureQueriesContext(connection) as captured:
            assert client.get(_url("acme", "templates")).status_code == 200
        return len(captured)

    assert queries_with(3) == queries_with(30)


def test_a_templates_page_lists_versions_and_tags_with_controls_for_writers(
    member: Actor, viewer: Actor, lab: Template
) -> None:
    # when a member and a viewer open the template
    mine = signed_in(member).get(_url("acme", "templates", lab.pk)).content.decode()
    seen = signed_in(viewer).get(_url("acme", "templates", lab.pk)).content.decode()

    # then both see the versions, newest first, with status, tags and the failure
    for page in (mine, seen):
        assert re.findall(r'data-version-id="(\d+)"', page) == [
            str(v.pk) for v in lab.versions.order_by("-pk")
        ]
        assert "step setup[0] failed" in page and 'data-tag="stable"' in page
    # and only the member's controls are enabled
    assert 'data-action="tag-assign">' in mine and 'data-action="template-delete">' in mine
    assert re.findall(r'data-action="[a-z-]+" disabled', mine) == []
    buttons = re.findall(r'data-action="([a-z-]+)"( disabled title="[^"]*read-only[^"]*")?', seen)
    assert buttons and all(disabled for _, disabled in buttons)


def test_tags_are_assigned_and_removed_and_audited(member: Actor, lab: Template) -> None:
    client = signed_in(member)
    v1 = lab.versions.get(version="v1")

    # when the member tags v1 `prod`, then removes `stable`
    tagged = client.post(_url("acme", "templates", lab.pk, "tags"), {"version": v1.pk, "tag": "prod"})
    removed = client.post(_url("acme", "templates", lab.pk, "tags", "remove"), {"tag": "stable"})

    # then the tags moved and the audit log says who did it
    assert tagged.status_code == removed.status_code == 302
    assert list(lab.tags.values_list("tag", "version__version")) == [("prod", "v1")]
    assert list(AuditEvent.objects.filter(team=lab.team).values_list("action", "source", "actor_email")) == [
        ("template.tag_remove", "dashboard", member.user.email),
        ("template.tag_assign", "dashboard", member.user.email),
    ]


def test_bad_tags_and_unready_versions_are_refused_with_a_message(member: Actor, lab: Template) -> None:
    client = signed_in(member)
    failed = lab.versions.get(version="v2")
    url = _url("acme", "templates", lab.pk, "tags")

    bad = client.post(url, {"version": lab.versions.get(version="v1").pk, "tag": "Not A Tag"}, follow=True)
    unready = client.post(url, {"version": failed.pk, "tag": "prod"}, follow=True)

    assert "A tag is 1-63 lowercase letters" in _messages(bad)[0]
    assert _messages(unready) == [
        f"Template version '{lab.pk}:v2' is failed; only ready versions can be tagged."
    ]
    assert list(lab.tags.values_list("tag", flat=True)) == ["stable"]


def test_versions_and_templates_are_deleted(member: Actor, lab: Template) -> None:
    client = signed_in(member)
    failed = lab.versions.get(version="v2")

    gone = client.post(_url("acme", "templates", lab.pk, "versions", failed.pk, "delete"))
    assert gone.status_code == 302 and gone["Location"] == _url("acme", "templates", lab.pk)
    failed.refresh_from_db()
    assert failed.deleted_at is not None

    deleted = client.post(_url("acme", "templates", lab.pk, "delete"))
    assert deleted["Location"] == _url("acme", "templates")
    lab.refresh_from_db()
    assert lab.deleted_at is not None
    assert client.get(_url("acme", "templates", lab.pk)).status_code == 404


def test_a_template_something_runs_on_is_kept_with_the_services_message(
    member: Actor, lab: Template, local_host
) -> None:
    sandbox = _sandbox(team=lab.team, host=local_host, template=lab, state=S.READY)

    response = signed_in(member).post(_url("acme", "templates", lab.pk, "delete"), follow=True)

    assert response.status_code == 200
    assert f"sandbox {sandbox.pk} (ready)" in _messages(response)[0]
    lab.refresh_from_db()
    assert lab.deleted_at is None


def test_provider_templates_are_read_only(member: Actor, base_version_row: TemplateVersion) -> None:
    client = signed_in(member)
    template = base_version_row.template

    page = client.get(_url("acme", "templates", template.pk)).content.decode()
    refused = client.post(_url("acme", "templates", template.pk, "delete"), follow=True)

    assert 'data-action="template-delete" disabled title="Provider templates belong to the platform' in page
    assert _messages(refused) == ["Template 'base' belongs to the platform and is read-only."]
    template.refresh_from_db()
    assert template.deleted_at is None


# --- a version's build: the live log, cancel, retry ---------------------------------------------


def _log(version: TemplateVersion, *lines: str) -> None:
    log = BuildLog(version)
    for line in lines:
        log.add(line)
    log.flush()


def test_a_running_builds_page_polls_its_log_and_the_poll_appends_new_lines(
    viewer: Actor, lab: Template
) -> None:
    # given a running build that logged two lines
    version = _version(lab, "v3", VersionStatus.BUILDING, build_started_at=timezone.now())
    _log(version, "building lab:v3", "packages.apt: apt-get install <jq>")
    client = signed_in(viewer)

    # when its page is opened
    page = client.get(_url("acme", "templates", lab.pk, "versions", version.pk)).content.decode()

    # then it shows the lines (escaped) and polls every second from the next offset
    assert page.count('class="log-line info"') == 2 and "apt-get install &lt;jq&gt;" in page
    poll = _url("acme", "templates", lab.pk, "versions", version.pk, "log")
    assert f'hx-get="{poll}?offset=2&amp;status=building&amp;quiet=0" hx-trigger="every 1s"' in page
    assert 'hx-target="#build-log" hx-swap="beforeend"' in page
    assert 'data-action="build-cancel" disabled' in page  # a viewer may not cancel

    # when the worker logs a line and the poller asks from offset 2
    _log(version, "setup[0]: make")
    polled = client.get(poll, {"offset": "2", "status": "building", "quiet": "0"})

    # then only the new line comes back, with a poller asking from offset 3, no status block
    body = polled.content.decode()
    assert polled.status_code == 200
    assert re.findall(r'class="log-line[^"]*" data-index="(\d+)"', body) == ["2"]
    assert 'hx-swap-oob="true"' in body and "offset=3&amp;status=building" in body
    assert 'id="version-status"' not in body
    assert body == body.strip() and not re.search(r">\s+<", body)  # appended to a <pre>: no blank lines


def test_the_poll_sends_the_new_status_and_stops_once_a_finished_build_is_quiet(
    viewer: Actor, lab: Template
) -> None:
    version = _version(lab, "v3", VersionStatus.BUILDING)
    _log(version, "building lab:v3")
    poll = _url("acme", "templates", lab.pk, "versions", version.pk, "log")
    client = signed_in(viewer)

    # when the build ends and writes its last line
    TemplateVersion.objects.filter(pk=version.pk).update(status=VersionStatus.READY, built_at=timezone.now())
    _log(version, "ready")
    last = client.get(poll, {"offset": "1", "status": "building", "quiet": "0"}).content.decode()

    # then the poll brings the line and the new status block, and keeps polling a while
    assert 'data-index="1"' in last
    assert 'id="version-status" hx-swap-oob="true" data-status="ready"' in last
    assert "offset=2&amp;status=ready&amp;quiet=0" in last
    # and once QUIET_POLLS_TO_STOP polls brought nothing, it answers 286 (htmx stops polling)
    statuses, quiet = [], 0
    for _ in range(20):
        response = client.get(poll, {"offset": "2", "status": "ready", "quiet": str(quiet)})
        statuses.append(response.status_code)
        if response.status_code == 286:
            break
        quiet = int(re.search(r"quiet=(\d+)", response.content.decode())[1])  # type: ignore[index]
    assert statuses == [200] * 9 + [286]
    assert "hx-get" not in response.content.decode()


def test_the_log_offset_is_read_as_a_number_or_not_at_all(viewer: Actor, lab: Template) -> None:
    version = lab.versions.get(version="v1")
    _log(version, "one", "two")
    poll = _url("acme", "templates", lab.pk, "versions", version.pk, "log")
    for offset in ("²", "-1", "x", "99999999999999999999"):
        response = signed_in(viewer).get(poll, {"offset": offset})
        assert response.status_code == 200, offset
        assert response.content.decode().count('class="log-line') == 2, offset


def test_cancelling_a_queued_build_fails_it_with_the_reason(member: Actor, lab: Template) -> None:
    draft = _version(lab, "v3", VersionStatus.DRAFT)

    response = signed_in(member).post(_url("acme", "templates", lab.pk, "versions", draft.pk, "cancel"))

    assert response.status_code == 302
    assert response["Location"] == _url("acme", "templates", lab.pk, "versions", draft.pk)
    draft.refresh_from_db()
    assert draft.status == VersionStatus.FAILED
    assert draft.last_error_message == f"Cancelled by {member.user.email}."
    assert build_worker.claim(draft.pk) is None  # a worker that gets it now does nothing
    assert draft.log_entries.get().level == "error"
    event = AuditEvent.objects.get(action="template.build_cancel")
    assert (event.target, event.source, event.detail["was"]) == (str(draft.pk), "dashboard", "draft")


def test_cancelling_a_running_build_fails_it_and_ends_its_metering(member: Actor, lab: Template) -> None:
    running = _version(
        lab, "v3", VersionStatus.BUILDING, lease_expires_at=timezone.now() + timedelta(minutes=2)
    )

    build_cancel(user=member.user, version=running, source="dashboard")

    running.refresh_from_db()
    assert (running.status, running.lease_expires_at) == (VersionStatus.FAILED, None)
    assert running.log_entries.count() == 0  # the worker writes this log, not us
    assert AuditEvent.objects.get(action="template.build_cancel").detail["was"] == "building"


def test_a_finished_build_cannot_be_cancelled(member: Actor, lab: Template) -> None:
    ready = lab.versions.get(version="v1")

    response = signed_in(member).post(
        _url("acme", "templates", lab.pk, "versions", ready.pk, "cancel"), follow=True
    )

    assert _messages(response) == [
        f"Build {ready.pk} is ready; only a queued or running build can be cancelled."
    ]
    ready.refresh_from_db()
    assert ready.status == VersionStatus.READY
    assert not AuditEvent.objects.exists()


def _build_vm(driver: FakeDriver, name: str) -> None:
    driver.boot(
        sandbox_spec(
            name,
            driver.state_dir,
            vcpus=1,
            memory_mb=512,
            kernel=Path("/vmlinuz"),
            initrd=Path("/initrd.img"),
            cmdline="",
            backing=Path("/base.qcow2"),
        )
    )


@pytest.mark.django_db(transaction=True)
def test_the_worker_notices_a_cancellation_at_its_lease_renewal_and_destroys_the_build_vms(
    member: Actor, acme: Team, local_host, fake_driver: FakeDriver, settings
) -> None:
    # given a running build whose worker renews its lease every second, with both build VMs
    settings.TEMPLATE_BUILD_LEASE_SECONDS = 4
    template = Template.objects.create(team=acme, slug="slow", name="Slow")
    version = _version(
        template, "v1", VersionStatus.BUILDING, lease_expires_at=timezone.now() + timedelta(seconds=4)
    )
    for name in build_vm_names(version.pk):
        _build_vm(fake_driver, name)

    with build_worker._Lease(version.pk, local_host) as lease:
        lease.check()  # still building: the step goes on
        # when a member cancels it
        build_cancel(user=member.user, version=version)
        # then the lease renewal finds it no longer building and destroys the VMs, which ends the
        # running step; the next check between steps stops the build with the reason
        wait_until(lease.lost.is_set, 15, "the worker's lease renewal to notice the cancellation")
        with pytest.raises(
            build_worker.BuildStopped, match=f"build stopped: Cancelled by {member.user.email}"
        ):
            lease.check()
    assert fake_driver.list_domains(VM_TEST_PREFIX) == []


def test_a_check_between_steps_stops_a_cancelled_build_before_the_lease_renews(
    member: Actor, lab: Template, local_host
) -> None:
    version = _version(lab, "v3", VersionStatus.BUILDING)
    lease = build_worker._Lease(version.pk, local_host)  # its thread never started
    build_cancel(user=member.user, version=version)

    with pytest.raises(build_worker.BuildStopped, match="Cancelled by"):
        lease.check()
    assert lease.lost.is_set()


def _failed_build(lab: Template) -> TemplateVersion:
    spec = {"setup": ["make"], "env_keys": ["TOKEN"], "tags": ["nightly"]}
    return _version(
        lab,
        "build-0123456789",
        VersionStatus.FAILED,
        build_spec=spec,
        env_encrypted=crypto.encrypt_json({"TOKEN": "s3cret"}),
        skip_cache=True,
        last_error_message="step setup[0] failed with exit code 2",
    )


def test_retrying_a_failed_build_queues_the_same_spec_as_a_new_version(
    member: Actor, lab: Template, base_version_row: TemplateVersion, django_capture_on_commit_callbacks
) -> None:
    failed = _failed_build(lab)

    with django_capture_on_commit_callbacks() as queued:
        response = signed_in(member).post(_url("acme", "templates", lab.pk, "versions", failed.pk, "retry"))

    retried = lab.versions.get(version__startswith="build-0123456789-retry-")
    assert response.status_code == 302
    assert response["Location"] == _url("acme", "templates", lab.pk, "versions", retried.pk)
    assert len(queued) == 1  # its build task, once committed
    assert (retried.status, retried.cpu, retried.memory_mb, retried.skip_cache) == (
        VersionStatus.DRAFT,
        2,
        1024,
        True,
    )
    assert retried.build_spec == {"setup": ["make"], "env_keys": ["TOKEN"], "tags": ["nightly"]}
    assert retried.build_env() == {"TOKEN": "s3cret"}
    event = AuditEvent.objects.get(action="template.build_retry")
    assert event.detail["retry_of"] == failed.pk and event.target == str(retried.pk)


def test_a_retry_of_a_retry_keeps_one_suffix(member: Actor, lab: Template, base_version_row) -> None:
    from templates_app.builds import build_retry

    first = build_retry(user=member.user, version=_failed_build(lab))
    TemplateVersion.objects.filter(pk=first.pk).update(status=VersionStatus.FAILED)
    first.refresh_from_db()
    second = build_retry(user=member.user, version=first)

    assert re.fullmatch(r"build-0123456789-retry-[0-9a-f]{6}", second.version)


def test_a_suspended_team_cannot_retry_and_only_failed_builds_are_retried(
    member: Actor, acme: Team, lab: Template, base_version_row: TemplateVersion
) -> None:
    client = signed_in(member)
    failed = _failed_build(lab)
    ready = lab.versions.get(version="v1")

    not_failed = client.post(_url("acme", "templates", lab.pk, "versions", ready.pk, "retry"), follow=True)
    Account.objects.update_or_create(team=acme, defaults={"suspended_at": timezone.now()})
    suspended = client.post(_url("acme", "templates", lab.pk, "versions", failed.pk, "retry"), follow=True)

    assert _messages(not_failed) == [
        f"Build {ready.pk} is ready; only a failed or cancelled build can be retried."
    ]
    assert "suspended" in _messages(suspended)[0]
    assert lab.versions.count() == 3 and not AuditEvent.objects.exists()


# --- roles and isolation --------------------------------------------------------------------


@pytest.fixture
def objects(lab: Template, acme: Team, local_host, base_version_row: TemplateVersion) -> dict[str, int]:
    """One object of each kind in acme: a template version, a volume row and a checkpoint row."""
    version = _version(lab, "v3", VersionStatus.DRAFT)
    volume = Volume.objects.create(team=acme, name="cache", size_bytes=2**30, host=local_host, state="ready")
    sandbox = _sandbox(team=acme, host=local_host, template_version=base_version_row)
    checkpoint = Checkpoint.objects.create(
        team=acme,
        sandbox=sandbox,
        template_version=base_version_row,
        host=local_host,
        status=CheckpointStatus.READY,
        cpu_count=1,
        memory_mb=512,
    )
    return {"template": lab.pk, "version": version.pk, "volume": volume.pk, "checkpoint": checkpoint.pk}


def _posts(o: dict[str, int]) -> list[tuple[str, dict[str, str | int]]]:
    t, v = o["template"], o["version"]
    return [
        (_url("acme", "templates", t, "delete"), {}),
        (_url("acme", "templates", t, "tags"), {"version": v, "tag": "x"}),
        (_url("acme", "templates", t, "tags", "remove"), {"tag": "stable"}),
        (_url("acme", "templates", t, "versions", v, "delete"), {}),
        (_url("acme", "templates", t, "versions", v, "cancel"), {}),
        (_url("acme", "templates", t, "versions", v, "retry"), {}),
        (_url("acme", "volumes", "new"), {"name": "fresh"}),
        (_url("acme", "volumes", o["volume"], "delete"), {}),
        (_url("acme", "checkpoints", o["checkpoint"], "restore"), {}),
        (_url("acme", "checkpoints", o["checkpoint"], "delete"), {}),
    ]


def _gets(o: dict[str, int]) -> list[str]:
    t, v = o["template"], o["version"]
    return [
        _url("acme", "templates", t),
        _url("acme", "templates", t, "versions", v),
        _url("acme", "templates", t, "versions", v, "log"),
        _url("acme", "volumes", o["volume"]),
        _url("acme", "volumes", o["volume"], "download") + "?path=/a",
    ]


def test_a_viewer_sees_every_page_and_is_refused_every_post(viewer: Actor, objects: dict[str, int]) -> None:
    client = signed_in(viewer)
    for url in _gets(objects):
        assert client.get(url).status_code in (200, 302), url
    for url, body in _posts(objects):
        assert client.post(url, body).status_code == 403, url
    assert TemplateVersion.objects.get(pk=objects["version"]).status == VersionStatus.DRAFT
    assert Volume.objects.count() == 1 and Checkpoint.objects.count() == 1
    assert TemplateTag.objects.count() == 1 and not AuditEvent.objects.exists()


def test_another_teams_objects_are_404(outsider: Actor, objects: dict[str, int]) -> None:
    client = signed_in(outsider)
    for url in _gets(objects):
        assert client.get(url).status_code == 404, url
    for url, body in _posts(objects):
        assert client.post(url, body).status_code == 404, url


def test_a_members_own_team_does_not_reach_acmes_objects(outsider: Actor, objects: dict[str, int]) -> None:
    # the outsider's own team in the URL, acme's object ids after it
    client = signed_in(outsider)
    mine = outsider.personal_team.slug
    for url in _gets(objects):
        assert client.get(url.replace("/t/acme/", f"/t/{mine}/")).status_code == 404, url
    for url, body in _posts(objects):
        if "volumes/new" in url:
            continue
        assert client.post(url.replace("/t/acme/", f"/t/{mine}/"), body).status_code == 404, url


def test_malformed_ids_are_404(owner: Actor, acme: Team) -> None:
    client = signed_in(owner)
    for bad in ("abc", "0", "-1", "²", "99999999999999999999999"):
        assert client.get(_url("acme", "templates", bad)).status_code == 404
        assert client.get(_url("acme", "volumes", bad)).status_code == 404
        assert client.post(_url("acme", "checkpoints", bad, "delete")).status_code == 404


# --- volumes --------------------------------------------------------------------------------


@pytest.fixture
def small_volumes(settings, tmp_path):
    settings.VOLUME_SIZE_GIB = 1
    settings.RUNTIME_HOST_DATA_DIR = tmp_path / "runtime"


def test_a_member_creates_and_deletes_a_volume(
    member: Actor, acme: Team, small_volumes, local_host, django_capture_on_commit_callbacks
) -> None:
    client = signed_in(member)

    created = client.post(_url("acme", "volumes", "new"), {"name": "cache"})

    volume = Volume.objects.get(team=acme)
    assert (volume.name, volume.state, volume.size_bytes) == ("cache", "ready", 2**30)
    assert created["Location"] == _url("acme", "volumes", volume.pk)
    listed = client.get(_url("acme", "volumes")).content.decode()
    assert f'data-volume-id="{volume.pk}"' in listed and "1.0\xa0GB" in listed and "detached" in listed

    with django_capture_on_commit_callbacks(execute=True):
        deleted = client.post(_url("acme", "volumes", volume.pk, "delete"))
    assert deleted["Location"] == _url("acme", "volumes")
    assert not Volume.objects.exists() and not volume.image_path.exists()
    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["volume.delete", "volume.create"]


def test_volume_refusals_are_messages(member: Actor, acme: Team, local_host, small_volumes) -> None:
    client = signed_in(member)
    bad = client.post(_url("acme", "volumes", "new"), {"name": "../etc"}, follow=True)
    sandbox = _sandbox(team=acme, host=local_host)
    held = Volume.objects.create(team=acme, name="held", size_bytes=2**30, host=local_host, holder=sandbox)
    attached = client.post(_url("acme", "volumes", held.pk, "delete"), follow=True)

    assert _messages(bad)[0].startswith("name: a volume name is 1-63 letters")
    assert _messages(attached)[0].startswith(f"Volume held is attached to sandbox {sandbox.pk}")
    assert list(Volume.objects.values_list("name", flat=True)) == ["held"]


def test_the_volume_list_costs_the_same_queries_for_3_or_30_volumes(
    owner: Actor, acme: Team, local_host
) -> None:
    client = signed_in(owner)

    def queries_with(count: int) -> int:
        Volume.objects.all().delete()
        Sandbox.objects.all().delete()
        for n in range(count):
            holder = _sandbox(team=acme, host=local_host, volume_mounts=[{"name": f"v{n}", "path": "/data"}])
            Volume.objects.create(team=acme, name=f"v{n}", size_bytes=2**30, host=local_host, holder=holder)
        client.get(_url("acme", "volumes"))  # the session's first request does more
        with CaptureQueriesContext(connection) as captured:
            assert client.get(_url("acme", "volumes")).status_code == 200
        return len(captured)

    assert queries_with(3) == queries_with(30)


@pytest.fixture
def filled(member: Actor, acme: Team, local_host, small_volumes) -> Volume:
    """A volume holding /work/notes.txt and /work/deep/bin.dat."""
    volume = volume_services.volume_create(user=member.user, name="data", team="acme")
    volume_services.detached(
        volume, engine.write_file, "/work/notes.txt", b"hello <world>", write=True, force=True
    )
    volume_services.detached(
        volume, engine.write_file, "/work/deep/bin.dat", b"\x00\xff", write=True, force=True
    )
    return volume


def test_the_file_browser_lists_navigates_and_downloads(viewer: Actor, filled: Volume) -> None:
    client = signed_in(viewer)
    base = _url("acme", "volumes", filled.pk)

    root = client.get(base).content.decode()
    work = client.get(base, {"path": "/work"}).content.decode()
    download = client.get(f"{base}/download", {"path": "/work/notes.txt"})

    assert '<a href="?path=%2Fwork">work/</a>' in root
    assert '<a href="?path=%2Fwork%2Fdeep">deep/</a>' in work
    assert f'href="{base}/download?path=%2Fwork%2Fnotes.txt" download>notes.txt</a>' in work
    assert '<a href="?path=%2Fwork">work/</a>' in work  # the crumb back up
    assert download.status_code == 200 and download.content == b"hello <world>"
    assert download["Content-Type"] == "application/octet-stream"
    assert download["Content-Disposition"] == 'attachment; filename="notes.txt"'


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/../etc/passwd", "must not contain '..'"),
        ("/work/../../b", "must not contain '..'"),
        ("relative", "must be absolute"),
        ("/a\x00b", "Null characters are not allowed"),
        ("/d" * 129, "deeper than 128 levels"),
    ],
)
def test_paths_outside_the_volume_are_refused_with_a_clear_message(
    viewer: Actor, filled: Volume, path: str, words: str
) -> None:
    client = signed_in(viewer)
    base = _url("acme", "volumes", filled.pk)

    listed = client.get(base, {"path": path})
    downloaded = client.get(f"{base}/download", {"path": path}, follow=True)

    assert listed.status_code == 200
    problem = re.search(r"data-path-problem>([^<]*)<", listed.content.decode())
    assert problem and words in problem[1].replace("&#x27;", "'"), listed.content.decode()[-2000:]
    assert 'data-entry-type="' not in listed.content.decode()
    assert words in _messages(downloaded)[0]
    assert downloaded.redirect_chain[-1][0].startswith(f"{base}?path=%2F")  # back to a directory


def test_a_missing_file_a_directory_and_an_attached_volume_are_messages(
    viewer: Actor, filled: Volume, local_host
) -> None:
    client = signed_in(viewer)
    base = _url("acme", "volumes", filled.pk)

    missing = client.get(f"{base}/download", {"path": "/work/nope"}, follow=True)
    directory = client.get(f"{base}/download", {"path": "/work"}, follow=True)
    holder = _sandbox(team=filled.team, host=local_host)
    Volume.objects.filter(pk=filled.pk).update(holder=holder)
    attached = client.get(base).content.decode()

    assert "not found" in _messages(missing)[0]
    assert missing.redirect_chain[-1][0] == f"{base}?path=%2Fwork"
    assert "directory" in _messages(directory)[0]
    assert f"attached to sandbox {holder.pk}" in attached


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture
def running(acme: Team, local_host, base_version_row: TemplateVersion, fake_driver: FakeDriver) -> Sandbox:
    """A ready sandbox of acme whose (fake) VM runs on a disk holding some bytes."""
    sandbox = _sandbox(
        team=acme,
        host=local_host,
        template_version=base_version_row,
        template=base_version_row.template,
        agent_port=free_tcp_port(),
        agent_secret_encrypted=crypto.encrypt_text("s" * 32),
    )
    spec = sandbox_spec(
        sandbox.vm_name,
        fake_driver.state_dir,
        vcpus=1,
        memory_mb=512,
        kernel=Path("/vmlinuz"),
        initrd=Path("/initrd.img"),
        cmdline="",
        backing=Path("/base.qcow2"),
    )
    fake_driver.boot(spec)
    spec.disk_path.write_bytes(b"root disk bytes")
    return sandbox


def _checkpoint(owner: Actor, sandbox: Sandbox, name: str = "before-upgrade") -> Checkpoint:
    return checkpoint_services.checkpoint_create(
        user=owner.user, sandbox=sandbox, name=name, quiesce_mode="crash"
    )


def test_the_checkpoint_list_shows_status_size_and_source(
    viewer: Actor, owner: Actor, running: Sandbox
) -> None:
    taken = _checkpoint(owner, running)

    page = signed_in(viewer).get(_url("acme", "checkpoints")).content.decode()

    assert f'data-checkpoint-id="{taken.pk}"' in page and "before-upgrade" in page
    assert '<span class="badge ready">ready</span>' in page
    assert f'href="/dashboard/t/acme/sandboxes/{running.pk}">{running.pk}</a>' in page
    assert (
        'data-action="checkpoint-restore" disabled title="Your role in this team (viewer) is read-only."'
        in page
    )


def test_the_checkpoint_list_costs_the_same_queries_for_3_or_30(
    owner: Actor, acme: Team, local_host, base_version_row: TemplateVersion
) -> None:
    client = signed_in(owner)

    def queries_with(count: int) -> int:
        Checkpoint.objects.all().delete()
        for _ in range(count):
            sandbox = _sandbox(team=acme, host=local_host, template_version=base_version_row)
            Checkpoint.objects.create(
                team=acme,
                sandbox=sandbox,
                template_version=base_version_row,
                host=local_host,
                status=CheckpointStatus.READY,
                cpu_count=1,
                memory_mb=512,
            )
        client.get(_url("acme", "checkpoints"))  # the session's first request does more
        with CaptureQueriesContext(connection) as captured:
            assert client.get(_url("acme", "checkpoints")).status_code == 200
        return len(captured)

    assert queries_with(3) == queries_with(30)


def test_restoring_a_checkpoint_opens_the_new_sandbox(
    member: Actor, owner: Actor, running: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a checkpoint, and a runtime whose VM start succeeds (the fake has no guest agent)
    taken = _checkpoint(owner, running)
    monkeypatch.setattr(vm, "start", lambda sandbox, version, **kwargs: vm.Started(free_tcp_port(), "secret"))

    # when a member restores it
    response = signed_in(member).post(_url("acme", "checkpoints", taken.pk, "restore"))

    # then a new ready sandbox came from it, and the answer opens its page
    restored = Sandbox.objects.get(restored_from=taken)
    assert restored.state == S.READY and restored.team_id == running.team_id
    assert response.status_code == 302
    assert response["Location"] == f"/dashboard/t/acme/sandboxes/{restored.pk}"
    event = AuditEvent.objects.get(action="sandbox.restore")
    assert event.target == str(restored.pk) and event.detail["checkpoint"] == taken.pk


def test_a_restore_that_cannot_start_is_a_message(member: Actor, owner: Actor, running: Sandbox) -> None:
    taken = _checkpoint(owner, running)
    taken.path.unlink()  # its file is gone (its host's disk was lost)

    response = signed_in(member).post(_url("acme", "checkpoints", taken.pk, "restore"), follow=True)

    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == _url("acme", "checkpoints")
    assert "checkpoint" in _messages(response)[0].lower()
    assert not Sandbox.objects.filter(restored_from=taken).exists()


def test_deleting_a_checkpoint_frees_its_file_once(
    member: Actor, owner: Actor, running: Sandbox, django_capture_on_commit_callbacks
) -> None:
    taken = _checkpoint(owner, running)
    client = signed_in(member)

    with django_capture_on_commit_callbacks(execute=True):
        deleted = client.post(_url("acme", "checkpoints", taken.pk, "delete"), follow=True)
    again = client.post(_url("acme", "checkpoints", taken.pk, "delete"))

    assert _messages(deleted) == ["Checkpoint before-upgrade deleted."]
    assert not Checkpoint.objects.exists() and not taken.path.exists()
    assert again.status_code == 404
    assert AuditEvent.objects.get().action == "checkpoint.delete"


def test_restoring_a_pending_checkpoint_is_refused_with_a_message(
    member: Actor, owner: Actor, running: Sandbox, settings
) -> None:
    taken = _checkpoint(owner, running)
    Checkpoint.objects.filter(pk=taken.pk).update(status=CheckpointStatus.PENDING)
    settings.CHECKPOINT_WAIT_SECONDS = 0

    response = signed_in(member).post(_url("acme", "checkpoints", taken.pk, "restore"), follow=True)

    assert response.status_code == 200
    assert _messages(response) == [f"Checkpoint {taken.pk} is still being captured; try again shortly."]
    assert Sandbox.objects.count() == 1

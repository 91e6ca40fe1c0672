"""Template builds on a real Celery worker and real VMs, driven by the real SDK."""

from __future__ import annotations

import base64
import shlex
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.conf import settings as django_settings

from templates_app import images
from templates_app.builds import build_steps, template_build_start
from tests.conftest import VM_TEST_PREFIX, Actor, celery_worker, helper_process_env
from tests.edge_support import ServerThread
from tests.sdk import run_scenario
from tests.waiting import wait_until


def test_build_spec_becomes_ordered_steps() -> None:
    spec = {
        "packages": {"apt": ["git"], "pip": ["six"]},
        "setup": ["echo one", "echo two"],
        "files": [{"path": "/a b/c", "content_b64": "aGk="}],
    }

    steps = build_steps(spec)

    assert [s.name for s in steps] == ["packages.apt", "packages.pip", "files", "setup[0]", "setup[1]"]
    assert steps[0].command.endswith("git python3-pip")
    assert steps[2].files == (("/a b/c", "aGk="),)


def test_a_python_image_is_its_own_step_with_a_python_command_and_pip() -> None:
    # given a spec on python:3.11 that also asks for pip packages
    spec = {"packages": {"apt": ["git", "python3-pip"], "pip": ["six"]}}

    # when it becomes steps
    steps = build_steps(spec, images.image_family("python:3.11"))

    # then the image comes first, runs without the env, gives `python` and lets pip install;
    # the user's apt step holds only what the image did not already install
    image = steps[0]
    assert [s.name for s in steps] == ["from_image", "packages.apt", "packages.pip"]
    assert image.env_free and not any(s.env_free for s in steps[1:])
    assert image.command.endswith("python3 python3-pip python3-venv python-is-python3")
    assert [(path, base64.b64decode(data).decode()) for path, data in image.files] == [
        ("/etc/pip.conf", "[global]\nbreak-system-packages = true\n")
    ]
    assert steps[1].command.endswith(" git")


def test_workdir_steps_create_their_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # given the steps the SDK makes after `WORKDIR <dir>` (a quoted path, then a bare one),
    # as root and as another user, for directories that do not exist yet
    spaced, bare = tmp_path / "srv" / "my app", tmp_path / "plain" / "dir"
    as_root = f"cd {shlex.quote(str(spaced))} && pwd > where.txt"
    as_user = f"su -s /bin/bash -c {shlex.quote(f'cd {bare} && true')} nobody"

    # when they become steps and the first runs in a shell
    first, second = (s.command for s in build_steps({"setup": [as_root, as_user]}))
    subprocess.run(["/bin/sh", "-c", first], check=True, cwd=tmp_path)

    # then the directory was created and the command ran in it; the su form creates its own
    assert (spaced / "where.txt").read_text().strip() == str(spaced)
    assert second == f"mkdir -p {bare} && {as_user}"
    assert build_steps({"setup": ["cd"]})[0].command == "cd"  # no WORKDIR prefix: unchanged


def test_an_env_only_invalidates_the_layers_after_the_image(
    local_host, base_version_row, owner, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from templates_app import layers
    from templates_app.builds import planned_steps
    from templates_app.models import BuildLayer

    # given two builds on python:3.11 that differ only in a later ENV
    spec = {"from_image": "python:3.11", "setup": ["echo $GREETING > /greeting"]}
    first, second = (
        template_build_start(
            user=owner.user,
            name="py",
            cpu=1,
            memory_mb=512,
            tags=[],
            team_slug=None,
            build_spec={**spec, "env": {"GREETING": g}},
        )
        for g in ("hello", "bonjour")
    )
    # when the first build's layers are in the cache and the second is planned
    (_, _, ours), (_, steps, theirs) = planned_steps(first), planned_steps(second)
    parent = None
    for index, key in enumerate(ours):
        path = tmp_path / f"{key}.qcow2"
        path.write_bytes(b"layer")
        parent = BuildLayer.objects.create(
            host=local_host,
            key=key,
            parent=parent,
            step=f"step{index}",
            base_version=base_version_row,
            path=str(path),
        )

    # then the image layer is shared (a cache hit) and only the step run with the env differs
    assert [s.name for s in steps] == ["from_image", "setup[0]"]
    assert theirs[0] == ours[0] and theirs[1] != ours[1]
    assert [layer.key for layer in layers.cached_prefix(local_host, theirs)] == ours[:1]


@pytest.fixture
def build_worker(require_postgres) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    """A real Celery worker on the test database and broker, naming VMs like the tests."""
    assert django_settings.REDIS_URL, "builds need the Redis broker in tests"
    with celery_worker(helper_process_env()) as worker:
        yield worker


@pytest.mark.vm
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_sdk_builds_a_template_and_starts_sandboxes_from_it(
    owner: Actor, base_version, vm_cleanup, build_worker, settings
) -> None:  # type: ignore[no-untyped-def]
    from watasu.asgi import application

    server = ServerThread(application)  # ASGI: the data plane needs WebSockets
    settings.PUBLIC_URL = server.url
    with server:
        output = run_scenario(
            "template_build", api_url=f"{server.url}/v1", api_key=owner.write_key, timeout=1200
        )

    assert output.startswith("ok "), output
    print(output)


def _build_in_a_long_step(owner: Actor, name: str):  # type: ignore[no-untyped-def]
    """A build queued for the worker, once it runs its 10-minute step; (version, its VM's name)."""
    from templates_app.builds import template_build_start

    version = template_build_start(
        user=owner.user,
        name=name,
        build_spec={"setup": ["sleep 600"]},
        cpu=1,
        memory_mb=512,
        tags=[],
        team_slug=None,
    )
    wait_until(
        lambda: version.log_entries.filter(message__startswith="setup[0]").exists(),
        180,
        "the build to reach its step",
    )
    return version, f"{VM_TEST_PREFIX}build-{version.pk}"


@pytest.mark.vm
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_build_whose_worker_dies_is_failed_and_leaves_no_vm(
    owner: Actor, base_version, vm_cleanup, build_worker
) -> None:  # type: ignore[no-untyped-def]
    """The worker is SIGKILLed mid-step: the lease runs out, the sweep fails the build and
    removes its VM; the template is free for the next build."""
    from templates_app.builds import builds_sweep
    from templates_app.models import TemplateVersion, VersionStatus

    version, vm_name = _build_in_a_long_step(owner, "slow")
    assert vm_name in vm_cleanup.list_domains(vm_name)

    build_worker.kill()
    build_worker.wait(timeout=30)
    version.refresh_from_db()
    assert version.status == VersionStatus.BUILDING  # nobody noticed yet
    result = builds_sweep(now=version.lease_expires_at + timedelta(seconds=1))  # the lease ran out

    version.refresh_from_db()
    assert result["failed"] == 1
    assert version.status == VersionStatus.FAILED and "lease expired" in version.last_error_message
    assert vm_cleanup.list_domains(vm_name) == []
    assert not TemplateVersion.objects.filter(status=VersionStatus.BUILDING).exists()


def test_the_build_cache_is_never_shared_across_teams(
    local_host, base_version_row, owner, outsider, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from templates_app import layers
    from templates_app.models import BuildLayer

    # given team A's cached layers for two steps on the base version
    steps, env = ["apt-get install -y jq", "pip install requests"], {"TOKEN": "a-secret"}
    ours = layers.step_keys(base_version_row, steps, env, True, owner.personal_team.pk)
    parent = None
    for index, key in enumerate(ours):
        path = tmp_path / f"{key}.qcow2"
        path.write_bytes(b"layer")
        parent = BuildLayer.objects.create(
            host=local_host,
            key=key,
            parent=parent,
            step=f"setup[{index}]",
            base_version=base_version_row,
            path=str(path),
        )

    # when team B plans the very same steps with the same env
    theirs = layers.step_keys(base_version_row, steps, env, True, outsider.personal_team.pk)

    # then none of A's layers is in B's reach, while A finds its whole chain
    assert set(theirs).isdisjoint(ours)
    assert layers.cached_prefix(local_host, theirs) == []
    assert [layer.key for layer in layers.cached_prefix(local_host, ours)] == ours
    assert layers.artifact_key(theirs[-1], {}, env, 1, 512) != layers.artifact_key(ours[-1], {}, env, 1, 512)


@pytest.fixture
def ready_agent(settings, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The real guest agent on the host, the start log in tmp_path, a 3 s ready limit and a
    progress line every second (the product's 10 s, scaled down)."""
    from sandboxes.runtime.agent_client import AgentClient
    from sandboxes.runtime.buildvm import BuildVm
    from templates_app.builds import ready
    from tests.edge_support import RealAgent
    from tests.fake_driver import FakeDriver

    settings.TEMPLATE_READY_TIMEOUT_SECONDS = 3
    monkeypatch.setattr(ready, "READY_REPORT_SECONDS", 1.0)
    monkeypatch.setattr(ready, "START_LOG", str(tmp_path / "start.log"))
    with RealAgent("ready-secret-" + "r" * 24) as agent:
        # The agent runs on the host: the build VM's driver has no VM to drive here.
        yield BuildVm(
            FakeDriver(state_dir=tmp_path / "sandboxes"),
            "ready-check",
            AgentClient(agent.port, secret=agent.secret),
        )


def _draft_log(acme):  # type: ignore[no-untyped-def]
    from templates_app.builds import BuildLog
    from templates_app.models import Template, TemplateVersion

    template = Template.objects.create(team=acme, slug="ready", name="Ready")
    return BuildLog(TemplateVersion.objects.create(template=template, version="b1", cpu=1, memory_mb=512))


@pytest.mark.django_db
def test_a_waiting_ready_check_logs_its_progress_and_names_its_limit(acme, ready_agent) -> None:  # type: ignore[no-untyped-def]
    from templates_app.builds.ready import start_and_wait_ready

    # given a start command that prints and then never becomes ready
    log = _draft_log(acme)
    spec = {"start_cmd": "echo warming-up-$STAGE; sleep 5", "ready_cmd": "test -e /nonexistent-ready"}

    # when the template is started and its ready check waits
    with pytest.raises(RuntimeError) as failure:
        start_and_wait_ready(spec, {"STAGE": "one"}, log)(ready_agent)
    log.flush()

    # then every second of waiting logged a line with the elapsed time, the limit and the
    # start command's output, and the failure names the limit
    progress = [e.message for e in log.version.log_entries.order_by("index")]
    assert len(progress) >= 2, progress
    assert progress[0].startswith("ready check: not ready after 1 s (limit 3 s)"), progress
    assert all("warming-up-one" in line for line in progress), progress
    assert "within 3 s (WATASU_TEMPLATE_READY_TIMEOUT_SECONDS)" in str(failure.value)
    assert "warming-up-one" in str(failure.value)


@pytest.mark.django_db
def test_a_ready_check_that_takes_longer_than_a_report_still_passes(acme, ready_agent, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from templates_app.builds.ready import start_and_wait_ready

    # given a ready check that itself takes longer than the report interval
    log = _draft_log(acme)
    marker = tmp_path / "up"
    spec = {"start_cmd": f"echo starting; touch {marker}", "ready_cmd": f"sleep 1.5; test -e {marker}"}

    # when the template is started
    start_and_wait_ready(spec, {}, log)(ready_agent)
    log.flush()

    # then the attempt was not cut short: progress was logged while it ran, then it passed
    messages = [e.message for e in log.version.log_entries.order_by("index")]
    assert messages[0].startswith(
        "ready check: not ready after 1 s (limit 3 s); start command output: starting"
    ), messages
    assert messages[-1].startswith("ready check passed after"), messages


@pytest.mark.vm
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_cancelled_running_build_stops_and_leaves_no_vm(
    owner: Actor, base_version, vm_cleanup, build_worker
) -> None:  # type: ignore[no-untyped-def]
    """Cancelled mid-step (from the dashboard): the worker notices at its next lease renewal,
    removes the build VM, and the template is free for the next build."""
    from templates_app.builds import build_cancel
    from templates_app.models import VersionStatus

    version, vm_name = _build_in_a_long_step(owner, "cancel-me")

    cancelled = build_cancel(user=owner.user, version=version)

    assert (
        cancelled.status == VersionStatus.FAILED
        and "Cancelled by owner@acme.test" in cancelled.last_error_message
    )
    wait_until(lambda: vm_cleanup.list_domains(vm_name) == [], 60, "the build VM to be removed")
    wait_until(
        lambda: version.log_entries.filter(message__contains="build stopped").exists(),
        60,
        "the worker to log that it stopped",
    )
    assert build_worker.poll() is None  # the worker itself lives on

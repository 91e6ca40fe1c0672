"""Template builds: the SDK's `POST /templates` turned into a version built on a worker.

A build never runs user commands on the host. The worker restores the parent
template's snapshot as a build VM over a fresh overlay, runs each step through
the guest agent (logging its output), flattens the resulting disk into a
standalone image, then boots that image once, runs the start command and the
ready check, and takes the memory snapshot that sandboxes start from.
"""

from __future__ import annotations

import base64
import logging
import shlex
import subprocess
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from sandboxes.models import Host
from sandboxes.runtime import driver_for, lifecycle
from sandboxes.runtime.agent_client import AgentClient
from sandboxes.runtime.images import BaseImage
from teams.models import User
from teams.selectors import team_for_write, teams_of_user
from templates_app.models import BuildLogEntry, Template, TemplateTag, TemplateVersion, VersionStatus
from templates_app.selectors import template_by_id_or_alias, template_version_resolve
from watasu import errors

logger = logging.getLogger(__name__)

STEP_TIMEOUT = 1800.0
READY_TIMEOUT = timedelta(seconds=180)
# Public images the SDK can ask for, built on our Debian base: extra apt packages.
IMAGE_PACKAGES = {"debian": [], "python": ["python3-pip", "python3-venv"], "node": ["nodejs", "npm"]}
APT = "DEBIAN_FRONTEND=noninteractive apt-get update -q && " \
      "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "


@dataclass(frozen=True)
class Step:
    name: str  # e.g. "packages.apt", "setup[2]"
    command: str


# --- request -> version ---------------------------------------------------------------------


def _parent_and_image_packages(spec: dict[str, Any]) -> tuple[str, list[str]]:
    image = spec.get("from_image")
    if image:
        family = str(image).split(":")[0].rsplit("/", 1)[-1]
        if family not in IMAGE_PACKAGES or spec.get("from_image_registry"):
            supported = ", ".join(f"{name}:*" for name in IMAGE_PACKAGES)
            raise errors.Invalid(f"Image '{image}' cannot be imported; supported images: {supported}, "
                                 "or from_template.", code="oci_image_import_disabled")
        return "base", IMAGE_PACKAGES[family]
    return str(spec.get("from_template") or "base"), []


def build_steps(spec: dict[str, Any], image_packages: list[str]) -> list[Step]:
    """The build spec as commands, in the documented order: packages, files, setup."""
    packages = spec.get("packages") or {}
    apt = [*image_packages, *packages.get("apt", [])]
    pip, npm = packages.get("pip", []), packages.get("npm", [])
    if pip and "python3-pip" not in apt:
        apt.append("python3-pip")
    steps = []
    if apt:
        steps.append(Step("packages.apt", APT + " ".join(map(shlex.quote, apt))))
    if pip:
        steps.append(Step("packages.pip", "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q "
                          + " ".join(map(shlex.quote, pip))))
    if npm:
        steps.append(Step("packages.npm", "npm install -g " + " ".join(map(shlex.quote, npm))))
    for index, item in enumerate(spec.get("files") or []):
        path, data = str(item["path"]), str(item.get("content_b64", ""))
        mode = f" && chmod {int(item['mode']):o} {shlex.quote(path)}" if item.get("mode") else ""
        steps.append(Step(f"files[{index}]", f"mkdir -p \"$(dirname {shlex.quote(path)})\" && "
                          f"echo {shlex.quote(data)} | base64 -d > {shlex.quote(path)}{mode}"))
    for index, command in enumerate(spec.get("setup") or []):
        steps.append(Step(f"setup[{index}]", str(command)))
    return steps


def _validate_spec(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise errors.Invalid("build_spec must be an object.", errors=["build_spec: invalid"])
    for item in spec.get("files") or []:
        if not isinstance(item, dict) or not str(item.get("path", "")).startswith("/"):
            raise errors.Invalid("build_spec.files need absolute paths.", errors=["files: invalid"])
        base64.b64decode(str(item.get("content_b64", "")), validate=True)
    return spec


def template_build_start(*, user: User, name: str, build_spec: Any, cpu: int, memory_mb: int,
                         tags: list[str], team_slug: str | None) -> TemplateVersion:
    """Create the template (alias) if new and a draft version; the worker builds it."""
    spec = _validate_spec(build_spec)
    alias, _, tag = name.partition(":")
    team = team_for_write(user=user, slug=team_slug)
    parent_slug, _ = _parent_and_image_packages(spec)
    template_version_resolve(team=team, selector=parent_slug)  # 422 now, not after queueing
    template, _ = Template.objects.get_or_create(team=team, slug=alias, defaults={"name": alias})
    version = TemplateVersion.objects.create(
        template=template, version=f"build-{uuid.uuid4().hex[:10]}", status=VersionStatus.DRAFT,
        cpu=cpu, memory_mb=memory_mb,
        build_spec={**spec, "tags": sorted({*tags, *([tag] if tag else [])})})
    from templates_app.tasks import template_build_task

    transaction.on_commit(lambda: template_build_task.delay(version.pk))
    return version


# --- logs ---------------------------------------------------------------------------------------


def _log(version: TemplateVersion, message: str, level: str = "info") -> None:
    for _ in range(3):  # indexes are unique per version; a race simply retries
        last = version.log_entries.aggregate(m=Max("index"))["m"]
        try:
            BuildLogEntry.objects.create(version=version, index=0 if last is None else last + 1,
                                         at=timezone.now(), level=level, message=message[:20000])
            return
        except IntegrityError:
            continue


def build_log_entries(*, version: TemplateVersion, offset: int) -> list[BuildLogEntry]:
    return list(version.log_entries.filter(index__gte=max(offset, 0)).order_by("index"))


# --- the worker's part ------------------------------------------------------------------------


def _run_steps(version: TemplateVersion, client: AgentClient, steps: list[Step],
               env: dict[str, str]) -> None:
    for step in steps:
        _log(version, f"{step.name}: {step.command[:500]}")
        result = client.exec(["/bin/sh", "-c", step.command], timeout=STEP_TIMEOUT, env=env)
        output = (result.get("stdout", "") + result.get("stderr", "")).strip()
        for line in output.splitlines()[-200:]:
            _log(version, line, "debug")
        if result.get("exit_code") != 0:
            raise BuildStepFailed(step, int(result.get("exit_code") or -1), output)


class BuildStepFailed(Exception):
    def __init__(self, step: Step, code: int, output: str) -> None:
        super().__init__(f"step {step.name} failed with exit code {code}: {output[-2000:]}")
        self.step = step


def _flatten(overlay: Path, dest: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(overlay), str(dest)], check=True,
                   capture_output=True, timeout=1800)
    dest.chmod(0o444)


def _start_and_wait_ready(spec: dict[str, Any], env: dict[str, str]):  # type: ignore[no-untyped-def]
    def prepare(client: AgentClient) -> None:
        if spec.get("start_cmd"):
            client.exec(["/bin/sh", "-c", spec["start_cmd"]], background=True, env=env)
        if spec.get("ready_cmd"):
            deadline = timezone.now() + READY_TIMEOUT
            while client.exec(["/bin/sh", "-c", spec["ready_cmd"]], timeout=60, env=env)["exit_code"] != 0:
                if timezone.now() > deadline:
                    raise RuntimeError(f"ready command never succeeded: {spec['ready_cmd']}")
    return prepare


def _build(version: TemplateVersion, host: Host) -> Path:
    spec = version.build_spec
    parent_slug, image_packages = _parent_and_image_packages(spec)
    parent = template_version_resolve(team=version.template.team, selector=parent_slug)
    snapshot = lifecycle.load_template_snapshot(parent.artifact_dir)
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    driver = driver_for(host)
    root = Path(host.data_dir) / "templates" / version.template.slug
    root.mkdir(parents=True, exist_ok=True)
    name = f"{driver_name_prefix()}build-{version.pk}"
    vm = lifecycle.start_from_snapshot(driver, snapshot, name, root, env_vars=env)
    try:
        _run_steps(version, vm.client, build_steps(spec, image_packages), env)
        vm.client.exec("sync", timeout=60)
        driver.forget(name)  # stop the VM, keep its disk
        disk = root / f"{version.version}.qcow2"
        _log(version, "flattening the image")
        _flatten(vm.spec.disk_path, disk)
    finally:
        driver.destroy(name)
        vm.spec.disk_path.unlink(missing_ok=True)  # the build overlay, flattened or failed
    artifact = root / f"{version.version}-{uuid.uuid4().hex[:8]}"
    _log(version, "starting the template and taking its memory snapshot")
    image = BaseImage(key="", directory=root, kernel=snapshot.kernel, initrd=snapshot.initrd,
                      disk=disk, kernel_version="")
    lifecycle.make_template_snapshot(image, artifact, driver, vcpus=version.cpu,
                                     memory_mb=version.memory_mb,
                                     before_save=_start_and_wait_ready(spec, env))
    return artifact


def driver_name_prefix() -> str:
    from django.conf import settings

    return settings.RUNTIME_VM_PREFIX


def _claim(version_id: int) -> TemplateVersion | None:
    """DRAFT -> BUILDING once; a second delivery of the task finds nothing to do."""
    claimed = TemplateVersion.objects.filter(pk=version_id, status=VersionStatus.DRAFT).update(
        status=VersionStatus.BUILDING, build_started_at=timezone.now())
    return TemplateVersion.objects.select_related("template__team").get(pk=version_id) if claimed else None


def template_build_run(*, version_id: int) -> None:
    """Build a claimed version on this worker's host; failures fail the version with a reason."""
    from sandboxes.services import host_register_local

    version = _claim(version_id)
    if version is None:
        return
    _log(version, f"building {version.template.slug}:{version.version}")
    try:
        artifact = _build(version, host_register_local())
    except Exception as exc:
        logger.exception("build of version %s failed", version_id)
        _log(version, str(exc), "error")
        TemplateVersion.objects.filter(pk=version.pk).update(
            status=VersionStatus.FAILED, last_error_message=str(exc)[:4000])
        return
    with transaction.atomic():
        TemplateVersion.objects.filter(pk=version.pk).update(
            status=VersionStatus.READY, host=host_register_local(), artifact_dir=str(artifact),
            size_bytes=sum(f.stat().st_blocks * 512 for f in artifact.rglob("*") if f.is_file()),
            built_at=timezone.now())
        for tag in version.build_spec.get("tags", []):
            TemplateTag.objects.update_or_create(template=version.template, tag=tag,
                                                 defaults={"version": version})
    _log(version, "ready")


def template_build_get(*, user: User, template_id: str, build_id: str) -> TemplateVersion:
    template = template_by_id_or_alias(teams=teams_of_user(user=user), value=template_id)
    version = template.versions.filter(pk=int(build_id)).first() if build_id.isdigit() else None
    if version is None:
        raise errors.NotFound(f"Build {build_id} not found.", code="template_build_not_found")
    return version

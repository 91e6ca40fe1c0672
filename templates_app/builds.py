"""Template builds: the SDK's `POST /templates` turned into a version built on a worker.

A build never runs user commands on the host. The worker restores the parent
template's snapshot as a build VM over a fresh overlay, runs each step through
the guest agent (logging its output), flattens the resulting disk into a
standalone image, then boots that image once, runs the start command and the
ready check, and takes the memory snapshot that sandboxes start from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from sandboxes.models import Host
from sandboxes.runtime import driver_for, lifecycle
from sandboxes.runtime.agent_client import AgentClient, AgentError
from sandboxes.runtime.driver import MemorySnapshot
from sandboxes.runtime.images import BaseImage
from sandboxes.specs import env_map
from teams.models import User
from teams.selectors import team_for_write, teams_of_user
from templates_app import images, layers
from templates_app.models import (
    BuildLayer,
    BuildLogEntry,
    Template,
    TemplateTag,
    TemplateVersion,
    VersionStatus,
)
from templates_app.selectors import template_by_id_or_alias, template_version_resolve
from watasu import crypto, errors, ids, suggest

logger = logging.getLogger(__name__)

STEP_TIMEOUT = 1800.0
# While a ready check waits, the build log gets a progress line at least this often.
READY_REPORT_SECONDS = 10.0
# Where the start command's output goes in the guest (read back while the ready check
# waits; sandboxes started from the template keep appending to it).
START_LOG = "/var/log/watasu-start.log"
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?$")
APT = "DEBIAN_FRONTEND=noninteractive apt-get update -q && " \
      "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
# The SDK turns `set_workdir(X)` / a Dockerfile `WORKDIR X` into `cd X && ` before each
# later command (inside `su ... -c` when a USER is set); the quoted or bare directory.
CD_PREFIX = re.compile(r"cd ('(?:[^']|'\"'\"')*'|[^\s'\"&|;]+) && ")
SU_PREFIX = ("su", "-s", "/bin/bash", "-c")
# Keys of the build spec and of the objects in it; anything else is a 422 naming it.
SPEC_KEYS = ("from_template", "base", "from_image", "requested_from_image", "from_image_registry",
             "packages", "files", "setup", "env", "start_cmd", "ready_cmd", "allow_internet_access")
PACKAGE_KEYS = ("apt", "pip", "npm")
FILE_KEYS = ("path", "source_path", "content_b64", "mode", "user")
# Other spellings SDKs send for a key: the TypeScript SDK's type names the parent `base`.
SPEC_ALIASES = {"base": "from_template", "requested_from_image": "from_image"}


@dataclass(frozen=True)
class Step:
    name: str  # e.g. "from_image", "packages.apt", "files", "setup[2]"
    command: str  # what runs; with ``files``, runs after they are written
    files: tuple[tuple[str, str], ...] = ()  # (path, base64 content) written through the agent
    # The image step makes the image the spec names: it runs, and is keyed, without the
    # build env, so changing an ENV never rebuilds it.
    env_free: bool = False

    @property
    def cache_text(self) -> str:
        """What identifies the step for the build cache (file contents by digest)."""
        if not self.files:
            return self.command
        digest = hashlib.sha256(json.dumps(self.files).encode()).hexdigest()
        return f"files sha256:{digest}; {self.command}"


# --- request -> version ---------------------------------------------------------------------


def _parent_and_image(spec: dict[str, Any]) -> tuple[str, images.ImageFamily | None]:
    """The template a build starts from, and the image family it makes on top (if any)."""
    image = spec.get("from_image")
    if image:
        if spec.get("from_image_registry"):
            raise images.image_import_disabled(str(image))
        return "base", images.image_family(str(image))
    return str(spec.get("from_template") or "base"), None


def _image_step(image: images.ImageFamily | None) -> list[Step]:
    if image is None or not (image.packages or image.files):
        return []
    files = tuple((path, base64.b64encode(text.encode()).decode()) for path, text in image.files)
    command = APT + " ".join(image.packages) if image.packages else "true"
    return [Step("from_image", command, files, env_free=True)]


def build_steps(spec: dict[str, Any], image: images.ImageFamily | None = None) -> list[Step]:
    """The build spec as commands, in the documented order: the image, packages, files, setup."""
    packages = spec.get("packages") or {}
    provided = set(image.packages) if image else set()
    apt = [name for name in packages.get("apt", []) if name not in provided]
    pip, npm = packages.get("pip", []), packages.get("npm", [])
    if pip and "python3-pip" not in {*apt, *provided}:
        apt.append("python3-pip")
    steps = _image_step(image)
    if apt:
        steps.append(Step("packages.apt", APT + " ".join(map(shlex.quote, apt))))
    if pip:
        steps.append(Step("packages.pip", "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q "
                          + " ".join(map(shlex.quote, pip))))
    if npm:
        steps.append(Step("packages.npm", "npm install -g " + " ".join(map(shlex.quote, npm))))
    if spec.get("files"):
        steps.append(_files_step(spec["files"]))
    for index, command in enumerate(spec.get("setup") or []):
        steps.append(Step(f"setup[{index}]", with_workdir_created(str(command))))
    return steps


def with_workdir_created(command: str) -> str:
    """A step the SDK prefixed with `cd DIR && ` creates DIR first, as Docker's WORKDIR
    does (as root, like Docker, also when the step then runs as another user)."""
    inner = command
    if command.startswith(" ".join(SU_PREFIX) + " "):
        try:
            argv = shlex.split(command)
        except ValueError:
            return command
        if len(argv) != 6 or tuple(argv[:4]) != SU_PREFIX:
            return command
        inner = argv[4]
    match = CD_PREFIX.match(inner)
    return f"mkdir -p {match[1]} && {command}" if match else command


def _files_step(files: list[dict[str, Any]]) -> Step:
    """Every file of the build context in one step (one layer), then modes and owners."""
    fixups = []
    for item in files:
        path = shlex.quote(item["path"])
        if item.get("mode") is not None:
            fixups.append(f"chmod {int(item['mode']):o} {path}")
        if item.get("user"):
            fixups.append(f"chown {shlex.quote(str(item['user']))} {path}")
    return Step("files", " && ".join(fixups) or "true",
                tuple((str(item["path"]), str(item.get("content_b64", ""))) for item in files))


def _invalid(field: str, message: str) -> errors.Invalid:
    return errors.Invalid(message, errors=[f"build_spec.{field}: invalid"])


def _validate_spec(spec: Any) -> dict[str, Any]:
    """Shape checks that would otherwise fail deep inside a build (or silently do something
    else: an unknown key is refused, never ignored); normalises aliases and start_cmd."""
    if not isinstance(spec, dict):
        raise errors.Invalid("build_spec must be an object.", errors=["build_spec: invalid"])
    suggest.refuse_unknown_keys(spec, SPEC_KEYS, where="build_spec")
    spec = _unaliased(spec)
    _validate_files(spec.get("files") or [])
    _validate_packages(spec.get("packages") or {})
    setup = spec.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(c, str) for c in setup):
        raise _invalid("setup", "build_spec.setup must be a list of commands.")
    for key in ("start_cmd", "ready_cmd", "from_template", "from_image"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise _invalid(key, f"build_spec.{key} must be a string.")
    env_map(spec.get("env"), "build_spec.env")  # as a sandbox's env_vars: exportable names, strings
    if spec.get("from_image") and spec.get("from_template"):
        raise _invalid("from_image", "build_spec names both from_image and from_template; a build starts "
                       "from one of them.")
    if not isinstance(spec.get("allow_internet_access", True), bool):
        raise _invalid("allow_internet_access", "build_spec.allow_internet_access must be true or false.")
    return {**spec, "start_cmd": _exec_form(spec["start_cmd"])} if spec.get("start_cmd") else spec


def _unaliased(spec: dict[str, Any]) -> dict[str, Any]:
    """Another SDK's spelling of a key (`base`) as ours (`from_template`); both, differing, is a 422."""
    spec = dict(spec)
    for alias, key in SPEC_ALIASES.items():
        if alias not in spec:
            continue
        value = spec.pop(alias)
        if spec.get(key) not in (None, value):
            raise _invalid(alias, f"build_spec.{alias} and build_spec.{key} name the same thing; "
                           "send one of them.")
        spec[key] = value
    return spec


def _validate_packages(packages: Any) -> None:
    if isinstance(packages, dict):
        suggest.refuse_unknown_keys(packages, PACKAGE_KEYS, where="build_spec.packages")
    if not isinstance(packages, dict) or not all(
            isinstance(names, list) and all(isinstance(name, str) for name in names)
            for names in packages.values()):
        raise _invalid("packages", "build_spec.packages must map apt/pip/npm to lists of package names.")


def _validate_files(files: Any) -> None:
    if not isinstance(files, list):
        raise _invalid("files", "build_spec.files must be a list.")
    for index, item in enumerate(files):
        field = f"files[{index}]"
        if isinstance(item, dict):
            suggest.refuse_unknown_keys(item, FILE_KEYS, where=f"build_spec.{field}")
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
            raise _invalid(field, f"{field}.path must be an absolute path inside the template "
                           "(copy to a destination such as /app/, not a relative one).")
        try:
            base64.b64decode(str(item.get("content_b64", "")), validate=True)
        except ValueError as exc:
            raise _invalid(field, f"{field}.content_b64 is not base64.") from exc
        mode = item.get("mode")
        if mode is not None and (type(mode) is not int or not 0 <= mode <= 0o7777):
            raise _invalid(field, f"{field}.mode must be permission bits as an integer (e.g. 493 for 0755).")
        if item.get("user") is not None and not USER.match(str(item["user"])):
            raise _invalid(field, f"{field}.user must be 'user' or 'user:group'.")


def _exec_form(command: str) -> str:
    """A Dockerfile's exec-form CMD (`["python3", "app.py"]`) as a shell command."""
    if command.lstrip().startswith("["):
        try:
            argv = json.loads(command)
        except ValueError:
            return command
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return shlex.join(argv)
    return command


def template_build_start(*, user: User, name: str, build_spec: Any, cpu: int, memory_mb: int,
                         tags: list[str], team_slug: str | None,
                         skip_cache: bool = False) -> TemplateVersion:
    """`POST /templates`: the template (alias) is created if new; a draft version is queued."""
    spec = _validate_spec(build_spec)
    alias, _, tag = name.partition(":")
    team = team_for_write(user=user, slug=team_slug)
    _check_parent(team, spec)
    template, _ = Template.objects.get_or_create(team=team, slug=alias, deleted_at__isnull=True,
                                                 defaults={"name": alias})
    return _queue(template, f"build-{uuid.uuid4().hex[:10]}", spec, cpu, memory_mb,
                  sorted({*tags, *([tag] if tag else [])}), skip_cache)


def template_version_create(*, user: User, template: Template, version: str, build_spec: Any,
                            cpu: int, memory_mb: int, skip_cache: bool = False) -> TemplateVersion:
    """`POST /sandbox_templates/{id}/versions`: a named draft version of an existing template."""
    from templates_app.services import writable_template

    writable_template(user, template)
    spec = _validate_spec(build_spec)
    _check_parent(template.team, spec)
    if template.versions.filter(version=version).exists():
        raise errors.Conflict(f"Version '{version}' already exists.", code="template_version_exists")
    try:
        with transaction.atomic():
            return _queue(template, version, spec, cpu, memory_mb, [], skip_cache)
    except IntegrityError as exc:  # a concurrent request took the name
        raise errors.Conflict(f"Version '{version}' already exists.",
                              code="template_version_exists") from exc


def _check_parent(team: Any, spec: dict[str, Any]) -> None:
    parent_slug, _ = _parent_and_image(spec)
    template_version_resolve(team=team, selector=parent_slug)  # 422 now, not after queueing


def _queue(template: Template, version: str, spec: dict[str, Any], cpu: int, memory_mb: int,
           tags: list[str], skip_cache: bool) -> TemplateVersion:
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    public = {key: value for key, value in spec.items() if key != "env"}
    row = TemplateVersion.objects.create(
        template=template, version=version, status=VersionStatus.DRAFT, cpu=cpu, memory_mb=memory_mb,
        skip_cache=skip_cache, build_spec={**public, "env_keys": sorted(env), "tags": tags},
        env_encrypted=crypto.encrypt_json(env) if env else "")
    from templates_app.tasks import template_build_task

    transaction.on_commit(lambda: template_build_task.delay(row.pk))
    return row


# --- logs ---------------------------------------------------------------------------------------


class BuildLog:
    """A version's build log, written to the database as lines arrive.

    One build writes one version's log, so indexes are counted here; lines are
    flushed in small batches (at most every ``FLUSH_SECONDS``) so a chatty step
    costs a few inserts a second, and readers see output while the step runs.
    """

    FLUSH_SECONDS, FLUSH_LINES = 0.5, 200

    def __init__(self, version: TemplateVersion) -> None:
        self.version = version
        last = version.log_entries.aggregate(m=Max("index"))["m"]
        self.next_index = 0 if last is None else last + 1
        self.pending: list[BuildLogEntry] = []
        self.flushed_at = time.monotonic()
        self.partial: dict[str, bytes] = {}

    def add(self, message: str, level: str = "info") -> None:
        self.pending.append(BuildLogEntry(version=self.version, index=self.next_index, at=timezone.now(),
                                          level=level, message=message[:20000]))
        self.next_index += 1
        if (len(self.pending) >= self.FLUSH_LINES
                or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS):
            self.flush()

    def output(self, stream: str, data: bytes) -> None:
        """Raw process output: complete lines are logged, a partial line waits for its end."""
        lines = (self.partial.pop(stream, b"") + data).split(b"\n")
        self.partial[stream] = lines.pop()
        for line in lines:
            self.add(line.decode(errors="replace").rstrip("\r"), "debug")

    def end_output(self) -> None:
        for stream in list(self.partial):
            rest = self.partial.pop(stream)
            if rest:
                self.add(rest.decode(errors="replace"), "debug")

    def flush(self) -> None:
        if self.pending:
            BuildLogEntry.objects.bulk_create(self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()


def build_log_entries(*, version: TemplateVersion, offset: int) -> list[BuildLogEntry]:
    return list(version.log_entries.filter(index__gte=max(offset, 0)).order_by("index"))


# --- the worker's part ------------------------------------------------------------------------


class BuildStepFailed(Exception):
    def __init__(self, step: Step, code: int, tail: str) -> None:
        super().__init__(f"step {step.name} failed with exit code {code}: {tail[-2000:]}")
        self.step = step


def _run_step(log: BuildLog, client: AgentClient, step: Step, env: dict[str, str]) -> None:
    """One step through the agent, its output streamed into the log as it comes."""
    tail = bytearray()

    def on_output(stream: str, data: bytes) -> None:
        tail.extend(data)
        del tail[:-4000]
        log.output(stream, data)

    if step.files:
        log.add(f"{step.name}: writing {len(step.files)} file(s)")
        client.request("POST", "/runtime/v1/files/write_files", timeout=STEP_TIMEOUT,
                       body={"files": [{"path": path, "data_base64": data} for path, data in step.files]})
    log.add(f"{step.name}: {step.command[:500]}")
    code = client.run_streaming(step.command, on_output, env=env, timeout=STEP_TIMEOUT)
    log.end_output()
    if code != 0:
        raise BuildStepFailed(step, code, tail.decode(errors="replace").strip())


def _flatten(top: Path, dest: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(top), str(dest)], check=True,
                   capture_output=True, timeout=1800)
    dest.chmod(0o444)


def _start_and_wait_ready(spec: dict[str, Any], env: dict[str, str],
                          log: BuildLog) -> Callable[[AgentClient], None]:
    def prepare(client: AgentClient) -> None:
        if spec.get("start_cmd"):
            # The agent discards a background command's output; the log keeps it for the
            # ready check's progress lines (and for the sandboxes, which keep writing it).
            client.exec(["/bin/sh", "-c", f"exec >>{START_LOG} 2>&1\n{spec['start_cmd']}"],
                        background=True, env=env)
        if spec.get("ready_cmd"):
            wait_ready(client, spec["ready_cmd"], env, log)
    return prepare


def wait_ready(client: AgentClient, ready_cmd: str, env: dict[str, str], log: BuildLog) -> None:
    """Run the ready check until it exits 0, within WATASU_TEMPLATE_READY_TIMEOUT_SECONDS.

    A check may itself take long (`sleep 20`), so each attempt runs in a thread while this
    one logs, at least every READY_REPORT_SECONDS, how long it has waited, the limit and the
    start command's recent output: a build stuck here says why instead of going quiet.
    """
    limit = settings.TEMPLATE_READY_TIMEOUT_SECONDS
    started = time.monotonic()
    reported = started
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ready-check") as pool:
        while (remaining := limit - (time.monotonic() - started)) > 0:
            attempt = pool.submit(client.exec, ["/bin/sh", "-c", ready_cmd], timeout=remaining, env=env)
            while True:
                try:
                    result = attempt.result(timeout=max(0.0, reported + READY_REPORT_SECONDS
                                                        - time.monotonic()))
                    break
                except FutureTimeout:
                    reported = time.monotonic()
                    log.add(f"ready check: not ready after {reported - started:.0f} s "
                            f"(limit {limit} s); start command output: {_start_output(client)}")
                    log.flush()
            if result.get("exit_code") == 0:
                log.add(f"ready check passed after {time.monotonic() - started:.0f} s")
                return
            time.sleep(min(0.5, max(0.0, limit - (time.monotonic() - started))))
    raise RuntimeError(f"ready command did not succeed within {limit} s "
                       f"(WATASU_TEMPLATE_READY_TIMEOUT_SECONDS): {ready_cmd}; "
                       f"start command output: {_start_output(client)}")


def _start_output(client: AgentClient, lines: int = 5) -> str:
    """The last lines the start command wrote, on one line, or why there are none."""
    try:
        result = client.exec(["tail", "-n", str(lines), START_LOG], timeout=10)
    except (OSError, AgentError) as exc:
        return f"(unreadable: {exc})"
    text = " | ".join(line for line in str(result.get("stdout", "")).splitlines() if line.strip())
    return text[-1000:] if text else "(none yet)"


@dataclass
class _Plan:
    """What a build needs to know before it starts a VM."""

    parent: TemplateVersion
    snapshot: MemorySnapshot
    steps: list[Step]
    keys: list[str]
    env: dict[str, str]
    internet: bool


def planned_steps(version: TemplateVersion) -> tuple[TemplateVersion, list[Step], list[str]]:
    """The version built on, the steps, and each step's layer key."""
    spec = version.build_spec
    parent_slug, image = _parent_and_image(spec)
    parent = template_version_resolve(team=version.template.team, selector=parent_slug)
    steps = build_steps(spec, image)
    keys = layers.step_keys(parent, [s.cache_text for s in steps], version.build_env(), _internet(spec),
                            version.template.team_id, env_free=sum(s.env_free for s in steps))
    return parent, steps, keys


def _internet(spec: dict[str, Any]) -> bool:
    return spec.get("allow_internet_access", True) is not False


def _plan(version: TemplateVersion) -> _Plan:
    parent, steps, keys = planned_steps(version)
    return _Plan(parent, lifecycle.load_template_snapshot(parent.artifact_dir), steps, keys,
                 version.build_env(), _internet(version.build_spec))


def _run_uncached_steps(version: TemplateVersion, host: Host, plan: _Plan, cached: list[BuildLayer],
                        log: BuildLog) -> list[Path]:
    """Boot on the last cached layer (or restore the parent), run the remaining steps,
    turning each into a layer. Returns the layer files made, the last step's last."""
    driver = driver_for(host)
    directory = layers.layers_dir(host)
    name = build_vm_names(version.pk)[0]
    start = len(cached)
    top = directory / f"{plan.keys[start]}-{uuid.uuid4().hex[:8]}.qcow2"
    if cached:
        image = BaseImage(key="", directory=directory, kernel=plan.snapshot.kernel,
                          initrd=plan.snapshot.initrd, disk=Path(cached[-1].path), kernel_version="")
        vm = lifecycle.cold_boot(driver, image, name, directory, vcpus=plan.snapshot.vcpus,
                                 memory_mb=plan.snapshot.memory_mb, internet=plan.internet, disk_path=top)
    else:
        vm = lifecycle.start_from_snapshot(driver, plan.snapshot, name, directory, internet=plan.internet,
                                           disk_path=top)
    parent_layer = cached[-1] if cached else None
    registrable, produced = True, [top]
    try:
        for index in range(start, len(plan.steps)):
            step = plan.steps[index]
            _run_step(log, vm.client, step, {} if step.env_free else plan.env)
            # Quiesce, then freeze what the step wrote: the running disk becomes a layer.
            vm.client.exec(["fsfreeze", "-f", "/"], timeout=60)
            finished = top
            if index + 1 < len(plan.steps):
                top = directory / f"{plan.keys[index + 1]}-{uuid.uuid4().hex[:8]}.qcow2"
                driver.snapshot_disk(name, top)
                produced.append(top)
                vm.client.exec(["fsfreeze", "-u", "/"], timeout=60)
            else:
                driver.forget(name)  # stopped frozen: the last layer is consistent
            if registrable:
                parent_layer = layers.register(host=host, key=plan.keys[index], parent=parent_layer,
                                               base_version=plan.parent, step=step.name, path=finished)
                registrable = parent_layer is not None
    except BaseException:
        driver.destroy(name)
        _drop_unregistered(produced)
        raise
    driver.forget(name)
    return produced


def _drop_unregistered(paths: list[Path]) -> None:
    for path in paths:
        if not layers.is_registered(path):
            path.unlink(missing_ok=True)


def _build(version: TemplateVersion, host: Host, log: BuildLog) -> Path:
    """Build into a fresh version directory and return its snapshot directory.

    The directory holds ``base.qcow2`` (the flattened disk) and ``snapshot/`` (the
    memory image and its overlay on ``base.qcow2``): everything the version needs and
    nothing another version needs.
    """
    plan = _plan(version)
    root = Path(host.data_dir) / "templates" / version.template.slug
    home = root / f"{version.version}-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    try:
        return _build_into(version, host, log, plan, home)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise


def _build_into(version: TemplateVersion, host: Host, log: BuildLog, plan: _Plan, home: Path) -> Path:
    spec = version.build_spec
    last_key = plan.keys[-1] if plan.keys else layers.base_key(plan.parent, version.template.team_id)
    key = layers.artifact_key(last_key, spec, plan.env, version.cpu, version.memory_mb)
    TemplateVersion.objects.filter(pk=version.pk).update(cache_key=key)

    hit = None if version.skip_cache else layers.cached_artifact(host, key)
    if hit is not None:
        log.add(f"cache hit: every step and the start/ready commands are unchanged since version "
                f"{hit.version} (build {hit.pk}); reusing its artifact")
        return layers.link_artifact(Path(hit.artifact_dir), home)

    cached = [] if version.skip_cache else layers.cached_prefix(host, plan.keys)
    for step in plan.steps[:len(cached)]:
        log.add(f"{step.name}: cached")
    if version.skip_cache:
        log.add("skip_cache: every step runs")
    produced: list[Path] = []
    if len(cached) < len(plan.steps):
        produced = _run_uncached_steps(version, host, plan, cached, log)
        last = produced[-1]
    else:
        last = Path(cached[-1].path) if cached else plan.snapshot.disk_path
    disk = home / layers.BASE_DISK
    try:
        log.add("flattening the image")
        log.flush()
        _flatten(last, disk)
    finally:
        _drop_unregistered(produced)
    log.add("starting the template and taking its memory snapshot")
    log.flush()
    image = BaseImage(key="", directory=home, kernel=plan.snapshot.kernel, initrd=plan.snapshot.initrd,
                      disk=disk, kernel_version="")
    lifecycle.make_template_snapshot(image, home / layers.SNAPSHOT_DIR, driver_for(host),
                                     vcpus=version.cpu, memory_mb=version.memory_mb,
                                     name=build_vm_names(version.pk)[1],
                                     before_save=_start_and_wait_ready(spec, plan.env, log))
    return home / layers.SNAPSHOT_DIR


def _claim(version_id: int) -> TemplateVersion | None:
    """DRAFT -> BUILDING once, and only while no other build of the template runs.

    The template row lock serialises claims; a draft that finds its template busy stays
    a draft and is queued again when the running build ends (or by the builds sweep).
    """
    with transaction.atomic():
        version = (TemplateVersion.objects.select_related("template__team")
                   .filter(pk=version_id, status=VersionStatus.DRAFT, deleted_at__isnull=True).first())
        if version is None:
            return None
        Template.objects.select_for_update().filter(pk=version.template_id).first()
        if version.template.versions.filter(status=VersionStatus.BUILDING).exists():
            return None
        now = timezone.now()
        # Conditional: a template deletion that held the lock first retired this draft.
        if not TemplateVersion.objects.filter(pk=version_id, status=VersionStatus.DRAFT,
                                              deleted_at__isnull=True).update(
                status=VersionStatus.BUILDING, build_started_at=now,
                lease_expires_at=now + timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS)):
            return None
    version.refresh_from_db()
    return version


class _Lease:
    """Renews a building version's lease from a thread while the build runs; a worker
    that dies stops renewing, and the builds sweep fails the version."""

    def __init__(self, version_id: int) -> None:
        self.version_id, self.stop = version_id, threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{version_id}", daemon=True)

    def _run(self) -> None:
        from django.db import connection

        lease = timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS)
        try:
            while not self.stop.wait(lease.total_seconds() / 4):
                TemplateVersion.objects.filter(pk=self.version_id, status=VersionStatus.BUILDING).update(
                    lease_expires_at=timezone.now() + lease)
        finally:
            connection.close()

    def __enter__(self) -> _Lease:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _fail(version_id: int, message: str) -> int:
    """BUILDING -> FAILED with a reason; returns 1 if this call did it."""
    return TemplateVersion.objects.filter(pk=version_id, status=VersionStatus.BUILDING).update(
        status=VersionStatus.FAILED, last_error_message=message[:4000], lease_expires_at=None)


def _queue_next_draft(template_id: int) -> None:
    from templates_app.tasks import template_build_task

    draft = (TemplateVersion.objects.filter(template_id=template_id, status=VersionStatus.DRAFT,
                                            deleted_at__isnull=True).order_by("pk").first())
    if draft is not None:
        template_build_task.delay(draft.pk)


def template_build_run(*, version_id: int) -> None:
    """Build a claimed version on this worker's host; failures fail the version with a reason."""
    from sandboxes.services import host_register_local

    version = _claim(version_id)
    if version is None:
        return
    host = host_register_local()
    log = BuildLog(version)
    log.add(f"building {version.template.slug}:{version.version}")
    try:
        with _Lease(version.pk):
            artifact = _build(version, host, log)
    except Exception as exc:
        logger.exception("build of version %s failed", version_id)
        log.add(str(exc), "error")
        log.flush()
        _fail(version.pk, str(exc))
        _queue_next_draft(version.template_id)
        return
    with transaction.atomic():
        done = TemplateVersion.objects.filter(pk=version.pk, status=VersionStatus.BUILDING).update(
            status=VersionStatus.READY, host=host, artifact_dir=str(artifact), lease_expires_at=None,
            size_bytes=sum(f.stat().st_blocks * 512 for f in artifact.parent.rglob("*") if f.is_file()),
            built_at=timezone.now())
        if done:
            for tag in version.build_spec.get("tags", []):
                TemplateTag.objects.update_or_create(template=version.template, tag=tag,
                                                     defaults={"version": version})
    log.add("ready" if done else "the build was failed while it ran (lease lost); result discarded",
            "info" if done else "error")
    log.flush()
    if not done:
        shutil.rmtree(artifact, ignore_errors=True)
    _queue_next_draft(version.template_id)


def builds_sweep(*, now: datetime | None = None) -> dict[str, int]:
    """Fail builds whose worker stopped renewing the lease, and queue drafts nobody picked up."""
    now = now or timezone.now()
    failed = 0
    for version in TemplateVersion.objects.filter(status=VersionStatus.BUILDING,
                                                  lease_expires_at__lt=now).select_related("host"):
        if _fail(version.pk, "the build worker stopped (lease expired); start the build again"):
            failed += 1
            log = BuildLog(version)
            log.add("build worker lost: the build is failed", "error")
            log.flush()
            _destroy_build_vms(version)
    stale = now - timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS)
    queued = 0
    for template_id in (TemplateVersion.objects.filter(status=VersionStatus.DRAFT, created_at__lt=stale,
                                                       deleted_at__isnull=True)
                        .values_list("template_id", flat=True).distinct()):
        _queue_next_draft(template_id)
        queued += 1
    return {"failed": failed, "queued": queued}


def build_vm_names(version_id: int) -> tuple[str, str]:
    """The build VM running the steps, and the one taking the memory snapshot."""
    name = f"{settings.RUNTIME_VM_PREFIX}build-{version_id}"
    return name, f"{name}-final"


def _destroy_build_vms(version: TemplateVersion) -> None:
    from sandboxes.services import host_register_local

    driver = driver_for(version.host or host_register_local())
    for name in build_vm_names(version.pk):
        driver.destroy(name)  # idempotent: a VM that is not there is nothing to do


def template_build_get(*, user: User, template_id: str, build_id: str) -> TemplateVersion:
    template = template_by_id_or_alias(teams=teams_of_user(user=user), value=template_id)
    pk = ids.db_id(build_id)
    version = template.versions.filter(pk=pk).first() if pk is not None else None
    if version is None:
        raise errors.NotFound(f"Build {build_id} not found.", code="template_build_not_found")
    return version

"""A build spec: checked, normalised, and turned into the ordered steps a build runs.

What each step runs, and what identifies it for the build cache, is decided here; the
steps run in a build VM (``worker.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from sandboxes.specs import env_map
from templates_app import images
from watasu import errors, suggest

USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?$")
APT = (
    "DEBIAN_FRONTEND=noninteractive apt-get update -q && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
)
# The SDK turns `set_workdir(X)` / a Dockerfile `WORKDIR X` into `cd X && ` before each
# later command (inside `su ... -c` when a USER is set); the quoted or bare directory.
CD_PREFIX = re.compile(r"cd ('(?:[^']|'\"'\"')*'|[^\s'\"&|;]+) && ")
SU_PREFIX = ("su", "-s", "/bin/bash", "-c")
# Keys of the build spec and of the objects in it; anything else is a 422 naming it.
SPEC_KEYS = (
    "from_template",
    "base",
    "from_image",
    "requested_from_image",
    "from_image_registry",
    "packages",
    "files",
    "setup",
    "env",
    "start_cmd",
    "ready_cmd",
    "allow_internet_access",
)
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


def parent_and_image(spec: dict[str, Any]) -> tuple[str, images.ImageFamily | None]:
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
        steps.append(
            Step(
                "packages.pip",
                "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q " + " ".join(map(shlex.quote, pip)),
            )
        )
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
    return Step(
        "files",
        " && ".join(fixups) or "true",
        tuple((str(item["path"]), str(item.get("content_b64", ""))) for item in files),
    )


def _invalid(field: str, message: str) -> errors.Invalid:
    return errors.Invalid(message, errors=[f"build_spec.{field}: invalid"])


def validate_spec(spec: Any) -> dict[str, Any]:
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
        raise _invalid(
            "from_image",
            "build_spec names both from_image and from_template; a build starts from one of them.",
        )
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
            raise _invalid(
                alias, f"build_spec.{alias} and build_spec.{key} name the same thing; send one of them."
            )
        spec[key] = value
    return spec


def _validate_packages(packages: Any) -> None:
    if isinstance(packages, dict):
        suggest.refuse_unknown_keys(packages, PACKAGE_KEYS, where="build_spec.packages")
    if not isinstance(packages, dict) or not all(
        isinstance(names, list) and all(isinstance(name, str) for name in names)
        for names in packages.values()
    ):
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
            raise _invalid(
                field,
                f"{field}.path must be an absolute path inside the template "
                "(copy to a destination such as /app/, not a relative one).",
            )
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


def internet(spec: dict[str, Any]) -> bool:
    """Whether the build VM may reach the internet (it may unless the spec says no)."""
    return spec.get("allow_internet_access", True) is not False

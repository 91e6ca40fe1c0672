"""Parsing of sandbox request bodies into typed specs.

Accepts both spellings the clients use: the SDK's (`template`, `envs`,
list-form `volume_mounts`) and the docs' (`template_id`, `env_vars`, map-form
mounts). Objects we define (`lifecycle`, `network_policy`) refuse unknown keys; the
top level of a create, which clients fill with options of their own, refuses only
near-misses of known keys (`timeuot`): a typo must never silently change what
happens to a sandbox. Every rejected value gets its own error code.
Lengths are checked here (422 naming the field), never left to the database.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from django.conf import settings

from sandboxes.models import OnTimeout
from sandboxes.specs import DEFAULT_TIMEOUT, CreateSpec, Lifecycle
from watasu import errors, ids, suggest
from watasu.api.fields import has_control_characters

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ALL_TRAFFIC = "0.0.0.0/0"
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LENGTH = 256
MAX_PATH_LENGTH = 4096  # Linux PATH_MAX
MAX_METADATA_VALUE_LENGTH = 4096
# Longest accepted value of each string option of a create request.
MAX_LENGTHS = {"team": 63, "template": 200, "template_id": 200, "snapshot_id": 255, "name": 200}


def _invalid(code: str, message: str) -> errors.Invalid:
    return errors.Invalid(message, code=code, errors=[message])


def _present(body: dict[str, Any], key: str) -> bool:
    return body.get(key) is not None  # JSON null means absent


def _whole(value: Any) -> bool:
    """A JSON number without a fraction (1e400 would be an infinite float: not whole)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


def parse_timeout(value: Any) -> int:
    limit = settings.SANDBOX_MAX_TIMEOUT_SECONDS
    if not _whole(value):
        raise _invalid("invalid_timeout", "timeout must be a whole number of seconds.")
    if not 1 <= value <= limit:
        raise _invalid("invalid_timeout", f"timeout must be between 1 and {limit} seconds.")
    return int(value)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid("validation_failed", f"{key} must be true or false.")
    return value


LIFECYCLE_KEYS = ("on_timeout", "auto_resume", "onTimeout", "autoResume")


def _spelled_once(raw: dict[str, Any], key: str, camel: str) -> Any:
    """`raw[key]` or its camelCase spelling; both, with different values, is a 422."""
    if key in raw and camel in raw and raw[key] != raw[camel]:
        raise _invalid("invalid_lifecycle", f"lifecycle.{key} and lifecycle.{camel} name the same "
                       "setting with different values; send one of them.")
    return raw.get(key, raw.get(camel))


def parse_lifecycle(body: dict[str, Any]) -> Lifecycle:
    raw = body.get("lifecycle")
    auto_pause = _bool(body, "auto_pause", False)
    if raw is None:
        return Lifecycle(on_timeout=OnTimeout.PAUSE if auto_pause else OnTimeout.KILL)
    if not isinstance(raw, dict):
        raise _invalid("invalid_lifecycle", "lifecycle must be an object.")
    # {"on_timout": "pause"} absorbed would destroy the sandbox at its deadline.
    suggest.refuse_unknown_keys(raw, LIFECYCLE_KEYS, where="lifecycle", code="invalid_lifecycle")
    on_timeout = _spelled_once(raw, "on_timeout", "onTimeout")
    if on_timeout is None:
        on_timeout = OnTimeout.PAUSE if auto_pause else OnTimeout.KILL
    if on_timeout not in OnTimeout.values:
        raise _invalid("invalid_lifecycle", "lifecycle.on_timeout must be 'kill' or 'pause'.")
    if auto_pause and on_timeout != OnTimeout.PAUSE:
        # the SDK sends on_timeout 'kill' for a lifecycle without one: say which wins, never guess
        raise _invalid("invalid_lifecycle", "auto_pause is true but lifecycle.on_timeout is "
                       f"'{on_timeout}'; send lifecycle.on_timeout 'pause' (auto_pause may then be "
                       "left out).")
    auto_resume = _spelled_once(raw, "auto_resume", "autoResume")
    if auto_resume is None:
        auto_resume = False
    if not isinstance(auto_resume, bool):
        raise _invalid("invalid_lifecycle", "lifecycle.auto_resume must be true or false.")
    if auto_resume and on_timeout != OnTimeout.PAUSE:
        raise _invalid("invalid_lifecycle",
                       "lifecycle.auto_resume can only be true when lifecycle.on_timeout is 'pause'.")
    return Lifecycle(on_timeout=on_timeout, auto_resume=auto_resume)


def env_map(value: Any, key: str) -> dict[str, str]:
    """An env object (sandbox `env_vars`, a build spec's `env`): exportable names, string values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("validation_failed", f"{key} must be an object of strings.")
    for name, item in value.items():
        if not ENV_NAME.fullmatch(name):
            raise _invalid("validation_failed", f"{key}: '{name}' is not a valid variable name.")
        if not isinstance(item, str):
            raise _invalid("validation_failed", f"{key}: the value of '{name}' must be a string.")
    return dict(value)


def parse_env_vars(body: dict[str, Any]) -> dict[str, str]:
    """`envs` (SDK) merged with `env_vars` (docs); `env_vars` wins."""
    return {**env_map(body.get("envs"), "envs"), **env_map(body.get("env_vars"), "env_vars")}


def metadata_value(value: Any) -> str:
    """Stringify as the spec recommends: JSON text for non-strings, '' for null."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def parse_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("validation_failed", "metadata must be an object.")
    if len(value) > MAX_METADATA_KEYS:
        raise _invalid("validation_failed", f"metadata may have at most {MAX_METADATA_KEYS} keys.")
    metadata = {}
    for key, item in value.items():
        if not key or len(key) > MAX_METADATA_KEY_LENGTH or has_control_characters(key):
            raise _invalid("validation_failed", f"metadata keys must be 1 to {MAX_METADATA_KEY_LENGTH} "
                           "characters without control characters.")
        text = metadata_value(item)
        if len(text) > MAX_METADATA_VALUE_LENGTH:
            raise _invalid("validation_failed", f"metadata.{key[:64]} must be at most "
                           f"{MAX_METADATA_VALUE_LENGTH} characters.")
        metadata[key] = text
    return metadata


def parse_shape(body: dict[str, Any]) -> tuple[int | None, int | None]:
    cpu, memory = body.get("cpu_count"), body.get("memory_mb")
    allowed = settings.SANDBOX_ALLOWED_CPU
    if cpu is not None and (type(cpu) is not int or cpu not in allowed):
        raise _invalid("invalid_resources",
                       f"cpu_count must be one of {', '.join(map(str, allowed))}.")
    if memory is not None:
        low, high = settings.SANDBOX_MEMORY_MIN_MB, settings.SANDBOX_MEMORY_MAX_MB
        step = settings.SANDBOX_MEMORY_INCREMENT_MB
        if isinstance(memory, bool) or not isinstance(memory, int) or not low <= memory <= high \
                or memory % step:
            raise _invalid("invalid_resources",
                           f"memory_mb must be between {low} and {high} in steps of {step}.")
    return cpu, memory


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Options this platform cannot honour yet fail loudly instead of being dropped."""
    if body.get("volume_mounts"):
        raise _invalid("volumes_unavailable", "Volume mounts are not available on this platform yet.")
    if body.get("mcp"):
        raise _invalid("mcp_unavailable", "The MCP gateway is not available on this platform yet.")
    allow_out = body.get("allow_out") or []
    if not isinstance(allow_out, list):
        raise _invalid("validation_failed", "allow_out must be a list.")
    if [rule for rule in allow_out if rule != ALL_TRAFFIC] or body.get("deny_out") \
            or body.get("rules") or body.get("mask_request_host"):
        raise _invalid("network_rules_unavailable",
                       "Per-host egress rules are not available yet; use allow_internet_access.")
    if body.get("egress_profile") or body.get("egress_profiles"):
        raise _invalid("network_rules_unavailable",
                       "Egress profiles are not available yet; use allow_internet_access.")
    network_class = body.get("network_class")
    if network_class is not None and network_class != settings.SANDBOX_DEFAULT_NETWORK_CLASS:
        raise _invalid("validation_failed",
                       f"network_class must be '{settings.SANDBOX_DEFAULT_NETWORK_CLASS}'.")


NETWORK_KEYS = frozenset({"allow_internet_access", "allow_package_registry_access", "allow_public_traffic",
                          "allow_out", "deny_out", "rules", "mask_request_host", "network_class"})


def _with_network_policy(body: dict[str, Any]) -> dict[str, Any]:
    """`network_policy: {...}` (the shape sandboxes are shown in) means the same as its keys
    at the top level (the SDK's shape); never silently dropped, never contradicting them."""
    nested = body.get("network_policy")
    if nested is None:
        return body
    if not isinstance(nested, dict):
        raise _invalid("validation_failed", "network_policy must be an object.")
    suggest.refuse_unknown_keys(nested, sorted(NETWORK_KEYS), where="network_policy",
                                code="validation_failed")
    for key, value in nested.items():
        if key in body and body[key] != value:
            raise _invalid("validation_failed", f"{key} is given twice with different values "
                           "(top level and network_policy).")
    return {**body, **nested}


def _network_policy(body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    internet = _bool(body, "allow_internet_access", True)
    policy = {
        "allow_internet_access": internet,
        "allow_package_registry_access": _bool(body, "allow_package_registry_access", internet),
        "allow_public_traffic": _bool(body, "allow_public_traffic", True),
        "allow_out": [], "deny_out": [],
    }
    return internet, policy


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise _invalid("validation_failed", f"{key} must be a non-empty string.")
    text, limit = str(value), MAX_LENGTHS[key]
    if len(text) > limit:
        raise _invalid("validation_failed", f"{key} must be at most {limit} characters.")
    if has_control_characters(text):
        raise _invalid("validation_failed", f"{key} must not contain control characters.")
    return text


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    pk = ids.db_id(value)
    if pk is None:
        raise _invalid("validation_failed", f"{key} must be an integer id.")
    return pk


# Every top-level key of a create the platform reads or knowingly ignores (`secure`,
# `beta_create`, `exposed_ports`, `egress_profile(s)`), both spellings included.
CREATE_KEYS = (
    "template", "template_id", "template_version_id", "snapshot_id", "timeout", "metadata",
    "envs", "env_vars", "secure", "mcp", "auto_pause", "volume_mounts", "lifecycle", "team", "name",
    "cpu_count", "memory_mb", "network_policy", "exposed_ports", "beta_create", "egress_profile",
    "egress_profiles", *sorted(NETWORK_KEYS))
# Keys other APIs (or a guess) use for one of ours: sent here, they would silently change
# nothing (`{"cpu": 2}` got one vCPU), so each is refused naming ours.
SHAPE_MEANT = {
    "cpu": "cpu_count", "cpus": "cpu_count", "vcpu": "cpu_count", "vcpus": "cpu_count",
    "ram": "memory_mb", "ram_mb": "memory_mb", "mem_mb": "memory_mb", "memory_mib": "memory_mb"}
CREATE_MEANT = {
    **SHAPE_MEANT, "timeout_seconds": "timeout", "timeout_ms": "timeout",
    "on_timeout": "lifecycle.on_timeout", "auto_resume": "lifecycle.auto_resume",
    "environment": "envs", "env": "envs"}


def parse_create(body: Any) -> CreateSpec:
    if not isinstance(body, dict):
        raise _invalid("bad_request", "The request body must be a JSON object.")
    suggest.refuse_near_misses(body, CREATE_KEYS, meant=CREATE_MEANT)
    body = _with_network_policy(body)
    _refuse_unsupported(body)
    cpu, memory = parse_shape(body)
    internet, policy = _network_policy(body)
    return CreateSpec(
        team=_optional_str(body, "team"),
        template=_optional_str(body, "template") or _optional_str(body, "template_id"),
        template_version_id=_optional_int(body, "template_version_id"),
        snapshot_id=_optional_str(body, "snapshot_id"),
        timeout=parse_timeout(body["timeout"]) if _present(body, "timeout") else DEFAULT_TIMEOUT,
        cpu_count=cpu, memory_mb=memory,
        lifecycle=parse_lifecycle(body),
        env_vars=parse_env_vars(body),
        metadata=parse_metadata(body.get("metadata")),
        name=_optional_str(body, "name"),
        allow_internet_access=internet,
        network_policy=policy,
    )


def parse_timeout_body(body: Any, *, required: bool) -> int | None:
    """`{"timeout": seconds}` for /timeout (required) and /resume (optional)."""
    if not isinstance(body, dict):
        body = {}
    if not _present(body, "timeout"):
        if required:
            raise _invalid("invalid_timeout", "timeout is required.")
        return None
    return parse_timeout(body["timeout"])


def _ttl(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _whole(value) or value < 1:
        raise _invalid("validation_failed", f"{key} must be a positive whole number of seconds.")
    return int(value)


def parse_file_url(body: Any) -> tuple[str, int | None, int | None]:
    """(path, use_signature_expiration, expires_in_seconds) of a signed-URL request."""
    if not isinstance(body, dict):
        raise _invalid("validation_failed", "The body must be a JSON object.")
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise _invalid("validation_failed", "path must be an absolute path.")
    if len(path) > MAX_PATH_LENGTH:
        raise _invalid("validation_failed", f"path must be at most {MAX_PATH_LENGTH} characters.")
    if any(part in (".", "..") for part in path.split("/")):
        # the data plane refuses dot segments; a URL signed for one would name another file
        raise _invalid("invalid_path", "path must not contain '.' or '..' segments; name the file itself.")
    return path, _ttl(body, "use_signature_expiration"), _ttl(body, "expires_in_seconds")

"""Request serializers of the sandbox API: every body and parameter is parsed and checked here,
with the error codes the one exception handler maps to the error shape."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sandboxes.models import OnTimeout
from sandboxes.specs import DEFAULT_TIMEOUT, CreateSpec, Lifecycle, cpu_problem, env_problem, memory_problem
from volumes.mounts import Mount, parse_mounts
from watasu import errors, suggest
from watasu.api.fields import (
    IdField,
    JsonObjectField,
    LenientField,
    OptionalTextField,
    SecondsField,
    StrictBooleanField,
    body_refusal,
    has_control_characters,
    refusal,
)

ALL_TRAFFIC = "0.0.0.0/0"
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LENGTH = 256
MAX_METADATA_VALUE_LENGTH = 4096
MAX_PATH_LENGTH = 4096  # Linux PATH_MAX
LIFECYCLE_KEYS = ("on_timeout", "auto_resume", "onTimeout", "autoResume")
NETWORK_KEYS = (
    "allow_internet_access",
    "allow_package_registry_access",
    "allow_public_traffic",
    "allow_out",
    "deny_out",
    "rules",
    "mask_request_host",
    "network_class",
)
# Keys other APIs (or a guess) use for one of ours: sent here, they would silently change
# nothing (`{"cpu": 2}` got one vCPU), so each is refused naming ours.
SHAPE_MEANT = {
    "cpu": "cpu_count",
    "cpus": "cpu_count",
    "vcpu": "cpu_count",
    "vcpus": "cpu_count",
    "ram": "memory_mb",
    "ram_mb": "memory_mb",
    "mem_mb": "memory_mb",
    "memory_mib": "memory_mb",
}
CREATE_MEANT = {
    **SHAPE_MEANT,
    "timeout_seconds": "timeout",
    "timeout_ms": "timeout",
    "on_timeout": "lifecycle.on_timeout",
    "auto_resume": "lifecycle.auto_resume",
    "environment": "envs",
    "env": "envs",
}
NO_RULES = "Per-host egress rules are not available yet; use allow_internet_access."


def metadata_value(value: Any) -> str:
    """Stringify as the spec recommends: JSON text for non-strings, '' for null."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


class MetadataField(JsonObjectField):
    """Up to 64 keys; values stored as strings (`metadata_value`)."""

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            raise refusal("metadata must be an object.")
        if len(data) > MAX_METADATA_KEYS:
            raise refusal(f"metadata may have at most {MAX_METADATA_KEYS} keys.")
        metadata = {}
        for key, item in data.items():
            if not key or len(key) > MAX_METADATA_KEY_LENGTH or has_control_characters(key):
                raise refusal(
                    f"metadata keys must be 1 to {MAX_METADATA_KEY_LENGTH} characters "
                    "without control characters."
                )
            text = metadata_value(item)
            if len(text) > MAX_METADATA_VALUE_LENGTH:
                raise refusal(f"metadata.{key[:64]} must be at most {MAX_METADATA_VALUE_LENGTH} characters.")
            metadata[key] = text
        return metadata


class EnvField(JsonObjectField):
    """Environment variables: exportable names, string values."""

    def to_internal_value(self, data: Any) -> dict[str, str]:
        problem = env_problem(data, self.field_name)
        if problem:
            raise refusal(problem)
        return dict(data)


@extend_schema_field(OpenApiTypes.INT)
class CpuCountField(LenientField):
    def to_internal_value(self, data: Any) -> int:
        problem = cpu_problem(data)
        if problem:
            raise refusal(problem, "invalid_resources")
        return int(data)


@extend_schema_field(OpenApiTypes.INT)
class MemoryMbField(LenientField):
    def to_internal_value(self, data: Any) -> int:
        problem = memory_problem(data)
        if problem:
            raise refusal(problem, "invalid_resources")
        return int(data)


class _LifecycleSchema(serializers.Serializer):
    on_timeout = serializers.ChoiceField(
        choices=OnTimeout.choices, required=False, help_text="At the deadline: kill (default) or pause"
    )
    auto_resume = serializers.BooleanField(
        required=False, help_text="Resume a paused sandbox on data-plane traffic (needs on_timeout 'pause')"
    )


def _spelled_once(raw: dict[str, Any], key: str, camel: str) -> Any:
    """`raw[key]` or its camelCase spelling; both, with different values, is a 422."""
    if key in raw and camel in raw and raw[key] != raw[camel]:
        raise refusal(
            f"lifecycle.{key} and lifecycle.{camel} name the same setting with different "
            "values; send one of them.",
            "invalid_lifecycle",
        )
    return raw.get(key, raw.get(camel))


@extend_schema_field(_LifecycleSchema)
class LifecycleField(LenientField):
    """`{on_timeout, auto_resume}` (or their camelCase spellings); `auto_pause` is weighed
    against it by the create serializer."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise refusal("lifecycle must be an object.", "invalid_lifecycle")
        # {"on_timout": "pause"} absorbed would destroy the sandbox at its deadline.
        suggest.refuse_unknown_keys(data, LIFECYCLE_KEYS, where="lifecycle", code="invalid_lifecycle")
        on_timeout = _spelled_once(data, "on_timeout", "onTimeout")
        if on_timeout is not None and on_timeout not in OnTimeout.values:
            raise refusal("lifecycle.on_timeout must be 'kill' or 'pause'.", "invalid_lifecycle")
        auto_resume = _spelled_once(data, "auto_resume", "autoResume")
        if auto_resume is not None and not isinstance(auto_resume, bool):
            raise refusal("lifecycle.auto_resume must be true or false.", "invalid_lifecycle")
        return {"on_timeout": on_timeout, "auto_resume": bool(auto_resume)}


def lifecycle_of(raw: dict[str, Any] | None, *, auto_pause: bool) -> Lifecycle:
    """The lifecycle a create asks for; `auto_pause` fills what `lifecycle` leaves out."""
    fallback = OnTimeout.PAUSE if auto_pause else OnTimeout.KILL
    if raw is None:
        return Lifecycle(on_timeout=fallback)
    on_timeout = raw["on_timeout"] or fallback
    if auto_pause and on_timeout != OnTimeout.PAUSE:
        # the SDK sends on_timeout 'kill' for a lifecycle without one: say which wins, never guess
        raise refusal(
            f"auto_pause is true but lifecycle.on_timeout is '{on_timeout}'; send "
            "lifecycle.on_timeout 'pause' (auto_pause may then be left out).",
            "invalid_lifecycle",
        )
    if raw["auto_resume"] and on_timeout != OnTimeout.PAUSE:
        raise refusal(
            "lifecycle.auto_resume can only be true when lifecycle.on_timeout is 'pause'.",
            "invalid_lifecycle",
        )
    return Lifecycle(on_timeout=on_timeout, auto_resume=raw["auto_resume"])


@extend_schema_field(OpenApiTypes.ANY)
class UnavailableField(LenientField):
    """An option this platform cannot honour yet: any value that asks for it fails loudly
    instead of being dropped."""

    def __init__(self, *, code: str, message: str, **kwargs: Any) -> None:
        self.code, self.message = code, message
        kwargs.setdefault("help_text", f"Not available yet: a value is a 422 `{code}`")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> None:
        if data:
            raise refusal(self.message, self.code)


@extend_schema_field(
    {
        "oneOf": [
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "name": {"type": "string"}},
                    "required": ["path", "name"],
                },
            },
            {"type": "object", "additionalProperties": {"type": "string"}},
        ]
    }
)
class VolumeMountsField(LenientField):
    """Every form of `volume_mounts` as validated mounts (`volumes.mounts`)."""

    def to_internal_value(self, data: Any) -> tuple[Mount, ...]:
        try:
            return parse_mounts(data)
        except errors.Invalid as exc:
            raise refusal(exc.message, exc.code) from exc


@extend_schema_field({"type": "array", "items": {"type": "string", "enum": [ALL_TRAFFIC]}})
class AllowOutField(LenientField):
    def to_internal_value(self, data: Any) -> list[str]:
        if not data:
            return []
        if not isinstance(data, list):
            raise refusal("allow_out must be a list.")
        if any(rule != ALL_TRAFFIC for rule in data):
            raise refusal(NO_RULES, "network_rules_unavailable")
        return []


@extend_schema_field(OpenApiTypes.STR)
class NetworkClassField(LenientField):
    def to_internal_value(self, data: Any) -> str:
        if data != settings.SANDBOX_DEFAULT_NETWORK_CLASS:
            raise refusal(f"network_class must be '{settings.SANDBOX_DEFAULT_NETWORK_CLASS}'.")
        return str(data)


@extend_schema_field(OpenApiTypes.ANY)
class IgnoredField(LenientField):
    """A key the SDK sends that changes nothing here (accepted, never an error)."""

    def to_internal_value(self, data: Any) -> None:
        return None


class _NetworkFields(serializers.Serializer):
    allow_internet_access = StrictBooleanField(help_text="Outbound internet (default true)")
    allow_package_registry_access = StrictBooleanField(
        help_text="Package registries (default: as allow_internet_access)"
    )
    allow_public_traffic = StrictBooleanField(help_text="Previews reachable without a token (default true)")
    allow_out = AllowOutField(help_text="Only ['0.0.0.0/0'] until per-host rules are enforced")
    deny_out = UnavailableField(code="network_rules_unavailable", message=NO_RULES)
    rules = UnavailableField(code="network_rules_unavailable", message=NO_RULES)
    mask_request_host = UnavailableField(code="network_rules_unavailable", message=NO_RULES)
    network_class = NetworkClassField(help_text="Only the platform's default class")


@extend_schema_field(_NetworkFields)
class NetworkPolicyField(LenientField):
    """Checked and merged into the top level before the fields run (`_with_network_policy`)."""

    def to_internal_value(self, data: Any) -> None:
        return None


def _with_network_policy(body: dict[str, Any]) -> dict[str, Any]:
    """`network_policy: {...}` (the shape sandboxes are shown in) means the same as its keys
    at the top level (the SDK's shape); never silently dropped, never contradicting them."""
    nested = body.get("network_policy")
    if nested is None:
        return body
    if not isinstance(nested, dict):
        raise body_refusal("network_policy must be an object.")
    suggest.refuse_unknown_keys(
        nested, sorted(NETWORK_KEYS), where="network_policy", code="validation_failed"
    )
    for key, value in nested.items():
        if key in body and body[key] != value:
            raise body_refusal(f"{key} is given twice with different values (top level and network_policy).")
    return {**body, **nested}


class SandboxCreateSerializer(_NetworkFields):
    """`POST /v1/sandboxes`. Its fields are every key a create reads or knowingly ignores."""

    template = OptionalTextField(
        max_length=200,
        help_text="Template slug, `slug:tag`, `slug:version` or `slug:<version id>` (default: base)",
    )
    template_id = OptionalTextField(max_length=200, help_text="The docs' spelling of `template`")
    template_version_id = IdField(help_text="A version id of the template")
    snapshot_id = OptionalTextField(max_length=255, help_text="Not supported yet (ignored)")
    timeout = SecondsField(
        code="invalid_timeout",
        maximum="SANDBOX_MAX_TIMEOUT_SECONDS",
        help_text=f"Seconds until the deadline (default {DEFAULT_TIMEOUT})",
    )
    cpu_count = CpuCountField(help_text="vCPUs, one of GET /v1/sandbox_limits' allowed_cpu")
    memory_mb = MemoryMbField(help_text="Memory in MiB, within GET /v1/sandbox_limits' memory_mb")
    lifecycle = LifecycleField(help_text="What happens at the deadline")
    auto_pause = StrictBooleanField(help_text="Shorthand for lifecycle.on_timeout 'pause'")
    envs = EnvField(help_text="Environment variables (the SDK's spelling)")
    env_vars = EnvField(help_text="Environment variables (the docs' spelling; wins over envs)")
    metadata = MetadataField(help_text="Up to 64 keys; non-string values are stored as JSON text")
    name = OptionalTextField(max_length=200, help_text="A label of your own")
    team = OptionalTextField(max_length=63, help_text="Team slug (default: your personal team)")
    network_policy = NetworkPolicyField(help_text="The network keys, nested as sandboxes show them")
    volume_mounts = VolumeMountsField(
        help_text="Team volumes to mount: [{path, name}], {path: name} or {path: {name}}; "
        "an unknown name creates the volume"
    )
    mcp = UnavailableField(
        code="mcp_unavailable", message="The MCP gateway is not available on this platform yet."
    )
    egress_profile = UnavailableField(
        code="network_rules_unavailable",
        message=("Egress profiles are not available yet; use allow_internet_access."),
    )
    egress_profiles = UnavailableField(
        code="network_rules_unavailable",
        message=("Egress profiles are not available yet; use allow_internet_access."),
    )
    secure = IgnoredField(help_text="Accepted; every sandbox's data plane needs its token")
    beta_create = IgnoredField(help_text="Accepted and ignored")
    exposed_ports = IgnoredField(help_text="Accepted; any port can be previewed")

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise body_refusal("The request body must be a JSON object.")
        suggest.refuse_near_misses(data, self.fields, meant=CREATE_MEANT)
        return super().to_internal_value(_with_network_policy(data))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs["lifecycle"] = lifecycle_of(attrs.get("lifecycle"), auto_pause=bool(attrs.get("auto_pause")))
        return attrs

    def spec(self) -> CreateSpec:
        data = self.validated_data
        internet = data.get("allow_internet_access")
        internet = True if internet is None else internet
        registries = data.get("allow_package_registry_access")
        public = data.get("allow_public_traffic")
        return CreateSpec(
            team=data.get("team"),
            template=data.get("template") or data.get("template_id"),
            template_version_id=data.get("template_version_id"),
            snapshot_id=data.get("snapshot_id"),
            timeout=data.get("timeout") or DEFAULT_TIMEOUT,
            cpu_count=data.get("cpu_count"),
            memory_mb=data.get("memory_mb"),
            lifecycle=data["lifecycle"],
            env_vars={**(data.get("envs") or {}), **(data.get("env_vars") or {})},
            metadata=data.get("metadata") or {},
            name=data.get("name"),
            volume_mounts=data.get("volume_mounts") or (),
            allow_internet_access=internet,
            network_policy={
                "allow_internet_access": internet,
                "allow_package_registry_access": internet if registries is None else registries,
                "allow_public_traffic": True if public is None else public,
                "allow_out": [],
                "deny_out": [],
            },
            given=frozenset(self.initial_data) if isinstance(self.initial_data, dict) else frozenset(),
        )


def create_keys() -> tuple[str, ...]:
    """Every top-level key a create reads or knowingly ignores: the serializer's fields."""
    return tuple(SandboxCreateSerializer().fields)


class TimeoutRequestSerializer(serializers.Serializer):
    """`{"timeout": seconds}` of /timeout (required) and /resume, /connect (optional)."""

    timeout = SecondsField(
        code="invalid_timeout",
        maximum="SANDBOX_MAX_TIMEOUT_SECONDS",
        help_text="Seconds from now until the deadline",
    )

    def to_internal_value(self, data: Any) -> Any:
        return super().to_internal_value(data if isinstance(data, dict) else {})

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.context.get("required") and attrs.get("timeout") is None:
            raise refusal("timeout is required.", "invalid_timeout")
        return attrs


@extend_schema_field(OpenApiTypes.STR)
class FilePathField(LenientField):
    """An absolute path naming the file itself (no `.`/`..` segments, no NUL)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=True, allow_null=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str) or not data.startswith("/") or "\x00" in data:
            raise refusal("path must be an absolute path.")
        if len(data) > MAX_PATH_LENGTH:
            raise refusal(f"path must be at most {MAX_PATH_LENGTH} characters.")
        if any(part in (".", "..") for part in data.split("/")):
            # the data plane refuses dot segments; a URL signed for one would name another file
            raise refusal("path must not contain '.' or '..' segments; name the file itself.", "invalid_path")
        return data


class FileUrlRequestSerializer(serializers.Serializer):
    """A signed file URL request; TTL: the smaller of the two, 300 s by default, at most 24 h."""

    path = FilePathField(help_text="Absolute path of the file in the sandbox")
    user = IgnoredField(help_text="Accepted; files are read and written as root")
    use_signature_expiration = SecondsField(help_text="TTL in seconds (the SDK's name)")
    expires_in_seconds = SecondsField(help_text="TTL in seconds")

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise body_refusal("The body must be a JSON object.")
        return super().to_internal_value(data)

"""Request serializers of the sandbox API: every body and parameter is parsed and checked here,
with the error codes the one exception handler maps to the error shape."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sandboxes.mcp import mcp_problem
from sandboxes.models import OnTimeout
from sandboxes.runtime.egress import policy
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

MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LENGTH = 256
MAX_METADATA_VALUE_LENGTH = 4096
MAX_PATH_LENGTH = 4096  # Linux PATH_MAX
LIFECYCLE_KEYS = ("on_timeout", "auto_resume", "onTimeout", "autoResume")
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


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {
            "type": "object",
            "properties": {
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "command": {"type": "string"},
                "args": {"type": "array", "items": {"type": "string"}},
            },
        },
    }
)
class McpField(LenientField):
    """`mcp` on create: server name -> {env?, command?, args?} (`sandboxes.mcp`)."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        problem = mcp_problem(data)
        if problem:
            raise refusal(problem, "invalid_mcp")
        return dict(data)


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


@extend_schema_field(OpenApiTypes.ANY)
class RawField(LenientField):
    """A value checked with the rest of its object (``network_policy_of``)."""

    def to_internal_value(self, data: Any) -> Any:
        return data


@extend_schema_field(OpenApiTypes.ANY)
class IgnoredField(LenientField):
    """A key the SDK sends that changes nothing here (accepted, never an error)."""

    def to_internal_value(self, data: Any) -> None:
        return None


@extend_schema_field({"type": "array", "items": {"type": "string"}})
class StringsField(RawField):
    pass


@extend_schema_field({"type": "object"})
class RulesField(RawField):
    pass


class _NetworkFields(serializers.Serializer):
    allow_internet_access = StrictBooleanField(
        help_text="Outbound internet by default (default true); false: only what allow_out names"
    )
    allow_package_registry_access = StrictBooleanField(
        help_text="The package registries' hosts (profile `package-registries`; "
        "default: as allow_internet_access)"
    )
    allow_public_traffic = StrictBooleanField(help_text="Previews reachable without a token (default true)")
    allow_out = StringsField(
        help_text="Allowed: host names (`*.` wildcards, `:80`/`:443`), IPv4 addresses or CIDRs "
        "(optionally `:port`); '0.0.0.0/0' is all traffic"
    )
    deny_out = StringsField(help_text="Refused (wins over allow_out); same forms")
    egress_profile = RawField(help_text="A named egress profile (GET /v1/sandbox_limits lists them)")
    egress_profiles = StringsField(help_text="Named egress profiles")
    rules = RulesField(
        help_text='{host: [{"transform": {"headers": {name: value}}}]}: headers added to the '
        "sandbox's requests to that host (values are secrets, never shown)"
    )
    mask_request_host = RawField(
        help_text="Host header previews forward with, e.g. '${PORT}-app.example.com'"
    )
    network_class = RawField(help_text="A network class (GET /v1/sandbox_limits lists them)")


POLICY_KEYS = tuple(_NetworkFields().fields)
CAMEL_KEYS = {
    "allowInternetAccess": "allow_internet_access",
    "allowPackageRegistryAccess": "allow_package_registry_access",
    "allowPublicTraffic": "allow_public_traffic",
    "allowOut": "allow_out",
    "denyOut": "deny_out",
    "egressProfile": "egress_profile",
    "egressProfiles": "egress_profiles",
    "maskRequestHost": "mask_request_host",
    "networkClass": "network_class",
}


def with_snake_keys(body: dict[str, Any]) -> dict[str, Any]:
    """camelCase network keys as their snake_case names (both, different: a 422)."""
    out = dict(body)
    for camel, snake in CAMEL_KEYS.items():
        if camel in out:
            value = out.pop(camel)
            if snake in out and out[snake] != value:
                raise body_refusal(f"{snake} and {camel} name the same setting with different values.")
            out[snake] = value
    return out


def network_policy_of(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The whole policy (unset keys at their defaults) as shown, and its header rules."""
    try:
        allow_out, _, _ = policy.parse_entries(data.get("allow_out"), "allow_out")
        deny_out, _, _ = policy.parse_entries(data.get("deny_out"), "deny_out")
        headers = policy.parse_rules(data.get("rules"))
    except policy.PolicyError as exc:
        raise refusal(str(exc), "invalid_network_policy") from exc
    profiles = _profiles(data.get("egress_profile"), data.get("egress_profiles"))
    network_class = data.get("network_class") or settings.SANDBOX_DEFAULT_NETWORK_CLASS
    if not isinstance(network_class, str) or network_class not in settings.NETWORK_CLASSES:
        known = ", ".join(sorted(settings.NETWORK_CLASSES))
        raise refusal(
            f"network_class {str(network_class)[:64]!r} is not one of: {known}.", "invalid_network_policy"
        )
    internet = data.get("allow_internet_access")
    internet = True if internet is None else internet
    registries = data.get("allow_package_registry_access")
    public = data.get("allow_public_traffic")
    shown = policy.Policy(
        allow_internet_access=internet,
        allow_package_registry_access=internet if registries is None else registries,
        allow_public_traffic=True if public is None else public,
        allow_out=tuple(allow_out),
        deny_out=tuple(deny_out),
        egress_profiles=tuple(profiles),
        network_class=network_class,
        mask_request_host=_mask(data.get("mask_request_host")),
    ).shown(headers)
    return shown, headers


def _profiles(one: Any, many: Any) -> list[str]:
    names: list[Any] = []
    if isinstance(one, list):
        raise refusal(
            "egress_profile is one profile name; send a list as egress_profiles.", "invalid_network_policy"
        )
    if one is not None:
        names.append(one)
    if many is not None:
        if not isinstance(many, list):
            raise refusal("egress_profiles must be a list of profile names.", "invalid_network_policy")
        names.extend(many)
    known = settings.EGRESS_PROFILES
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise refusal(
                f"egress profile {str(name)[:64]!r} is not one of: {', '.join(sorted(known))}.",
                "invalid_network_policy",
            )
    return sorted(set(names))


def _mask(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > 253:
        raise refusal(
            "mask_request_host must be a host name template of at most 253 characters.",
            "invalid_network_policy",
        )
    host, _, port = value.replace("${PORT}", "80").partition(":")
    if policy.parse_hostname(host) is None or (port and not port.isdigit()) or "*" in host:
        raise refusal(
            f"mask_request_host {value[:100]!r} must be a host name, optionally with ${{PORT}} in it "
            "(e.g. '${PORT}-app.example.com').",
            "invalid_network_policy",
        )
    return value


class NetworkUpdateSerializer(_NetworkFields):
    """`PUT /v1/sandboxes/{id}/network`: a whole policy; unknown keys are ignored (the SDK
    leaks option names into this body)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise body_refusal("The request body must be a JSON object (a network policy).")
        # the shape sandboxes show (`{"network_policy": {...}}`) means its keys; a near miss
        # of a key is refused (replacing the whole policy, a typo would reset it); other
        # keys are ignored
        body = _with_network_policy(data)
        suggest.refuse_near_misses(body, [*POLICY_KEYS, *CAMEL_KEYS, "network_policy"])
        return super().to_internal_value({key: body[key] for key in POLICY_KEYS if key in body})

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        shown, headers = network_policy_of(attrs)
        return {"policy": shown, "headers": headers}


@extend_schema_field(_NetworkFields)
class NetworkPolicyField(LenientField):
    """Checked and merged into the top level before the fields run (`_with_network_policy`)."""

    def to_internal_value(self, data: Any) -> None:
        return None


def _with_network_policy(body: dict[str, Any]) -> dict[str, Any]:
    """`network_policy: {...}` (the shape sandboxes are shown in) means the same as its keys
    at the top level (the SDK's shape); never silently dropped, never contradicting them."""
    body = with_snake_keys(body)
    nested = body.get("network_policy")
    if nested is None:
        return body
    if not isinstance(nested, dict):
        raise body_refusal("network_policy must be an object.")
    nested = with_snake_keys(nested)
    suggest.refuse_unknown_keys(nested, sorted(POLICY_KEYS), where="network_policy", code="validation_failed")
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
    snapshot_id = OptionalTextField(
        max_length=255, help_text="A checkpoint's id or name: the new sandbox runs on a copy of its disk"
    )
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
    mcp = McpField(
        help_text="MCP servers to run behind the in-sandbox gateway (port 50005, /mcp): "
        "{name: {env?, command?, args?}}; without template, the `mcp-gateway` template"
    )
    secure = IgnoredField(help_text="Accepted; every sandbox's data plane needs its token")
    beta_create = IgnoredField(help_text="Accepted and ignored")
    exposed_ports = IgnoredField(help_text="Accepted; any port can be previewed")

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise body_refusal("The request body must be a JSON object.")
        suggest.refuse_near_misses(data, [*self.fields, *CAMEL_KEYS], meant=CREATE_MEANT)
        return super().to_internal_value(_with_network_policy(data))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs["lifecycle"] = lifecycle_of(attrs.get("lifecycle"), auto_pause=bool(attrs.get("auto_pause")))
        attrs["network"] = network_policy_of(attrs)
        return attrs

    def spec(self) -> CreateSpec:
        data = self.validated_data
        shown, headers = data["network"]
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
            allow_internet_access=shown["allow_internet_access"],
            network_policy=shown,
            network_rules=headers,
            mcp=data.get("mcp"),
            given=frozenset(with_snake_keys(self.initial_data))
            if isinstance(self.initial_data, dict)
            else frozenset(),
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

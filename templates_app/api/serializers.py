"""Serializers of the template API: requests (parsed and checked here) and response shapes.

A build spec's own keys are checked by the build (`templates_app.builds`), which both build
APIs share; here it is only documented (`BuildSpecSerializer`) and passed on as sent.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sandboxes.api.requests import SHAPE_MEANT, MetadataField
from sandboxes.specs import cpu_problem, memory_problem
from templates_app.models import VersionStatus, Visibility
from watasu import ids, suggest
from watasu.api.fields import FullMatchField, LenientField, NameField, StrictBooleanField, refusal

TAG = r"[a-z0-9][a-z0-9._-]{0,62}"
SLUG = r"[a-z0-9][a-z0-9-]{0,62}"
VERSION = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
BUILD_NAME = rf"{SLUG}(:{TAG})?"
MAX_LOG_INDEX = 2**31 - 1  # BuildLogEntry.index is a PositiveIntegerField
MAX_LOG_PAGE = 5000
BUILD_STATUSES = ("waiting", "building", "ready", "error")  # the SDK's words for VersionStatus


# --- requests -----------------------------------------------------------------------------


class _SandboxTemplateFields(serializers.Serializer):
    team = serializers.CharField(
        max_length=63,
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="Team slug (default: your personal team)",
    )
    slug = FullMatchField(SLUG, max_length=63, message="must be lowercase letters, digits and dashes.")
    name = NameField(max_length=200, required=False, allow_null=True, allow_blank=True)
    description = serializers.CharField(
        max_length=10000, required=False, allow_null=True, allow_blank=True, trim_whitespace=False
    )
    metadata = MetadataField()


class SandboxTemplateCreateSerializer(serializers.Serializer):
    """`POST /v1/sandbox_templates`: `{"sandbox_template": {...}}`."""

    sandbox_template = _SandboxTemplateFields()


class _Files(serializers.Serializer):
    path = serializers.CharField(help_text="Absolute path in the image")
    content_b64 = serializers.CharField(help_text="The file's bytes, base64")
    mode = serializers.IntegerField(required=False)


class BuildSpecSerializer(serializers.Serializer):
    """What a build runs (checked by the build; `docs/templates.md`)."""

    from_template = serializers.CharField(required=False, help_text="Start from this template")
    from_image = serializers.CharField(required=False, help_text="debian:12, python:3.11, node:18...")
    files = _Files(many=True, required=False, help_text="Files copied into the image")
    packages = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="apt / pip / npm packages",
    )
    setup = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="Shell commands, in order"
    )
    start_cmd = serializers.CharField(required=False, help_text="Started before the snapshot")
    ready_cmd = serializers.CharField(required=False, help_text="Must succeed before the snapshot")
    env = serializers.DictField(child=serializers.CharField(), required=False)


@extend_schema_field(BuildSpecSerializer)
class BuildSpecField(LenientField):
    """The build spec as sent (absent or null: an empty one); its shape is checked by the
    build, so `[]` is refused there rather than read as `{}`."""

    def to_internal_value(self, data: Any) -> Any:
        return data

    def validate_empty_values(self, data: Any) -> tuple[bool, Any]:
        if data is None or data is serializers.empty:
            return True, {}
        return super().validate_empty_values(data)


@extend_schema_field(OpenApiTypes.INT)
class _PositiveIntField(LenientField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int) or data < 1:
            raise refusal(f"{self.field_name} must be a positive integer.")
        return data


class CpuField(_PositiveIntField):
    """vCPUs of the versions built (default: the fallback shape)."""

    def to_internal_value(self, data: Any) -> int:
        cpu = super().to_internal_value(data)
        if problem := cpu_problem(cpu):
            raise refusal(problem, "invalid_resources")
        return cpu


class MemoryField(_PositiveIntField):
    """Memory (MiB) of the versions built (default: the fallback shape)."""

    def to_internal_value(self, data: Any) -> int:
        memory = super().to_internal_value(data)
        if problem := memory_problem(memory):
            raise refusal(problem, "invalid_resources")
        return memory


@extend_schema_field({"type": "array", "items": {"type": "string", "pattern": f"^{TAG}$"}})
class TagsField(LenientField):
    """Lowercase tag names, each matched as a whole (`"edge\n"` is no tag)."""

    def __init__(self, *, allow_empty: bool = False, **kwargs: Any) -> None:
        self.allow_empty = allow_empty
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[str]:
        if (
            not isinstance(data, list)
            or not (data or self.allow_empty)
            or not all(isinstance(tag, str) and re.fullmatch(TAG, tag) for tag in data)
        ):
            raise refusal("tags must be a non-empty list of lowercase tag names.")
        return data


class _Runtime(serializers.Serializer):
    cpu = CpuField(help_text="vCPUs")
    memory_mb = MemoryField(help_text="Memory in MiB")

    def to_internal_value(self, data: Any) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise refusal("runtime_baseline must be an object.")
        suggest.refuse_unknown_keys(data, self.fields, where="sandbox_template_version.runtime_baseline")
        return super().to_internal_value(data)


class _VersionFields(serializers.Serializer):
    version = FullMatchField(
        VERSION,
        message="must be letters, digits, dots, dashes and underscores.",
        help_text="A name of your own for the version",
    )
    source_kind = serializers.ChoiceField(
        choices=["package_spec"],
        required=False,
        error_messages={"invalid_choice": "Only source_kind 'package_spec' is supported."},
    )
    architecture = serializers.ChoiceField(
        choices=["x86_64", "amd64"],
        required=False,
        error_messages={"invalid_choice": "Only the x86_64 architecture is supported."},
    )
    runtime_baseline = _Runtime(required=False, allow_null=True)
    build_spec = BuildSpecField()
    skip_cache = StrictBooleanField(help_text="Run every step again")
    default_user = serializers.CharField(required=False, help_text="Accepted; builds run as root")
    workdir = serializers.CharField(required=False, help_text="Accepted; use WORKDIR in the spec")
    metadata = serializers.JSONField(required=False, help_text="Accepted and ignored")

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            suggest.refuse_near_misses(data, self.fields, where="sandbox_template_version")
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        baseline = attrs.get("runtime_baseline") or {}
        attrs["cpu"] = baseline.get("cpu") or settings.SANDBOX_FALLBACK_CPU
        attrs["memory_mb"] = baseline.get("memory_mb") or settings.SANDBOX_FALLBACK_MEMORY_MB
        return attrs


class VersionCreateSerializer(serializers.Serializer):
    """`POST /v1/sandbox_templates/{id}/versions`: `{"sandbox_template_version": {...}}`."""

    sandbox_template_version = _VersionFields()


class TemplateBuildRequestSerializer(serializers.Serializer):
    """`POST /v1/templates` (the SDK's `Template.build`). A near-miss of a key is a 422;
    other keys are left to the clients that send them."""

    name = FullMatchField(
        BUILD_NAME,
        max_length=127,
        message="must be 'alias' or 'alias:tag' in lowercase.",
        help_text="alias or alias:tag",
    )
    cpu_count = CpuField(help_text="vCPUs (default: the fallback shape)")
    memory_mb = MemoryField(help_text="Memory in MiB (default: the fallback shape)")
    skip_cache = StrictBooleanField(help_text="Run every step again")
    build_spec = BuildSpecField()
    tags = TagsField(allow_empty=True, help_text="Tags for the version once built")
    team = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        max_length=63,
        help_text="Team slug (default: your personal team)",
    )

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            suggest.refuse_near_misses(data, self.fields, meant=SHAPE_MEANT)
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs["cpu_count"] = attrs.get("cpu_count") or settings.SANDBOX_FALLBACK_CPU
        attrs["memory_mb"] = attrs.get("memory_mb") or settings.SANDBOX_FALLBACK_MEMORY_MB
        return attrs


class TagAssignSerializer(serializers.Serializer):
    """`POST /v1/templates/tags`."""

    target = serializers.CharField(max_length=255, help_text="alias:tag, alias:version or alias:<build id>")
    tags = TagsField(required=True, allow_null=False, help_text="Tags to point at the target version")


class TagRemoveSerializer(serializers.Serializer):
    """`DELETE /v1/templates/tags` (JSON body)."""

    name = serializers.CharField(max_length=127, help_text="The template's alias")
    tags = TagsField(required=True, allow_null=False, help_text="Tags to remove")


@extend_schema_field(OpenApiTypes.INT)
class _QueryCount(serializers.Field):
    """A non-negative ASCII integer from the query string, up to `maximum`."""

    def __init__(self, *, maximum: int = ids.MAX_DB_ID, **kwargs: Any) -> None:
        self.maximum = maximum
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int:
        value = ids.count(data, maximum=self.maximum) if isinstance(data, str) else None
        if value is None:
            raise refusal(f"{self.field_name} must be an integer between 0 and {self.maximum}.")
        return value

    def to_representation(self, value: Any) -> Any:
        return value


class BuildLogsQuerySerializer(serializers.Serializer):
    offset = _QueryCount(
        maximum=MAX_LOG_INDEX, required=False, default=0, help_text="First log line to return"
    )
    limit = _QueryCount(required=False, default=1000, help_text=f"Lines per page (at most {MAX_LOG_PAGE})")


class BuildStatusQuerySerializer(serializers.Serializer):
    logs_offset = _QueryCount(
        maximum=MAX_LOG_INDEX, required=False, default=0, help_text="First log line to return"
    )


# --- responses ----------------------------------------------------------------------------


class TemplateSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    slug = serializers.CharField()
    name = serializers.CharField()
    team = serializers.CharField(allow_null=True, help_text="Null for provider templates")
    visibility = serializers.ChoiceField(choices=Visibility.choices)
    status = serializers.CharField()
    description = serializers.CharField()
    metadata = serializers.DictField(child=serializers.CharField())
    created_at = serializers.DateTimeField()


class _Baseline(serializers.Serializer):
    cpu = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class TemplateVersionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    template_id = serializers.IntegerField()
    template_slug = serializers.CharField()
    version = serializers.CharField()
    status = serializers.ChoiceField(choices=VersionStatus.choices)
    architecture = serializers.CharField()
    source_kind = serializers.CharField()
    runtime_baseline = _Baseline()
    build_spec = BuildSpecSerializer(help_text="As sent, without env values (they stay secret)")
    size_bytes = serializers.IntegerField(allow_null=True)
    tags = serializers.ListField(child=serializers.CharField())
    build_failure = serializers.CharField(allow_null=True)
    last_error_message = serializers.CharField(allow_null=True)
    built_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()


class _LogEntry(serializers.Serializer):
    index = serializers.IntegerField()
    timestamp = serializers.DateTimeField()
    level = serializers.CharField()
    message = serializers.CharField()


class BuildLogsSerializer(serializers.Serializer):
    template_version_id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=VersionStatus.choices)
    next_offset = serializers.IntegerField(help_text="The offset of the next page")
    entries = _LogEntry(many=True)


class TemplateBuildSerializer(serializers.Serializer):
    template_id = serializers.CharField()
    build_id = serializers.CharField()
    name = serializers.CharField()
    alias = serializers.CharField()
    tags = serializers.ListField(child=serializers.CharField())


class _StatusLogEntry(serializers.Serializer):
    timestamp = serializers.DateTimeField()
    level = serializers.CharField()
    message = serializers.CharField()


class _FailureReason(serializers.Serializer):
    message = serializers.CharField()
    log_entries = _StatusLogEntry(many=True)


class BuildStatusSerializer(serializers.Serializer):
    template_id = serializers.CharField()
    build_id = serializers.CharField()
    status = serializers.ChoiceField(choices=BUILD_STATUSES)
    log_entries = _StatusLogEntry(many=True)
    logs = serializers.ListField(child=serializers.CharField())
    reason = _FailureReason(allow_null=True)


class TagSerializer(serializers.Serializer):
    tag = serializers.CharField()
    build_id = serializers.CharField()
    created_at = serializers.DateTimeField()


class TagsAssignedSerializer(serializers.Serializer):
    build_id = serializers.CharField()
    tags = serializers.ListField(child=serializers.CharField())

"""Request and response shapes of the volume endpoints."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sandboxes.api.requests import MetadataField
from volumes.models import Volume
from watasu import errors, ids
from watasu.api.fields import ClosedSerializer, LenientField, OptionalTextField, StrictBooleanField, refusal

MAX_ID = 2**32 - 2  # uid/gid: 32 bits, (uid_t)-1 means "unchanged" to the kernel
MAX_DEPTH = 16
MAX_PATH_DEPTH = 128


class VolumeSerializer(serializers.ModelSerializer[Volume]):
    team = serializers.CharField(source="team.slug")
    node = serializers.CharField(source="host.name")
    size_mb = serializers.IntegerField()
    attached_sandbox_id = serializers.SerializerMethodField()
    mount_path = serializers.CharField(help_text="Where the holder mounts it ('' when detached)")

    class Meta:
        model = Volume
        fields = [
            "id",
            "name",
            "team",
            "state",
            "size_mb",
            "size_bytes",
            "node",
            "attached_sandbox_id",
            "mount_path",
            "metadata",
            "used_bytes",
            "allocated_bytes",
            "usage_measured_at",
            "created_at",
            "updated_at",
        ]

    def get_attached_sandbox_id(self, volume: Volume) -> str | None:
        return None if volume.holder_id is None else str(volume.holder_id)


class VolumeCreateSerializer(ClosedSerializer):
    """`POST /v1/volumes`: a name unique in the team; the size is the platform's."""

    name = serializers.CharField(max_length=63, trim_whitespace=False)
    team = OptionalTextField(max_length=63, help_text="Team slug (default: your personal team)")
    metadata = MetadataField(help_text="Up to 64 keys of your own")


@extend_schema_field(OpenApiTypes.INT)
class OwnerIdField(LenientField):
    """A uid or gid: a whole number from 0 to 2^32-2."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int) or not 0 <= data <= MAX_ID:
            raise refusal(f"{self.field_name} must be a whole number from 0 to {MAX_ID}.", "invalid_argument")
        return data


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string", "example": "0644"}]})
class ModeField(LenientField):
    """Permission bits: an integer (420) or an octal string ("0644", "644", "0o644")."""

    def to_internal_value(self, data: Any) -> int:
        from volumes import engine

        try:
            return engine.parse_mode(data)
        except engine.EngineError as exc:
            raise refusal(exc.message, "invalid_mode") from exc


class PathField(serializers.CharField):
    """A path inside a volume (checked in full by the engine), at most MAX_PATH_DEPTH deep:
    each level of a path costs the engine work, so a request cannot ask for thousands."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 4096)
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("help_text", "Absolute path inside the volume, rooted at its root")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        path = super().to_internal_value(data)
        if path.count("/") > MAX_PATH_DEPTH:
            raise refusal(f"path is deeper than {MAX_PATH_DEPTH} levels.", "invalid_path")
        return path


@extend_schema_field(OpenApiTypes.INT)
class DepthField(LenientField):
    def to_internal_value(self, data: Any) -> int:
        depth = ids.count(data, maximum=MAX_DEPTH) if isinstance(data, str) else None
        if isinstance(data, int) and not isinstance(data, bool):
            depth = data if 0 <= data <= MAX_DEPTH else None
        if not depth:
            raise refusal(f"depth must be a whole number from 1 to {MAX_DEPTH}.", "invalid_argument")
        return depth


class PathQuerySerializer(serializers.Serializer):
    path = PathField()


class ListQuerySerializer(serializers.Serializer):
    path = PathField(required=False, default="/")
    depth = DepthField(default=1)


class MetadataChangeSerializer(ClosedSerializer):
    """`PATCH /path`: owner and mode of one entry."""

    path = PathField()
    uid = OwnerIdField()
    gid = OwnerIdField()
    mode = ModeField()


class MakeDirSerializer(MetadataChangeSerializer):
    """`POST /directories`: `force` creates missing parents and accepts an existing one."""

    force = StrictBooleanField()


class WriteFileSerializer(MakeDirSerializer):
    """`PUT /files`: `force` also creates missing parent directories."""

    content_b64 = serializers.CharField(allow_blank=True, trim_whitespace=False, required=False, default="")
    content = serializers.CharField(
        allow_blank=True, trim_whitespace=False, required=False, help_text="UTF-8 text instead of content_b64"
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        limit = settings.VOLUME_MAX_FILE_BYTES
        if "content" in attrs and attrs.get("content_b64"):
            raise refusal("Give content_b64 or content, not both.")
        if "content" in attrs:
            data = attrs.pop("content").encode()
        else:
            encoded = attrs.get("content_b64", "")
            if len(encoded) // 4 * 3 > limit + 3:
                raise errors.TooLarge(f"The file is over the {limit}-byte limit of a detached write.")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise refusal("content_b64 is not valid base64.") from exc
        if len(data) > limit:
            raise errors.TooLarge(f"The file is over the {limit}-byte limit of a detached write.")
        attrs.pop("content_b64", None)
        attrs["data"] = data
        return attrs

"""Checkpoint endpoints (spec 3.12-3.15): capture, list, delete, restore.

The SDK says "snapshot", the docs "checkpoint"; both route families answer, with the
list key each side reads (`snapshots` / `sandbox_checkpoints`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes import checkpoints, selectors, services
from sandboxes.api.requests import MetadataField
from sandboxes.api.serializers import SandboxSerializer, SessionSerializer, iso
from sandboxes.api.views import _SandboxView, _with_session
from sandboxes.models import Checkpoint, QuiesceMode
from sandboxes.specs import CreateSpec
from teams.models import User
from teams.selectors import teams_for_list
from teams.services import audit_record
from watasu import errors
from watasu.api.fields import (
    ClosedSerializer,
    IdField,
    LenientField,
    NameField,
    SecondsField,
    StrictBooleanField,
    body_refusal,
    refusal,
)
from watasu.api.pagination import NextTokenPagination
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView

ENVELOPE_KEY = "sandbox_checkpoint"
MAX_RETENTION = timedelta(days=3650)  # an expiry further away is a mistake (or year 10000)


class CheckpointSerializer(serializers.Serializer):
    """The spec's Checkpoint object (2.6)."""

    id = serializers.IntegerField()
    sandbox_id = serializers.IntegerField()
    team = serializers.CharField()
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=["pending", "ready", "failed"])
    local_state = serializers.ChoiceField(choices=["capturing", "present", "missing", "none"])
    quiesce_mode = serializers.ChoiceField(choices=QuiesceMode.values)
    include_memory = serializers.BooleanField()
    size_bytes = serializers.IntegerField()
    metadata = serializers.DictField(child=serializers.CharField())
    template_version_id = serializers.IntegerField()
    cpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()
    node = serializers.CharField(help_text="The host holding the artifact")
    error = serializers.CharField(help_text="Why a failed checkpoint failed ('' otherwise)")
    expires_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    ready_at = serializers.DateTimeField(allow_null=True)


def checkpoint_representation(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.pk,
        "sandbox_id": checkpoint.sandbox_id,
        "team": checkpoint.team.slug,
        "name": checkpoint.name,
        "status": checkpoint.status,
        "local_state": checkpoint.local_state,
        "quiesce_mode": checkpoint.quiesce_mode,
        "include_memory": checkpoint.include_memory,
        "size_bytes": checkpoint.size_bytes,
        "metadata": checkpoint.metadata,
        "template_version_id": checkpoint.template_version_id,
        "cpu_count": checkpoint.cpu_count,
        "memory_mb": checkpoint.memory_mb,
        "node": checkpoint.host.name,
        "error": checkpoint.error,
        "expires_at": iso(checkpoint.expires_at) if checkpoint.expires_at else None,
        "created_at": iso(checkpoint.created_at),
        "ready_at": iso(checkpoint.ready_at) if checkpoint.ready_at else None,
    }


@extend_schema_field(OpenApiTypes.DATETIME)
class FutureTimeField(LenientField):
    """An ISO 8601 time with a zone, later than now."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            raise refusal(f"{self.field_name} must be an ISO 8601 time such as 2026-06-02T12:00:00Z.")
        try:
            parsed = parse_datetime(data)
        except ValueError:
            parsed = None
        if parsed is None:
            raise refusal(f"{self.field_name} must be an ISO 8601 time such as 2026-06-02T12:00:00Z.")
        if timezone.is_naive(parsed):
            raise refusal(f"{self.field_name} must be an ISO 8601 time with a zone (Z or +01:00).")
        now = timezone.now()
        if parsed <= now:
            raise refusal(f"{self.field_name} must be in the future.")
        if parsed > now + MAX_RETENTION:
            raise refusal(f"{self.field_name} must be within {MAX_RETENTION.days // 365} years.")
        return parsed


class CheckpointCreateSerializer(ClosedSerializer):
    """`POST .../snapshots` and `.../checkpoints`, flat or as `{"sandbox_checkpoint": {...}}`."""

    name = NameField(max_length=200, required=False, allow_blank=True)
    metadata = MetadataField(help_text="Up to 64 keys of your own")
    expires_at = FutureTimeField(help_text="When the retention sweep deletes it (default: never)")
    quiesce_mode = serializers.ChoiceField(
        choices=QuiesceMode.values,
        required=False,
        help_text="guest (default): the guest's filesystem is flushed and frozen around the "
        "capture; crash: no quiescing",
    )
    include_memory = StrictBooleanField(
        help_text="Our extension: keep the guest's memory too, so restores resume its processes "
        "(the sandbox stops for the capture, ~1-3 s)"
    )

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and set(data) == {ENVELOPE_KEY}:
            data = data[ENVELOPE_KEY]
            if not isinstance(data, dict):
                raise serializers.ValidationError({ENVELOPE_KEY: [f"{ENVELOPE_KEY} must be an object."]})
        return super().to_internal_value(data)


class RestoreSerializer(ClosedSerializer):
    """`POST /sandboxes/{id}/restore`."""

    checkpoint_id = IdField(required=True, allow_null=False, help_text="A checkpoint of this sandbox")
    snapshot_id = IdField(help_text="Same as checkpoint_id")
    timeout_seconds = SecondsField(
        code="invalid_timeout", maximum="SANDBOX_MAX_TIMEOUT_SECONDS", help_text="The new sandbox's lifetime"
    )
    timeout = SecondsField(code="invalid_timeout", maximum="SANDBOX_MAX_TIMEOUT_SECONDS")

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and "checkpoint_id" not in data and "snapshot_id" in data:
            data = {**data, "checkpoint_id": data["snapshot_id"]}
        values = super().to_internal_value(data)
        if values.get("snapshot_id") is not None and values["snapshot_id"] != values["checkpoint_id"]:
            raise body_refusal("checkpoint_id and snapshot_id name different checkpoints: send one.")
        return values


CHECKPOINT_ENVELOPE = object_envelope("CheckpointEnvelope", ENVELOPE_KEY, CheckpointSerializer())
PAGE = [
    OpenApiParameter("limit", int, description="Page size (default 100, at most 1000)"),
    OpenApiParameter("next_token", str, description="From the previous page"),
]


def _page(request: Request, view: ApiView, queryset: Any) -> Response:
    """One page under the view's `envelope` key, with `next_token`."""
    paginator = NextTokenPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response([checkpoint_representation(c) for c in page])


class _SandboxCheckpointsView(_SandboxView):
    envelope = "snapshots"

    def get(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        queryset = selectors.checkpoints_of_teams(
            teams=teams_for_list(user=self.user, slug=None), sandbox_id=str(sandbox.pk)
        )
        return _page(request, self, queryset)

    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        body = CheckpointCreateSerializer(data=request.data if request.data is not None else {})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        if sandbox.state == "destroyed":
            raise services.sandbox_gone(sandbox.pk)
        checkpoint = checkpoints.checkpoint_create(
            user=self.user,
            sandbox=sandbox,
            name=data.get("name") or "",
            metadata=data.get("metadata"),
            expires_at=data.get("expires_at"),
            quiesce_mode=data.get("quiesce_mode") or QuiesceMode.GUEST,
            include_memory=bool(data.get("include_memory")),
        )
        audit_record(
            team=sandbox.team,
            actor=self.user,
            action="sandbox.checkpoint",
            target=sandbox.pk,
            source="api",
            checkpoint=checkpoint.pk,
        )
        return Response({ENVELOPE_KEY: checkpoint_representation(checkpoint)}, status=201)


CREATE_DOC = dict(
    summary="Checkpoint a sandbox",
    description="Copies the running sandbox's root disk (not its memory, not its volumes) into "
    "a checkpoint and answers once it is `ready`; the sandbox is `checkpointing` meanwhile and "
    "keeps serving. 409 unless the sandbox is `ready`; 422 `checkpoint_quota_exceeded` past "
    f"the team's maximum ({settings.CHECKPOINT_MAX_PER_TEAM} unless the operator set another). "
    'The body may be flat or `{"sandbox_checkpoint": {...}}`.',
    request=CheckpointCreateSerializer,
    responses={201: CHECKPOINT_ENVELOPE},
)


class SandboxSnapshotsView(_SandboxCheckpointsView):
    @extend_schema(
        operation_id="sandbox_snapshots_list",
        summary="List a sandbox's checkpoints (snapshot naming)",
        description="Newest first, also after the sandbox is destroyed.",
        parameters=PAGE,
        responses=list_envelope("SnapshotList", "snapshots", CheckpointSerializer()),
    )
    def get(self, request: Request, sandbox_id: str) -> Response:
        return super().get(request, sandbox_id)

    @extend_schema(operation_id="sandbox_snapshots_create", **CREATE_DOC)  # type: ignore[arg-type]
    def post(self, request: Request, sandbox_id: str) -> Response:
        return super().post(request, sandbox_id)


class SandboxCheckpointsView(_SandboxCheckpointsView):
    envelope = "sandbox_checkpoints"

    @extend_schema(
        operation_id="sandbox_checkpoints_list",
        summary="List a sandbox's checkpoints",
        description="Newest first, also after the sandbox is destroyed.",
        parameters=PAGE,
        responses=list_envelope("CheckpointList", "sandbox_checkpoints", CheckpointSerializer()),
    )
    def get(self, request: Request, sandbox_id: str) -> Response:
        return super().get(request, sandbox_id)

    @extend_schema(operation_id="sandbox_checkpoints_create", **CREATE_DOC)  # type: ignore[arg-type]
    def post(self, request: Request, sandbox_id: str) -> Response:
        return super().post(request, sandbox_id)


def _deleted_or_404(checkpoint: Checkpoint, user: User) -> Response:
    if not checkpoints.checkpoint_delete(checkpoint=checkpoint):  # another request was first
        raise errors.NotFound(f"Checkpoint {checkpoint.pk} not found.", code="checkpoint_not_found")
    audit_record(
        team=checkpoint.team, actor=user, action="checkpoint.delete", target=checkpoint.pk, source="api"
    )
    return Response(status=204)


class SandboxCheckpointDetailView(_SandboxView):
    @extend_schema(
        summary="Get a sandbox's checkpoint",
        description="One checkpoint of this sandbox (404 for another sandbox's).",
        responses=CHECKPOINT_ENVELOPE,
    )
    def get(self, request: Request, sandbox_id: str, checkpoint_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        checkpoint = selectors.checkpoint_get(user=self.user, checkpoint_id=checkpoint_id, sandbox=sandbox)
        return Response({ENVELOPE_KEY: checkpoint_representation(checkpoint)})

    @extend_schema(
        summary="Delete a sandbox's checkpoint",
        description="Deletes the checkpoint and frees its storage; 404 for one that is not this sandbox's.",
        responses={204: None},
    )
    def delete(self, request: Request, sandbox_id: str, checkpoint_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        checkpoint = selectors.checkpoint_get(
            user=self.user, checkpoint_id=checkpoint_id, sandbox=sandbox, write=True
        )
        return _deleted_or_404(checkpoint, self.user)


class SnapshotListView(ApiView):
    envelope = "snapshots"

    @extend_schema(
        operation_id="sandbox_snapshots_all",
        summary="List checkpoints",
        description="Checkpoints of every team you belong to (or of `team`), newest first; "
        "`sandbox_id` narrows them to one source sandbox.",
        parameters=[
            OpenApiParameter("sandbox_id", str, description="Only this sandbox's checkpoints"),
            OpenApiParameter("team", str, description="Only this team's"),
            *PAGE,
        ],
        responses=list_envelope("SnapshotPage", "snapshots", CheckpointSerializer()),
    )
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        sandbox_id = request.query_params.get("sandbox_id") or None
        return _page(request, self, selectors.checkpoints_of_teams(teams=teams, sandbox_id=sandbox_id))


class SnapshotDetailView(ApiView):
    @extend_schema(
        summary="Get a checkpoint",
        description="One checkpoint of your teams (404 for others' and for malformed ids).",
        responses=CHECKPOINT_ENVELOPE,
    )
    def get(self, request: Request, snapshot_id: str) -> Response:
        checkpoint = selectors.checkpoint_get(user=self.user, checkpoint_id=snapshot_id)
        return Response({ENVELOPE_KEY: checkpoint_representation(checkpoint)})

    @extend_schema(
        summary="Delete a checkpoint",
        description="Frees its storage. 404 for an unknown or malformed id (the SDK then returns False).",
        responses={204: None},
    )
    def delete(self, request: Request, snapshot_id: str) -> Response:
        checkpoint = selectors.checkpoint_get(user=self.user, checkpoint_id=snapshot_id, write=True)
        return _deleted_or_404(checkpoint, self.user)


class SandboxRestoreView(_SandboxView):
    @extend_schema(
        summary="Restore a checkpoint into a new sandbox",
        description="A new sandbox on a copy of the checkpoint's disk, with the source's shape, "
        "template version, lifecycle, network policy, env and metadata (volumes are not "
        "inherited); the source is untouched. Answers once the new sandbox is ready, with its "
        "session. The checkpoint must be this sandbox's (404 otherwise); a pending one is "
        "waited for.",
        request=RestoreSerializer,
        responses={
            201: inline_serializer(
                "RestoredSandbox", {"sandbox": SandboxSerializer(), "session": SessionSerializer()}
            )
        },
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        source = self.sandbox(sandbox_id, write=True)
        body = RestoreSerializer(data=request.data if request.data is not None else {})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        checkpoint = selectors.checkpoint_get(
            user=self.user, checkpoint_id=str(data["checkpoint_id"]), sandbox=source, write=True
        )
        spec = None
        lifetime = data.get("timeout_seconds") or data.get("timeout")
        if lifetime:
            spec = CreateSpec(timeout=lifetime, given=frozenset({"timeout"}))
        sandbox, session = services.sandbox_restore(user=self.user, checkpoint=checkpoint, spec=spec)
        audit_record(
            team=sandbox.team,
            actor=self.user,
            action="sandbox.restore",
            target=sandbox.pk,
            source="api",
            checkpoint=checkpoint.pk,
        )
        return _with_session(sandbox, session, status=201)

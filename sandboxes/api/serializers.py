"""Response shapes of the sandbox API (requests are parsed in `requests.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rest_framework import serializers

from sandboxes.models import Sandbox, SandboxState
from sandboxes.sessions import Session, data_plane_url


class _QuotaLimits(serializers.Serializer):
    max_running_instances = serializers.IntegerField()
    max_vcpu_count = serializers.IntegerField()
    max_memory_mb = serializers.IntegerField()


class _QuotaUsage(serializers.Serializer):
    running_instances = serializers.IntegerField()
    vcpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class _QuotaReservation(serializers.Serializer):
    instances = serializers.IntegerField()
    vcpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class QuotaSerializer(serializers.Serializer):
    limits = _QuotaLimits()
    usage = _QuotaUsage()
    reservation = _QuotaReservation()


class _Shape(serializers.Serializer):
    cpu = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class _MemoryRange(serializers.Serializer):
    min = serializers.IntegerField()
    max = serializers.IntegerField()
    increment = serializers.IntegerField()


class _Prices(serializers.Serializer):
    currency = serializers.CharField()
    vcpu_second = serializers.CharField()
    memory_gib_second = serializers.CharField()
    stopped_disk_gib_month = serializers.CharField(allow_null=True)
    checkpoint_gib_month = serializers.CharField(allow_null=True)
    template_gib_month = serializers.CharField(allow_null=True)
    volume_gib_month = serializers.CharField(allow_null=True)


class SandboxLimitsSerializer(serializers.Serializer):
    team = serializers.CharField()
    fallback = _Shape()
    allowed_cpu = serializers.ListField(child=serializers.IntegerField())
    memory_mb = _MemoryRange()
    max_timeout_seconds = serializers.IntegerField()
    default_network_class = serializers.CharField()
    network_classes = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField()),
        help_text="Network classes a sandbox may ask for, with their limits (max_connections)",
    )
    egress_profiles = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Named egress profiles and the hosts each grants",
    )
    prices = _Prices()
    quota = QuotaSerializer()


def iso(value: datetime | None) -> str | None:
    """ISO-8601 UTC with a Z suffix and millisecond precision (what the SDK parses)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_representation(sandbox: Sandbox) -> dict[str, Any]:
    """The spec's Sandbox object. Never carries env vars or the agent secret.

    Optional timestamps are omitted until known: the SDK takes the first
    alias present, even when it is null.
    """
    template = sandbox.template
    version = sandbox.template_version
    body: dict[str, Any] = {
        "id": sandbox.pk,
        "team": sandbox.team.slug,
        "state": sandbox.state,
        # False while its host does not answer (beside the state, which is kept: nothing is lost)
        "reachable": sandbox.reachable,
        "template_id": template.slug if template else None,
        "template": {"id": template.pk, "slug": template.slug, "name": template.name} if template else None,
        "template_version_id": version.pk if version else None,
        "template_version": version.version if version else None,
        "snapshot_id": sandbox.restored_from_id,
        "name": sandbox.name,
        "metadata": sandbox.metadata,
        "timeout": sandbox.timeout,
        "created_at": iso(sandbox.created_at),
        "lifecycle": {"on_timeout": sandbox.on_timeout, "auto_resume": sandbox.auto_resume},
        "volume_mounts": sandbox.volume_mounts,
        "cpu_count": sandbox.cpu_count,
        "memory_mb": sandbox.memory_mb,
        "network_class": sandbox.network_class,
        "network_policy": sandbox.network_policy,
        "network_policy_in_force": sandbox.network_applied_revision == sandbox.network_revision,
        "exposed_ports": [],
        "route_token": sandbox.route_token,
        "data_plane_url": data_plane_url(sandbox),
    }
    for key, value in (
        ("started_at", sandbox.started_at),
        ("ready_at", sandbox.ready_at),
        ("deadline_at", sandbox.deadline_at),
        ("end_at", sandbox.deadline_at),
        ("ended_at", sandbox.ended_at),
    ):
        if value is not None:
            body[key] = iso(value)
    return body


def session_representation(session: Session) -> dict[str, Any]:
    return {
        "data_plane_url": session.data_plane_url,
        "access_token": session.token,
        "token": session.token,
        "expires_at": iso(session.expires_at),
        "route_token": session.route_token,
    }


class SandboxPortSerializer(serializers.Serializer):
    port = serializers.IntegerField()
    host = serializers.CharField(help_text="The preview's own host name")
    url = serializers.URLField(help_text="The preview's origin")
    path_url = serializers.URLField(help_text="The fallback on the platform's origin")
    protocol = serializers.CharField()
    public = serializers.BooleanField(help_text="Reachable without a token (allow_public_traffic)")


class SandboxSerializer(serializers.Serializer):
    """Schema of the Sandbox object (rendering is `sandbox_representation`)."""

    id = serializers.IntegerField()
    team = serializers.CharField()
    state = serializers.ChoiceField(choices=SandboxState.choices)
    reachable = serializers.BooleanField(
        help_text="False while the sandbox's host does not answer: its state is kept and its data plane "
        "answers 503 `host_unavailable` until the host is back."
    )
    template_id = serializers.CharField(allow_null=True)
    template_version_id = serializers.IntegerField(allow_null=True)
    name = serializers.CharField(allow_null=True)
    metadata = serializers.DictField(child=serializers.CharField())
    timeout = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(required=False)
    deadline_at = serializers.DateTimeField(required=False)
    end_at = serializers.DateTimeField(required=False)
    cpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()
    route_token = serializers.CharField()
    data_plane_url = serializers.CharField()


class SessionSerializer(serializers.Serializer):
    data_plane_url = serializers.CharField()
    access_token = serializers.CharField()
    token = serializers.CharField()
    expires_at = serializers.DateTimeField()
    route_token = serializers.CharField()


# --- requests ---------------------------------------------------------------------------
# Both spellings the clients use are accepted: the SDK's (`template`, `envs`) and the docs'
# (`template_id`, `env_vars`). Objects we define (`lifecycle`, `network_policy`) refuse
# unknown keys; the top level of a create, which clients fill with options of their own,
# refuses only near-misses of known keys (`timeuot`): a typo must never silently change what
# happens to a sandbox. Every refused value has its own error code, and lengths are checked
# here (422 naming the field), never left to the database.

"""Sandboxes: one micro-VM each, owned by a team."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models

from teams.models import Team


class SandboxState(models.TextChoices):
    CREATING = "creating"
    READY = "ready"
    RESTORING = "restoring"
    CHECKPOINTING = "checkpointing"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXPIRED = "expired"
    FAILED = "failed"
    LOST = "lost"
    DESTROYED = "destroyed"


# States in which the sandbox holds runtime capacity (and is metered, and counts
# against the quota). The SDK's `is_running()` is true for exactly these.
RUNTIME_STATES = frozenset({
    SandboxState.CREATING, SandboxState.READY, SandboxState.RESTORING,
    SandboxState.CHECKPOINTING, SandboxState.STOPPING,
})


class HostState(models.TextChoices):
    UP = "up"
    DOWN = "down"  # libvirt stopped answering: no placements
    DRAINING = "draining"  # operator: keep running sandboxes, place no new ones


class Host(models.Model):
    """A libvirt host that runs sandbox VMs, with the capacity placement may use."""

    name = models.CharField(max_length=100, unique=True)
    libvirt_uri = models.CharField(max_length=255)
    data_dir = models.CharField(max_length=255, help_text="Sandbox disks and memory images.")
    cpu_capacity = models.PositiveIntegerField(help_text="vCPUs placement may hand out.")
    memory_capacity_mb = models.PositiveIntegerField(help_text="Guest memory placement may hand out.")
    state = models.CharField(max_length=16, choices=HostState.choices, default=HostState.UP)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"


def new_route_token() -> str:
    """A lowercase DNS-label-safe random token naming the sandbox's data plane."""
    return secrets.token_hex(8)


class Sandbox(models.Model):
    """A sandbox and the resources it was granted."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="sandboxes")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    state = models.CharField(max_length=16, choices=SandboxState.choices,
                             default=SandboxState.CREATING, db_index=True)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.PROTECT,
                             related_name="sandboxes")
    name = models.CharField(max_length=200, null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    cpu_count = models.PositiveSmallIntegerField()
    memory_mb = models.PositiveIntegerField()
    timeout = models.PositiveIntegerField()
    route_token = models.CharField(max_length=32, unique=True, default=new_route_token)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["team", "state"], name="sandbox_team_state")]

    def __str__(self) -> str:
        return f"sandbox {self.pk} ({self.state})"

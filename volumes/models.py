"""Named team volumes: an ext4 filesystem in a sparse file on one host.

A volume outlives the sandboxes that mount it. At most one live sandbox holds it at a
time (``holder``); while held, only that sandbox's guest touches the image. Detached, the
host changes it only through ``volumes.engine`` (e2fsprogs in a sandbox, never a mount).
"""

from __future__ import annotations

import re
from pathlib import Path

from django.db import models

from sandboxes.models import Host, Sandbox
from teams.models import Team

# Names are path segments and DNS-ish labels; an all-digit name would read as an id.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def name_problem(name: object) -> str | None:
    """Why `name` is not a volume name, or None."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return "a volume name is 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit."
    if name.isdigit():
        return "a volume name cannot be all digits (it would read as an id)."
    return None


class VolumeState(models.TextChoices):
    CREATING = "creating"  # the row exists, its image is being made
    READY = "ready"
    FAILED = "failed"  # the image could not be made; delete it and create again


class Volume(models.Model):
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="volumes")
    name = models.CharField(max_length=63)
    state = models.CharField(max_length=16, choices=VolumeState.choices, default=VolumeState.CREATING)
    size_bytes = models.BigIntegerField()
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="volumes")
    # The live sandbox the volume is attached to (claimed when a create asks for it, released
    # only once that sandbox's VM is gone).
    holder = models.ForeignKey(
        Sandbox, null=True, blank=True, on_delete=models.PROTECT, related_name="held_volumes"
    )
    metadata = models.JSONField(default=dict, blank=True)
    used_bytes = models.BigIntegerField(default=0)  # inside the filesystem, last measured
    allocated_bytes = models.BigIntegerField(default=0)  # on the host disk (sparse file blocks)
    usage_measured_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="volume_name_unique_per_team")]
        indexes = [models.Index(fields=["team", "-id"])]

    def __str__(self) -> str:
        return f"{self.team.slug}/{self.name}"

    @property
    def mount_path(self) -> str:
        """Where the holder mounts it (its create's `volume_mounts`), '' when detached."""
        if self.holder is None:
            return ""
        return next((m["path"] for m in self.holder.volume_mounts if m["name"] == self.name), "")

    @property
    def size_mb(self) -> int:
        return self.size_bytes // 2**20

    @property
    def image_path(self) -> Path:
        """Where the image lives on its host: ``<host data dir>/volumes/<id>.img``."""
        return Path(self.host.data_dir) / "volumes" / f"{self.pk}.img"


class VolumeUsage(models.Model):
    """One measurement of a volume's storage, kept for billing (priced by a later issue)."""

    volume = models.ForeignKey(Volume, on_delete=models.SET_NULL, null=True, related_name="usage_samples")
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="volume_usage")
    volume_name = models.CharField(max_length=63)
    size_bytes = models.BigIntegerField()
    used_bytes = models.BigIntegerField()
    allocated_bytes = models.BigIntegerField()
    at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["team", "at"])]

    def __str__(self) -> str:
        return f"{self.volume_name} at {self.at:%Y-%m-%d %H:%M}: {self.used_bytes} B used"

"""Sandbox templates and their immutable versions."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from sandboxes.models import Host
from teams.models import Team
from watasu import crypto


class Visibility(models.TextChoices):
    PROVIDER = "provider"  # platform-owned, visible to every team, immutable to customers
    TEAM = "team"


class Template(models.Model):
    """A named environment teams start sandboxes from (`base`, `python-ci`...)."""

    team = models.ForeignKey(
        Team,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="templates",
        help_text="Empty for provider templates.",
    )
    slug = models.SlugField(max_length=63)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # A deleted template (and all its versions) no longer lists or resolves, and its slug is
    # free for a new template; its files go once nothing references them (retention sweep).
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["team", "slug"],
                condition=Q(deleted_at__isnull=True),
                name="template_team_slug_unique",
            ),
            models.UniqueConstraint(
                fields=["slug"], condition=Q(team__isnull=True), name="template_provider_slug_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.slug

    @property
    def visibility(self) -> str:
        return Visibility.PROVIDER if self.team_id is None else Visibility.TEAM


class VersionStatus(models.TextChoices):
    DRAFT = "draft"
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class TemplateVersion(models.Model):
    """One immutable build of a template.

    A ready version's artifact is an immutable qcow2 disk plus a memory
    snapshot taken after the guest agent answered; sandboxes start by
    restoring that snapshot over their own overlay of the disk. The snapshot
    belongs to the host that took it (`host`).
    """

    template = models.ForeignKey(Template, on_delete=models.CASCADE, related_name="versions")
    version = models.CharField(max_length=100)
    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.DRAFT, db_index=True
    )
    cpu = models.PositiveSmallIntegerField(help_text="runtime_baseline vCPUs")
    memory_mb = models.PositiveIntegerField(help_text="runtime_baseline memory")
    build_spec = models.JSONField(default=dict, blank=True)
    # The build's env (`build_spec.env`), encrypted like sandbox env vars; build_spec keeps
    # only the names (`env_keys`), so no API answer or admin page shows the values.
    env_encrypted = models.TextField(blank=True)
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.PROTECT, related_name="template_versions"
    )
    artifact_dir = models.CharField(max_length=500, blank=True)
    artifact_digest = models.CharField(max_length=64, blank=True)
    # The artifact's digest in the artifact store (templates_app/artifacts.py): how other
    # hosts fetch it. Empty until the owner host published it (or when that failed).
    store_digest = models.CharField(max_length=64, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    last_error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    build_started_at = models.DateTimeField(null=True, blank=True)
    built_at = models.DateTimeField(null=True, blank=True)
    # The build's inputs (parent, steps, start/ready, shape) hashed: an equal key on the
    # same host means an equal artifact, so a rebuild can reuse it.
    cache_key = models.CharField(max_length=64, blank=True, db_index=True)
    skip_cache = models.BooleanField(default=False, help_text="Build every step, reuse nothing.")
    # A building version whose worker stops renewing this is failed by the builds sweep.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Deleted versions no longer resolve; their files go once nothing references them.
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["template", "version"], name="template_version_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.template.slug}:{self.version} ({self.status})"

    def build_env(self) -> dict[str, str]:
        """The env this version was built with (and its sandboxes start with), decrypted.
        Versions from before env was encrypted kept it in `build_spec.env`."""
        if self.env_encrypted:
            return dict(crypto.decrypt_json(self.env_encrypted))
        return {str(k): str(v) for k, v in (self.build_spec.get("env") or {}).items()}


class TemplateTag(models.Model):
    """A movable name for one version of a template (`python-ci:stable`)."""

    template = models.ForeignKey(Template, on_delete=models.CASCADE, related_name="tags")
    version = models.ForeignKey(TemplateVersion, on_delete=models.CASCADE, related_name="tags")
    tag = models.SlugField(max_length=63)
    created_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["template", "tag"], name="template_tag_unique")]
        ordering = ["tag"]

    def __str__(self) -> str:
        return f"{self.template.slug}:{self.tag}"


class BuildLogEntry(models.Model):
    """One line of a version's build log, written while the build runs."""

    version = models.ForeignKey(TemplateVersion, on_delete=models.CASCADE, related_name="log_entries")
    index = models.PositiveIntegerField()
    at = models.DateTimeField()
    level = models.CharField(max_length=8, default="info")
    message = models.TextField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["version", "index"], name="build_log_index")]
        ordering = ["version", "index"]

    def __str__(self) -> str:
        return f"{self.version_id}#{self.index} {self.message[:40]}"


class BuildLayer(models.Model):
    """One cached build step on one host: a qcow2 file holding what the step wrote.

    Its backing file is its parent layer's file, or for the first step the disk of the
    version it was built from (``base_version``). Both references are PROTECT foreign keys,
    so a layer's chain cannot be deleted from under it; only leaves are ever evicted.
    """

    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="build_layers")
    key = models.CharField(max_length=64)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    base_version = models.ForeignKey(TemplateVersion, on_delete=models.PROTECT, related_name="child_layers")
    step = models.CharField(max_length=100)
    path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "key"], name="build_layer_host_key")]

    def __str__(self) -> str:
        return f"{self.step} {self.key[:12]}"


class HostArtifact(models.Model):
    """A host that holds a version's artifact: its owner, or one that pulled it from the
    artifact store. Placement prefers these hosts (no transfer before the start)."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="artifacts")
    version = models.ForeignKey(TemplateVersion, on_delete=models.CASCADE, related_name="host_artifacts")
    path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    pulled_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "version"], name="host_artifact_unique")]

    def __str__(self) -> str:
        return f"{self.version_id} on {self.host_id}"

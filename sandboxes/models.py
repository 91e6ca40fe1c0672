"""Sandboxes: one micro-VM each, owned by a team."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

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
RUNTIME_STATES = frozenset(
    {
        SandboxState.CREATING,
        SandboxState.READY,
        SandboxState.RESTORING,
        SandboxState.CHECKPOINTING,
        SandboxState.STOPPING,
    }
)


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
    # Where the edge and the web processes reach this host's agents (each forwarded agent
    # port listens on it): a private address in a multi-host deployment, loopback alone.
    address = models.GenericIPAddressField(default="127.0.0.1", protocol="IPv4")
    # The Celery queue of the host's own worker, which runs every step touching its VMs and
    # files ("" for a host driven in-process: the embedded single-machine mode).
    queue = models.CharField(max_length=120, blank=True, default="")
    # Its worker's WATASU_VM_PREFIX: names of its warm pool VMs are known outside the host.
    vm_prefix = models.CharField(max_length=100, blank=True, default="")
    # The last heartbeat of the host's worker (or, in-process, the last libvirt answer),
    # with what it measured then: placement reads these for hosts with a worker.
    last_seen_at = models.DateTimeField(null=True, blank=True)
    memory_available_mb = models.PositiveIntegerField(null=True, blank=True)
    disk_free_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    # When placement last chose it: ties between equally free hosts go to the one chosen
    # longest ago, so idle hosts take turns.
    last_placed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"


class OnTimeout(models.TextChoices):
    KILL = "kill"
    PAUSE = "pause"


def new_route_token() -> str:
    """A lowercase DNS-label-safe random token naming the sandbox's data plane."""
    return secrets.token_hex(8)


class Sandbox(models.Model):
    """A sandbox: one VM on one host, the resources it was granted, and its policy.

    Env vars and the guest agent's secret are stored encrypted. The VM's
    libvirt name is derived from the id (`vm_name`) so a domain can always be
    traced back to its row.
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="sandboxes")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    state = models.CharField(
        max_length=16, choices=SandboxState.choices, default=SandboxState.CREATING, db_index=True
    )
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.PROTECT, related_name="sandboxes")
    template = models.ForeignKey(
        "templates_app.Template", null=True, blank=True, on_delete=models.PROTECT, related_name="sandboxes"
    )
    template_version = models.ForeignKey(
        "templates_app.TemplateVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="sandboxes",
    )
    name = models.CharField(max_length=200, null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    cpu_count = models.PositiveSmallIntegerField()
    memory_mb = models.PositiveIntegerField()
    timeout = models.PositiveIntegerField(help_text="Lifetime in seconds from each (re)start.")
    on_timeout = models.CharField(max_length=8, choices=OnTimeout.choices, default=OnTimeout.KILL)
    auto_resume = models.BooleanField(default=False)
    env_vars_encrypted = models.TextField(blank=True)
    volume_mounts = models.JSONField(default=list, blank=True)
    # The checkpoint this sandbox was restored from (its disk started as a copy of it).
    restored_from = models.ForeignKey(
        "Checkpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="restores"
    )
    network_class = models.CharField(max_length=32, default="standard")
    network_policy = models.JSONField(default=dict, blank=True)
    # header rule values (secrets) apart from the shown policy, encrypted; never echoed
    network_rules_encrypted = models.TextField(blank=True)
    # bumped by every policy change; the host records the revision it enforces
    network_revision = models.PositiveIntegerField(default=0)
    network_applied_revision = models.IntegerField(null=True, blank=True)
    # Created with `mcp`: the in-guest gateway serves port 50005, which the edge opens to
    # callers with the gateway's token even when allow_public_traffic is false.
    mcp_enabled = models.BooleanField(default=False)
    # sha256 of the gateway's token: the edge checks it for port 50005 of a private sandbox
    # (the token itself lives only in the guest)
    mcp_token_sha256 = models.CharField(max_length=64, blank=True, default="")
    route_token = models.CharField(max_length=32, unique=True, default=new_route_token)
    # A sandbox started from the warm pool runs the pooled domain: its libvirt name and QEMU
    # uid are the pool's (empty/None: derived from the id, see `vm_name` and vm.qemu_uid).
    domain_name = models.CharField(max_length=100, blank=True, default="")
    runtime_uid = models.PositiveBigIntegerField(null=True, blank=True)
    # A `stopped` sandbox whose VM is suspended in host memory (the first tier of a pause:
    # resumes in milliseconds); False once its memory is on disk (managed save).
    paused_in_memory = models.BooleanField(default=False)
    # when that pause began (the pool sweep saves it to disk WATASU_PAUSE_IN_MEMORY_SECONDS later)
    paused_at = models.DateTimeField(null=True, blank=True)
    # A `stopped` sandbox whose memory was lost with its host while the pause was held in
    # memory: it no longer holds host memory, and its resume boots on its own disk.
    memory_lost = models.BooleanField(default=False)
    # False while its host is down (its worker silent): the sandbox keeps its state and
    # is never destroyed for it; its data plane answers 503 until the host is back.
    reachable = models.BooleanField(default=True)
    vm_uuid = models.UUIDField(default=uuid.uuid4, unique=True)
    agent_port = models.PositiveIntegerField(null=True, blank=True)
    agent_secret_encrypted = models.TextField(blank=True)
    # Bumped to revoke every session token of the sandbox at once.
    session_epoch = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # When the VM, its saved memory and its disk were removed. Failed and lost sandboxes
    # keep their disk for the retention period (for inspection), then the retention
    # sweep purges them; destroy and expiry purge at once.
    purged_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "sandboxes"
        indexes = [
            models.Index(fields=["team", "state"], name="sandbox_team_state"),
            # Newest-first pages of one team walk this index backwards and stop at `limit`.
            models.Index(fields=["team", "-id"], name="sandbox_team_newest"),
            # The deadline sweep's scan: running sandboxes by deadline.
            models.Index(fields=["state", "deadline_at"], name="sandbox_state_deadline"),
        ]

    def __str__(self) -> str:
        return f"sandbox {self.pk} ({self.state})"

    @property
    def vm_name(self) -> str:
        return self.domain_name or f"{settings.RUNTIME_VM_PREFIX}{self.pk}"

    @property
    def placed_host(self) -> Host:
        """The host of a sandbox being started, paused or resumed: placement sets `host` in
        the transaction that creates the row, so only a row made by hand lacks one."""
        if self.host is None:
            raise ValueError(f"{self} was never placed on a host")
        return self.host


class PooledVmState(models.TextChoices):
    FILLING = "filling"  # being restored; removed by the pool sweep if its filler died
    READY = "ready"  # suspended with a fresh (sealed) agent, waiting for a create


class PooledVm(models.Model):
    """A warm pool VM: a clone of a template version's memory snapshot restored ahead of
    time and held suspended on its host, for one shape. A create takes it (the row goes in
    the create's transaction) and gives it its identity; until then it belongs to no team,
    counts against its host's capacity, and is never metered."""

    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="pooled_vms")
    template_version = models.ForeignKey(
        "templates_app.TemplateVersion", on_delete=models.PROTECT, related_name="pooled_vms"
    )
    cpu_count = models.PositiveSmallIntegerField()
    memory_mb = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=PooledVmState.choices, default=PooledVmState.FILLING)
    agent_port = models.PositiveIntegerField(null=True, blank=True)
    # the secret its agent holds until a create gives it the sandbox's (encrypted)
    agent_secret_encrypted = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "warm pool VM"
        indexes = [
            models.Index(
                fields=["template_version", "cpu_count", "memory_mb", "host", "state"], name="pooled_vm_key"
            )
        ]

    def __str__(self) -> str:
        return f"pooled VM {self.pk} ({self.state})"

    @property
    def domain_name(self) -> str:
        """Its libvirt name, as its host's worker named it (a create in a web process takes it)."""
        prefix = (
            self.host.vm_prefix if self.host.queue and self.host.vm_prefix else settings.RUNTIME_VM_PREFIX
        )
        return f"{prefix}pool-{self.pk}"

    @property
    def qemu_uid(self) -> int | None:
        """Its own QEMU uid, above every sandbox's (base + POOL_UID_OFFSET + id); the sandbox
        that takes it keeps it. None when QEMUs share one user."""
        base = settings.RUNTIME_QEMU_UID_BASE
        return base + POOL_UID_OFFSET + self.pk if base else None


# Pooled VMs' QEMU uids start this far above the sandboxes' (sandbox ids stay below it).
POOL_UID_OFFSET = 1_000_000_000


class SandboxEvent(models.Model):
    """One state transition of a sandbox, with its time: what billing meters."""

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="events")
    from_state = models.CharField(max_length=16, choices=SandboxState.choices, blank=True)
    to_state = models.CharField(max_length=16, choices=SandboxState.choices)
    at = models.DateTimeField(db_index=True)
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.sandbox_id}: {self.from_state or '-'} -> {self.to_state}"


class SweepRun(models.Model):
    """The last run of one sweep (`sandboxes.sweeps.SWEEPS`), for operators."""

    name = models.CharField(max_length=50, unique=True)
    runs = models.PositiveIntegerField(default=0)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    last_result = models.JSONField(default=dict, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class QuiesceMode(models.TextChoices):
    GUEST = "guest"  # the guest's root filesystem is frozen (flushed) around the capture
    CRASH = "crash"  # no quiescing: what a power cut would leave


class CheckpointStatus(models.TextChoices):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class Checkpoint(models.Model):
    """A disk checkpoint of a running sandbox (the API's "snapshot"): its root disk as it was,
    restorable into new sandboxes.

    The artifact is one qcow2 file on the host whose only backing file is the template
    version's disk: it depends on nothing the source sandbox owns, so destroying the
    source (or its expiry or loss) leaves it whole. The template version is protected
    while a checkpoint of it exists, and the retention sweep keeps the version's files.
    Volumes are separate disks and are never part of a checkpoint.
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="checkpoints")
    sandbox = models.ForeignKey(Sandbox, on_delete=models.PROTECT, related_name="checkpoints")
    template_version = models.ForeignKey(
        "templates_app.TemplateVersion", on_delete=models.PROTECT, related_name="checkpoints"
    )
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="checkpoints")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    name = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    quiesce_mode = models.CharField(max_length=8, choices=QuiesceMode.choices, default=QuiesceMode.GUEST)
    status = models.CharField(
        max_length=8, choices=CheckpointStatus.choices, default=CheckpointStatus.PENDING, db_index=True
    )
    # The source's shape when captured: what a restore starts with.
    cpu_count = models.PositiveSmallIntegerField()
    memory_mb = models.PositiveIntegerField()
    size_bytes = models.BigIntegerField(default=0, help_text="Disk space the artifact takes")
    # Our extension: the guest's memory too, so a restore resumes its processes. The
    # memory holds the source's agent secret, which the clone's first init must present.
    include_memory = models.BooleanField(default=False)
    agent_secret_encrypted = models.TextField(blank=True)
    error = models.TextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["team", "-id"], name="checkpoint_team_newest"),
            models.Index(fields=["sandbox", "-id"], name="checkpoint_sandbox_newest"),
        ]

    def __str__(self) -> str:
        return f"checkpoint {self.pk} of sandbox {self.sandbox_id} ({self.status})"

    @property
    def path(self) -> Path:
        """The artifact: ``<host data dir>/checkpoints/<id>.qcow2``."""
        return Path(self.host.data_dir) / "checkpoints" / f"{self.pk}.qcow2"

    @property
    def memory_path(self) -> Path:
        """The memory image of an `include_memory` checkpoint: ``checkpoints/<id>.save``."""
        return self.path.with_suffix(".save")

    def files(self) -> list[Path]:
        return [self.path, self.memory_path] if self.include_memory else [self.path]

    @property
    def local_state(self) -> str:
        """Where the artifact is: `present` on its host, `capturing`, `missing` (a ready
        checkpoint whose file is gone, e.g. its host's disk was lost) or `none` (failed)."""
        if self.status == CheckpointStatus.PENDING:
            return "capturing"
        if self.status == CheckpointStatus.FAILED:
            return "none"
        return "present" if all(path.exists() for path in self.files()) else "missing"

"""Operator views of hosts and sandboxes."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from sandboxes import hosts, network, pool
from sandboxes.checkpoints import checkpoint_delete
from sandboxes.models import (
    RUNTIME_STATES,
    Checkpoint,
    Host,
    HostState,
    PooledVm,
    Sandbox,
    SandboxEvent,
    SandboxState,
    SweepRun,
)
from sandboxes.services import sandbox_destroy
from sandboxes.sweeps import SWEEPS, sweep_run


class HostForm(forms.ModelForm):
    """Memory is never overcommitted: capacity above the host's RAM is refused."""

    class Meta:
        model = Host
        fields = ["name", "libvirt_uri", "data_dir", "state", "cpu_capacity", "memory_capacity_mb"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        wanted = data.get("memory_capacity_mb")
        if wanted and self.instance.pk:
            try:
                physical = hosts.physical_memory_mb(self.instance)
            except Exception as exc:  # libvirt does not answer: cannot check, so refuse
                raise forms.ValidationError(f"Cannot read the host's memory from libvirt: {exc}") from exc
            if wanted > physical:
                self.add_error(
                    "memory_capacity_mb",
                    f"The host holds {physical} MB; guests' memory "
                    "is real memory and is never overcommitted.",
                )
        return data


@admin.action(description="Drain selected hosts (keep their sandboxes, place no new ones)")
def drain_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    # only an up host is drained: a down one is the sweep's to bring back (as up)
    drained = Host.objects.filter(pk__in=queryset.values("pk"), state=HostState.UP).update(
        state=HostState.DRAINING
    )
    message = f"Drained {drained} host(s); new sandboxes go elsewhere."
    modeladmin.message_user(request, message, messages.SUCCESS)


@admin.action(description="Undrain selected hosts (place sandboxes on them again)")
def undrain_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    undrained = Host.objects.filter(pk__in=queryset.values("pk"), state=HostState.DRAINING).update(
        state=HostState.UP
    )
    modeladmin.message_user(request, f"Undrained {undrained} host(s).", messages.SUCCESS)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    """Hosts with their capacity and what runtime sandboxes hold of it (one query for the
    list: the same sums placement uses). A draining or down host gets no placements; its
    sandboxes stay listed (follow `sandboxes`)."""

    form = HostForm

    list_display = [
        "name",
        "state",
        "cpu",
        "memory",
        "running_sandboxes",
        "stopped_sandboxes",
        "last_seen_at",
        "address",
        "queue",
        "memory_available_mb",
        "sandboxes_link",
    ]
    list_filter = ["state"]
    search_fields = ["name", "libvirt_uri", "address"]
    readonly_fields = [
        "created_at",
        "last_seen_at",
        "address",
        "queue",
        "memory_available_mb",
        "disk_free_bytes",
        "last_placed_at",
        "sandboxes_link",
    ]
    actions = [drain_hosts, undrain_hosts]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Host]:
        in_runtime = Q(sandboxes__state__in=RUNTIME_STATES)
        return (
            super()
            .get_queryset(request)
            .annotate(
                used_cpu=Coalesce(Sum("sandboxes__cpu_count", filter=in_runtime), 0),
                used_memory_mb=Coalesce(Sum("sandboxes__memory_mb", filter=in_runtime), 0),
                running_count=Count("sandboxes", filter=in_runtime),
                stopped_count=Count("sandboxes", filter=Q(sandboxes__state=SandboxState.STOPPED)),
            )
        )

    @admin.display(description="vCPU used / capacity", ordering="used_cpu")
    def cpu(self, host: Host) -> str:
        return f"{host.used_cpu} / {host.cpu_capacity}"  # type: ignore[attr-defined]

    @admin.display(description="memory MB used / capacity", ordering="used_memory_mb")
    def memory(self, host: Host) -> str:
        return f"{host.used_memory_mb} / {host.memory_capacity_mb}"  # type: ignore[attr-defined]

    @admin.display(description="running", ordering="running_count")
    def running_sandboxes(self, host: Host) -> int:
        return host.running_count  # type: ignore[attr-defined]

    @admin.display(description="stopped", ordering="stopped_count")
    def stopped_sandboxes(self, host: Host) -> int:
        return host.stopped_count  # type: ignore[attr-defined]

    @admin.display(description="sandboxes")
    def sandboxes_link(self, host: Host) -> str:
        if host.pk is None:
            return "-"
        url = reverse("admin:sandboxes_sandbox_changelist")
        return format_html('<a href="{}?host__id__exact={}">Sandboxes on {}</a>', url, host.pk, host.name)


class EventInline(admin.TabularInline):
    model = SandboxEvent
    extra = 0
    fields = ["at", "from_state", "to_state", "reason"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.action(description="Force-destroy selected sandboxes (VM, memory image and disk)")
def force_destroy(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
    for sandbox in queryset.select_related("host"):
        sandbox_destroy(sandbox=sandbox, reason=f"admin: {request.user}")
    modeladmin.message_user(request, f"Destroyed {queryset.count()} sandbox(es).", messages.SUCCESS)


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "state", "host", "cpu_count", "memory_mb", "created_at", "deadline_at"]
    list_filter = ["state", "host"]
    list_select_related = ["team", "host"]
    search_fields = ["id", "team__slug", "route_token", "name"]
    readonly_fields = [
        "state",
        "route_token",
        "vm_uuid",
        "agent_port",
        "session_epoch",
        "created_at",
        "started_at",
        "ready_at",
        "ended_at",
        "purged_at",
        "updated_at",
        "last_error",
        "restored_from",
        "domain_name",
        "runtime_uid",
        "paused_in_memory",
        # a policy changes through PUT /network only (checked, then enforced on the host)
        "network_class",
        "network_policy",
        "network_policy_in_force",
        "network_refused_connections",
    ]
    exclude = [
        "env_vars_encrypted",
        "agent_secret_encrypted",
        "network_rules_encrypted",
        "network_revision",
        "network_applied_revision",
    ]
    inlines = [EventInline]
    actions = [force_destroy]

    @admin.display(boolean=True, description="Network policy in force")
    def network_policy_in_force(self, sandbox: Sandbox) -> bool:
        return sandbox.network_applied_revision == sandbox.network_revision

    @admin.display(description="Connections refused by its policy")
    def network_refused_connections(self, sandbox: Sandbox) -> int:
        return network.refused(sandbox) if sandbox.state == SandboxState.READY else 0


@admin.action(description="Release selected warm pool VMs (the pool sweep refills what is still wanted)")
def release_pooled(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[PooledVm]) -> None:
    released = 0
    for pooled in queryset.select_related("host"):
        name = pooled.domain_name
        if PooledVm.objects.filter(pk=pooled.pk).delete()[0]:  # the row first: no create takes it
            pool.pooled_domain_destroy(pooled.host, name)
            released += 1
    modeladmin.message_user(request, f"Released {released} warm pool VM(s).", messages.SUCCESS)


@admin.register(PooledVm)
class PooledVmAdmin(admin.ModelAdmin):
    """The warm pools: what each host holds suspended for fast creates (see sandboxes/pool.py)."""

    list_display = ["id", "host", "template_version", "cpu_count", "memory_mb", "state", "ready_at"]
    list_filter = ["host", "state", "template_version__template"]
    list_select_related = ["host", "template_version__template"]
    readonly_fields = [f.name for f in PooledVm._meta.fields] + ["domain", "uid"]
    actions = [release_pooled]

    @admin.display(description="libvirt domain")
    def domain(self, pooled: PooledVm) -> str:
        return pooled.domain_name

    @admin.display(description="QEMU uid")
    def uid(self, pooled: PooledVm) -> int | None:
        return pooled.qemu_uid

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the pool sweep fills the pools


@admin.action(description="Delete selected checkpoints (and free their storage)")
def delete_checkpoints(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Checkpoint]
) -> None:
    count = 0
    for checkpoint in queryset.select_related("host"):
        checkpoint_delete(checkpoint=checkpoint)
        count += 1
    modeladmin.message_user(request, f"Deleted {count} checkpoint(s).", messages.SUCCESS)


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    """Checkpoints with their size, source, state and expiry. Deleting goes through the
    service (the artifact is removed with the row), never Django's own delete."""

    list_display = [
        "id",
        "team",
        "sandbox",
        "name",
        "status",
        "size_mib",
        "host",
        "quiesce_mode",
        "expires_at",
        "created_at",
    ]
    list_filter = ["status", "quiesce_mode", "host"]
    list_select_related = ["team", "sandbox", "host"]
    search_fields = ["id", "name", "team__slug", "sandbox__id"]
    exclude = ["agent_secret_encrypted"]
    readonly_fields = [f.name for f in Checkpoint._meta.fields if f.name != "agent_secret_encrypted"] + [
        "local_state"
    ]
    actions = [delete_checkpoints]

    @admin.display(description="size (MiB)")
    def size_mib(self, checkpoint: Checkpoint) -> str:
        return f"{checkpoint.size_bytes / 2**20:.1f}"

    @admin.display(description="local state")
    def local_state(self, checkpoint: Checkpoint) -> str:
        return checkpoint.local_state

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.action(description="Run the selected sweeps now")
def run_sweeps(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[SweepRun]) -> None:
    for run in queryset:
        try:
            result = sweep_run(run.name)
        except Exception as exc:
            modeladmin.message_user(request, f"{run.name}: {exc}", messages.ERROR)
            continue
        modeladmin.message_user(request, f"{run.name}: {result}", messages.SUCCESS)


@admin.register(SweepRun)
class SweepRunAdmin(admin.ModelAdmin):
    """Every sweep with its last run; select some and run them now."""

    list_display = ["name", "runs", "last_started_at", "last_finished_at", "last_result", "last_error"]
    readonly_fields = list_display
    actions = [run_sweeps]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
        for name in SWEEPS:  # every sweep is listed, run or not
            SweepRun.objects.get_or_create(name=name)
        return super().changelist_view(request, extra_context)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

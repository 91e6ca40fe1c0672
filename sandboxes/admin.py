"""Operator views of hosts and sandboxes."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from sandboxes import network
from sandboxes.checkpoints import checkpoint_delete
from sandboxes.models import Checkpoint, Host, Sandbox, SandboxEvent, SandboxState, SweepRun
from sandboxes.runtime import driver_for
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
                physical = driver_for(self.instance).memory_mb()
            except Exception as exc:  # libvirt does not answer: cannot check, so refuse
                raise forms.ValidationError(f"Cannot read the host's memory from libvirt: {exc}") from exc
            if wanted > physical:
                self.add_error(
                    "memory_capacity_mb",
                    f"The host holds {physical} MB; guests' memory "
                    "is real memory and is never overcommitted.",
                )
        return data


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    """A down host gets no placements; its sandboxes stay listed (`ready`/`stopped` counts)."""

    form = HostForm

    list_display = [
        "name",
        "state",
        "libvirt_uri",
        "cpu_capacity",
        "memory_capacity_mb",
        "last_seen_at",
        "running_sandboxes",
        "stopped_sandboxes",
    ]
    list_filter = ["state"]
    search_fields = ["name", "libvirt_uri"]
    readonly_fields = ["created_at", "last_seen_at"]

    @admin.display(description="ready")
    def running_sandboxes(self, host: Host) -> int:
        return host.sandboxes.filter(state=SandboxState.READY).count()

    @admin.display(description="stopped")
    def stopped_sandboxes(self, host: Host) -> int:
        return host.sandboxes.filter(state=SandboxState.STOPPED).count()


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

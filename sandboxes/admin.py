"""Operator views of hosts and sandboxes."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from sandboxes.models import Host, Sandbox, SandboxEvent
from sandboxes.services import sandbox_destroy


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "state", "libvirt_uri", "cpu_capacity", "memory_capacity_mb",
                    "last_seen_at"]
    list_filter = ["state"]
    search_fields = ["name", "libvirt_uri"]
    readonly_fields = ["created_at", "last_seen_at"]


class EventInline(admin.TabularInline):
    model = SandboxEvent
    extra = 0
    fields = ["at", "from_state", "to_state", "reason"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.action(description="Force-destroy selected sandboxes (VM, memory image and disk)")
def force_destroy(modeladmin: admin.ModelAdmin, request: HttpRequest,
                  queryset: QuerySet[Sandbox]) -> None:
    for sandbox in queryset.select_related("host"):
        sandbox_destroy(sandbox=sandbox, reason=f"admin: {request.user}")
    modeladmin.message_user(request, f"Destroyed {queryset.count()} sandbox(es).", messages.SUCCESS)


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "state", "host", "cpu_count", "memory_mb", "created_at",
                    "deadline_at"]
    list_filter = ["state", "host"]
    list_select_related = ["team", "host"]
    search_fields = ["id", "team__slug", "route_token", "name"]
    readonly_fields = ["state", "route_token", "vm_uuid", "agent_port", "session_epoch", "created_at",
                       "started_at", "ready_at", "ended_at", "updated_at", "last_error"]
    exclude = ["env_vars_encrypted", "agent_secret_encrypted"]
    inlines = [EventInline]
    actions = [force_destroy]

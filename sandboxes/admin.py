"""Operator views of hosts and sandboxes."""

from __future__ import annotations

from django.contrib import admin

from sandboxes.models import Host, Sandbox


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "state", "libvirt_uri", "cpu_capacity", "memory_capacity_mb",
                    "last_seen_at"]
    list_filter = ["state"]
    search_fields = ["name", "libvirt_uri"]
    readonly_fields = ["created_at", "last_seen_at"]


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "state", "host", "cpu_count", "memory_mb", "created_at",
                    "deadline_at"]
    list_filter = ["state", "host"]
    list_select_related = ["team", "host"]
    search_fields = ["id", "team__slug", "route_token", "name"]
    readonly_fields = ["route_token", "created_at", "updated_at", "ready_at"]

"""Operator views of templates and their versions."""

from __future__ import annotations

from django.contrib import admin

from templates_app import shapes
from templates_app.models import BuildLayer, Template, TemplateVersion


class VersionInline(admin.TabularInline):
    model = TemplateVersion
    extra = 0
    fields = ["version", "status", "cpu", "memory_mb", "host", "size_bytes", "built_at"]
    readonly_fields = fields
    show_change_link = True


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = ["slug", "team", "name", "created_at"]
    list_select_related = ["team"]
    search_fields = ["slug", "name", "team__slug"]
    inlines = [VersionInline]


@admin.register(TemplateVersion)
class TemplateVersionAdmin(admin.ModelAdmin):
    list_display = ["template", "version", "status", "cpu", "memory_mb", "host", "size_bytes", "built_at"]
    list_filter = ["status"]
    list_select_related = ["template", "host"]
    search_fields = ["template__slug", "version"]
    readonly_fields = [
        "artifact_dir",
        "artifact_digest",
        "size_bytes",
        "built_at",
        "created_at",
        "last_error_message",
        "cache_key",
        "lease_expires_at",
        "deleted_at",
        "shape_snapshots",
    ]

    @admin.display(description="shape snapshots")
    def shape_snapshots(self, obj: TemplateVersion) -> str:
        """The memory snapshots made in shapes other than the baseline (templates_app/shapes.py)."""
        return shapes.summary(obj) or "none"


@admin.register(BuildLayer)
class BuildLayerAdmin(admin.ModelAdmin):
    """The build cache: read-only (the retention sweep evicts unused leaves)."""

    list_display = ["step", "key", "host", "base_version", "parent", "size_bytes", "last_used_at"]
    list_select_related = ["host", "base_version__template", "parent"]
    search_fields = ["key", "step"]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False

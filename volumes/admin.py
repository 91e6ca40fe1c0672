"""Operator views of volumes: who holds each, what it uses, and a force-detach for a
volume whose holder is gone."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from volumes.models import Volume, VolumeUsage
from volumes.services import release_if_gone, volume_delete
from watasu import errors


@admin.register(Volume)
class VolumeAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "team",
        "state",
        "size_bytes",
        "holder",
        "mount_path",
        "used_bytes",
        "allocated_bytes",
        "host",
        "updated_at",
    ]
    list_filter = ["state", "host"]
    search_fields = ["name", "team__slug"]
    list_select_related = ["team", "host", "holder"]
    readonly_fields = [
        "team",
        "name",
        "size_bytes",
        "host",
        "holder",
        "mount_path",
        "used_bytes",
        "allocated_bytes",
        "usage_measured_at",
        "last_error",
        "created_at",
        "updated_at",
    ]
    fields = ["state", "metadata", *readonly_fields]
    actions = ["force_detach", "delete_detached"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a volume is made with its image, through the API

    def has_delete_permission(self, request: HttpRequest, obj: Volume | None = None) -> bool:
        return False  # Django's delete would drop the row of a held volume and keep its image

    @admin.action(description="Delete (detached volumes only, with their images)")
    def delete_detached(self, request: HttpRequest, queryset: QuerySet[Volume]) -> None:
        done, kept = [], []
        for volume in queryset.select_related("host"):
            try:
                volume_delete(volume=volume)
                done.append(volume.name)
            except errors.DomainError as exc:
                kept.append(f"{volume.name} ({exc.message})")
        if done:
            self.message_user(request, f"Deleted: {', '.join(done)}.", messages.SUCCESS)
        if kept:
            self.message_user(request, f"Not deleted: {'; '.join(kept)}", messages.WARNING)

    @admin.action(description="Force-detach (only volumes whose sandbox is gone)")
    def force_detach(self, request: HttpRequest, queryset: QuerySet[Volume]) -> None:
        done, kept = [], []
        for volume in queryset.select_related("host"):
            (done if release_if_gone(volume) else kept).append(volume.name)
        if done:
            self.message_user(request, f"Detached: {', '.join(done)}.", messages.SUCCESS)
        if kept:
            self.message_user(
                request,
                f"Not detached (no holder, or its sandbox or VM still exists): {', '.join(kept)}.",
                messages.WARNING,
            )


@admin.register(VolumeUsage)
class VolumeUsageAdmin(admin.ModelAdmin):
    list_display = ["at", "team", "volume_name", "used_bytes", "allocated_bytes", "size_bytes"]
    list_filter = ["team"]
    date_hierarchy = "at"
    readonly_fields = ["volume", "team", "volume_name", "size_bytes", "used_bytes", "allocated_bytes", "at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

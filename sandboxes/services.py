"""Writes for hosts and sandboxes."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from sandboxes.models import Host, HostState


def host_register_local() -> Host:
    """Register (or refresh) this machine as a host, from the runtime settings.

    Embedded mode calls this on every start. Capacity is taken from the
    settings at first registration only, so operators' edits in the admin last.
    """
    host, created = Host.objects.get_or_create(
        name=settings.RUNTIME_HOST_NAME,
        defaults={
            "libvirt_uri": settings.RUNTIME_LIBVIRT_URI,
            "data_dir": str(settings.RUNTIME_HOST_DATA_DIR),
            "cpu_capacity": settings.RUNTIME_HOST_CPU_CAPACITY,
            "memory_capacity_mb": settings.RUNTIME_HOST_MEMORY_CAPACITY_MB,
        },
    )
    if not created:
        Host.objects.filter(pk=host.pk).update(
            libvirt_uri=settings.RUNTIME_LIBVIRT_URI, data_dir=str(settings.RUNTIME_HOST_DATA_DIR),
            state=HostState.UP, last_seen_at=timezone.now())
        host.refresh_from_db()
    return host

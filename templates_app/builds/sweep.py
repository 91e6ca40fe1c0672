"""What the sweeps do for template builds: fail builds whose worker died, remove their VMs."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from sandboxes.runtime import driver_for
from templates_app.builds.log import BuildLog
from templates_app.builds.worker import build_vm_names, fail, queue_next_draft
from templates_app.models import TemplateVersion, VersionStatus


def builds_sweep(*, now: datetime | None = None) -> dict[str, int]:
    """Fail builds whose worker stopped renewing the lease, and queue drafts nobody picked up."""
    now = now or timezone.now()
    failed = 0
    for version in TemplateVersion.objects.filter(
        status=VersionStatus.BUILDING, lease_expires_at__lt=now
    ).select_related("host"):
        if fail(version.pk, "the build worker stopped (lease expired); start the build again"):
            failed += 1
            log = BuildLog(version)
            log.add("build worker lost: the build is failed", "error")
            log.flush()
            _destroy_build_vms(version)
    stale = now - timedelta(seconds=settings.TEMPLATE_BUILD_LEASE_SECONDS)
    queued = 0
    for template_id in (
        TemplateVersion.objects.filter(
            status=VersionStatus.DRAFT, created_at__lt=stale, deleted_at__isnull=True
        )
        .values_list("template_id", flat=True)
        .distinct()
    ):
        queue_next_draft(template_id)
        queued += 1
    return {"failed": failed, "queued": queued}


def _destroy_build_vms(version: TemplateVersion) -> None:
    from sandboxes.services import host_register_local

    driver = driver_for(version.host or host_register_local())
    for name in build_vm_names(version.pk):
        driver.destroy(name)  # idempotent: a VM that is not there is nothing to do

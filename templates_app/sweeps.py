"""What the templates app does in the platform's sweeps (registered in its AppConfig.ready).

- the `builds` sweep: builds whose worker died (lease expired) are failed and their VMs
  removed; drafts nobody picked up are queued (``builds.sweep``);
- reconciliation keeps the VMs of builds and of shape snapshot makes that are still running;
- retention removes unused build layers and the files of deleted template versions (their
  shape snapshots too: they live in the version's artifact directory).
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import ProtectedError

from sandboxes.hostcalls import host_step
from sandboxes.models import Checkpoint, Host, HostState, PooledVm, Sandbox
from sandboxes.sweeps import old_enough_to_purge
from templates_app import shapes
from templates_app.builds import builds_sweep
from templates_app.layers import drop_built_on, drop_missing, layers_dir
from templates_app.models import BuildLayer, HostArtifact, TemplateVersion, VersionStatus
from watasu import sweeps as registry


def register() -> None:
    registry.register_sweep("builds", builds)
    registry.register_domain_owner(running_build_vms)
    registry.register_domain_owner(shapes.making_vms)
    registry.register_retention(retention)


def builds(*, now: datetime | None = None) -> registry.Result:
    """Fail template builds whose worker died (lease expired); queue forgotten drafts."""
    return {**builds_sweep(now=now), "more": False}


def _build_pk(name: str) -> int | None:
    """The version id in a name of `templates_app.builds.build_vm_names`."""
    match = re.fullmatch(r"build-(\d+)(-final)?", name.removeprefix(settings.RUNTIME_VM_PREFIX))
    return int(match.group(1)) if match else None


def running_build_vms(names: list[str]) -> set[str]:
    """Of these VM names, those of builds still running."""
    pks = {name: _build_pk(name) for name in names}
    building = set(
        TemplateVersion.objects.filter(
            pk__in=[pk for pk in pks.values() if pk], status=VersionStatus.BUILDING
        ).values_list("pk", flat=True)
    )
    return {name for name, pk in pks.items() if pk in building}


def retention(now: datetime) -> registry.Result:
    """Unused build layers and files of deleted template versions, on every host that answers
    (each host's part on that host)."""
    totals = {"orphan_layers": 0, "evicted_layers": 0, "template_versions": 0, "pulled_copies": 0}
    for host in Host.objects.filter(state__in=[HostState.UP, HostState.DRAINING]):
        for key, count in (retention_on(host, now) or {}).items():  # None: queued to its worker
            totals[key] += count
    return dict(totals)


@host_step(wait=False, expires=int(settings.SWEEP_INTERVAL_SECONDS["retention"]))
def retention_on(host: Host, now: datetime) -> dict[str, int]:
    """One host's part of the templates' retention (on the host)."""
    orphan_layers, evicted_layers = _build_cache(host, now)
    return {
        "orphan_layers": orphan_layers,
        "evicted_layers": evicted_layers,
        "template_versions": _deleted_versions(host),
        "pulled_copies": _pulled_copies(host),
    }


def _pulled_copies(host: Host) -> int:
    """Copies this host pulled of deleted template versions nothing here uses any more."""
    removed = 0
    gone = HostArtifact.objects.filter(host=host, version__deleted_at__isnull=False).select_related("version")
    for copy in gone:
        in_use = (
            Sandbox.objects.filter(host=host, template_version=copy.version, purged_at__isnull=True).exists()
            or Checkpoint.objects.filter(host=host, template_version=copy.version).exists()
            or PooledVm.objects.filter(host=host, template_version=copy.version).exists()
        )
        if copy.path == copy.version.artifact_dir or in_use:
            continue  # the build's own files (_deleted_versions), or disks overlaid on it here
        shared = HostArtifact.objects.filter(host=host, path=copy.path, version__deleted_at__isnull=True)
        if not shared.exists() and Path(copy.path).parent == Path(host.data_dir) / "artifacts":
            shutil.rmtree(copy.path, ignore_errors=True)
        copy.delete()
        removed += 1
    return removed


def _build_cache(host: Host, now: datetime) -> tuple[int, int]:
    """Layers whose file is gone, unregistered layer files (a build that died), unused leaves."""
    directory = layers_dir(host)
    broken = drop_missing(host)
    registered = set(BuildLayer.objects.filter(host=host).values_list("path", flat=True))
    building = TemplateVersion.objects.filter(status=VersionStatus.BUILDING).exists()
    orphans = 0
    if not building:  # a running build's newest layer is not registered yet
        for path in directory.iterdir():
            if str(path) not in registered and old_enough_to_purge(path, now.timestamp()):
                path.unlink(missing_ok=True)
                orphans += 1
    cutoff = now - timedelta(seconds=settings.BUILD_LAYER_RETENTION_SECONDS)
    evicted = 0
    leaves = BuildLayer.objects.filter(host=host, last_used_at__lt=cutoff, children__isnull=True)
    for layer in leaves[: settings.SWEEP_BATCH_SIZE]:
        try:
            layer.delete()  # PROTECT: a layer something still builds on cannot go
        except ProtectedError:
            continue
        Path(layer.path).unlink(missing_ok=True)
        evicted += 1
    return orphans, evicted + broken


def _deleted_versions(host: Host) -> int:
    """Files of deleted template versions (and of deleted templates' versions) nothing (no
    sandbox, no checkpoint) references any more; the build layers on such a version go
    first, as no build can start from it again (unless a build runs now: its newest layer
    may build on it)."""
    templates_root = (Path(host.data_dir) / "templates").resolve()
    removed = 0
    building = TemplateVersion.objects.filter(status=VersionStatus.BUILDING).exists()
    deleted = TemplateVersion.objects.filter(host=host, deleted_at__isnull=False).exclude(artifact_dir="")
    for version in deleted:
        if Sandbox.objects.filter(template_version=version, purged_at__isnull=True).exists():
            continue  # stopped sandboxes run on its disk
        if Checkpoint.objects.filter(template_version=version).exists():
            continue  # checkpoints are layers on its disk
        if not building:
            drop_built_on(version)
        if version.child_layers.exists():
            continue  # cached layers build on it
        home = Path(version.artifact_dir).resolve().parent
        if home.parent.parent == templates_root and home.name.startswith(version.version):
            shutil.rmtree(home, ignore_errors=True)
        TemplateVersion.objects.filter(pk=version.pk).update(artifact_dir="", size_bytes=0)
        removed += 1
    return removed

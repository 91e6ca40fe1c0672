"""Template artifacts on many hosts: publish a version's files to the artifact store on the
host that built it, pull them on any other host that starts it.

A version's artifact is its snapshot directory (``snapshot.json``, ``memory.save``,
``disk.qcow2``) plus what those point at by absolute path: the qcow2 backing chain of the
disk (build layers, the base image in the image cache), the kernel and the initrd. A push
takes all of it, under host-independent names; a pull puts it in
``<host data dir>/artifacts/<digest>/`` with every path made local again. The store is
content addressed (``sandboxes/runtime/artifact_store.py``), so versions sharing a base
image share its chunks.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from functools import cache
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from sandboxes.models import Host
from sandboxes.runtime import artifact_store, lifecycle, saveimage
from sandboxes.runtime.artifact_store import ArtifactError, Store
from sandboxes.runtime.driver import MemorySnapshot
from templates_app.models import HostArtifact, TemplateVersion, VersionStatus

logger = logging.getLogger(__name__)

SAVE, DISK, KERNEL, INITRD = "memory.save", "disk.qcow2", "vmlinuz", "initrd.img"
QEMU_IMG_TIMEOUT = 60


@cache
def _store(url: str, endpoint: str, region: str, access_key: str, secret_key: str) -> Store:
    return artifact_store.store_from_url(
        url, endpoint_url=endpoint, region=region, access_key=access_key, secret_key=secret_key
    )


def store() -> Store:
    """The configured artifact store (one client per process)."""
    return _store(
        settings.ARTIFACT_STORE,
        settings.ARTIFACT_S3_ENDPOINT,
        settings.ARTIFACT_S3_REGION,
        settings.ARTIFACT_S3_ACCESS_KEY,
        settings.ARTIFACT_S3_SECRET_KEY,
    )


def backing_chain(disk: Path) -> list[Path]:
    """``disk`` and every file below it in its qcow2 backing chain, top first."""
    out = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", str(disk)],
        check=True,
        capture_output=True,
        text=True,
        timeout=QEMU_IMG_TIMEOUT,
    ).stdout
    return [Path(image["filename"]) for image in json.loads(out)]


def _portable(snapshot: MemorySnapshot) -> MemorySnapshot:
    """The snapshot with its paths as names within the artifact (the same on every host)."""
    return replace(
        snapshot, save_path=Path(SAVE), disk_path=Path(DISK), kernel=Path(KERNEL), initrd=Path(INITRD)
    )


def push(snapshot_dir: Path, to: Store) -> str:
    """Push the artifact in ``snapshot_dir`` with everything it refers to; its digest."""
    snapshot = lifecycle.load_template_snapshot(snapshot_dir)
    chain = backing_chain(snapshot.disk_path)
    names = [DISK] + [f"backing-{depth}.qcow2" for depth in range(1, len(chain))]
    files = {SAVE: snapshot.save_path, KERNEL: snapshot.kernel, INITRD: snapshot.initrd}
    files.update(zip(names, chain, strict=True))
    backing = dict(itertools.pairwise(names))
    with tempfile.TemporaryDirectory() as tmp:
        files[lifecycle.SNAPSHOT_FILE] = Path(tmp) / lifecycle.SNAPSHOT_FILE
        _portable(snapshot).write(files[lifecycle.SNAPSHOT_FILE])
        return artifact_store.push_tree(to, files, backing)


def publish(version: TemplateVersion) -> str:
    """Push a ready version's artifact from its owner host (this process's) to the store,
    remember the digest on the version and the owner as holding it; the digest."""
    assert version.host is not None and version.artifact_dir, f"version {version.pk} has no artifact"
    digest = push(Path(version.artifact_dir), store())
    TemplateVersion.objects.filter(pk=version.pk).update(store_digest=digest)
    version.store_digest = digest
    _record(version.host, version, Path(version.artifact_dir), version.size_bytes)
    logger.info("template version %s published to the artifact store as %s", version.pk, digest)
    return digest


def publish_or_log(version: TemplateVersion) -> str:
    """``publish``, for the moments a version becomes ready: a failure keeps the (local)
    version ready with an empty digest and is logged loudly; other hosts then cannot start
    it, and ``local_dir`` there says why."""
    try:
        return publish(version)
    except Exception:
        logger.exception("template version %s: publishing to the artifact store failed", version.pk)
        return ""


def local_dir(version: TemplateVersion, host: Host) -> Path:
    """The version's artifact directory on ``host`` (called in that host's own process):
    the owner's own directory, or a copy pulled from the store (when missing) into
    ``<host data dir>/artifacts/<digest>/`` with every path in it local."""
    if version.host_id == host.pk:
        return Path(version.artifact_dir)
    if not version.store_digest:
        raise ArtifactError(
            f"template version {version.pk} is not in the artifact store (its publish on its "
            f"host {version.host_id} failed or has not run: see that host's log), so host "
            f"{host.name} cannot start it"
        )
    dest = Path(host.data_dir) / "artifacts" / version.store_digest
    if not dest.is_dir():
        artifact_store.pull_tree(store(), version.store_digest, dest, prepare=_localise)
        _record(host, version, dest, _dir_size(dest))
    elif not HostArtifact.objects.filter(host=host, version=version).exists():
        _record(host, version, dest, _dir_size(dest))  # pulled for another version of equal files
    return dest


def publish_missing(host: Host) -> int:
    """Publish every ready version this host owns that the store lacks (built before the
    store existed, or whose publish failed); how many were published. For a host's start-up
    or a periodic task on the host."""
    versions = TemplateVersion.objects.filter(
        host=host, status=VersionStatus.READY, deleted_at__isnull=True, store_digest=""
    ).select_related("host")
    return sum(1 for version in versions if publish_or_log(version))


def portable(version: TemplateVersion) -> bool:
    """Whether any host can start the version (its artifact is in the store)."""
    return bool(version.store_digest)


def hosts_with(version: TemplateVersion) -> set[int]:
    """Ids of the hosts holding the version's artifact (no transfer before a start there)."""
    held = set(HostArtifact.objects.filter(version=version).values_list("host_id", flat=True))
    return held | ({version.host_id} if version.host_id is not None else set())


def _record(host: Host, version: TemplateVersion, path: Path, size: int) -> None:
    HostArtifact.objects.update_or_create(
        host=host,
        version=version,
        defaults={"path": str(path), "size_bytes": size, "pulled_at": timezone.now()},
    )


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _localise(partial: Path, dest: Path) -> None:
    """Before a pulled artifact is renamed into place: its snapshot.json and the domain XML
    in its memory image name this host's files (under ``dest``)."""
    portable = lifecycle.load_template_snapshot(partial)
    local = replace(
        portable,
        save_path=dest / SAVE,
        disk_path=dest / DISK,
        kernel=dest / KERNEL,
        initrd=dest / INITRD,
    )
    local.write(partial / lifecycle.SNAPSHOT_FILE)
    relocate_save_image(partial / SAVE, kernel=local.kernel, initrd=local.initrd, disk=local.disk_path)


def relocate_save_image(path: Path, *, kernel: Path, initrd: Path, disk: Path) -> None:
    """Rewrite the domain XML inside a libvirt save image to name these files.

    A clone's restore rewrites the disk (its own overlay) but keeps the kernel and initrd
    the XML names, and QEMU opens them even when restoring: on another host they must be
    that host's. The XML is rewritten in place; the migration stream after it is untouched.
    """
    header, xml, cookie = saveimage.read_xml(path)
    ET.register_namespace("qemu", saveimage.QEMU_NS)  # written back as qemu:, as libvirt wrote it
    root = ET.fromstring(xml)
    for tag, value in (("os/kernel", kernel), ("os/initrd", initrd)):
        element = root.find(tag)
        if element is None:
            raise ArtifactError(f"{path}: the saved domain has no <{tag}>")
        element.text = str(value)
    disks = [d for d in root.iter("disk") if d.get("device", "disk") == "disk"]
    source = disks[0].find("source") if disks else None
    if source is None:
        raise ArtifactError(f"{path}: the saved domain has no disk")
    source.set("file", str(disk))
    area, cookie_offset = saveimage.build_data_area(header, ET.tostring(root, "unicode"), cookie)
    mode = path.stat().st_mode & 0o777
    path.chmod(0o600)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, saveimage.pack_header(header, cookie_offset) + area, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.chmod(mode)

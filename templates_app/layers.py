"""The build cache: one qcow2 layer per build step, keyed by its parent and the step.

A step's key hashes the key before it with the step's command and the build's
environment, starting from the parent version's artifact. A layer is a qcow2 file
whose backing file is its parent layer's (the first one's is the parent version's
disk), so a cached prefix of steps is a ready-made disk: a rebuild boots it and runs
only the steps after it. A layer is registered (`BuildLayer`) only once its step
succeeded and the file stopped changing, and only when its parent is the registered
layer of the previous key: a layer built on another build's files is never reachable
from the cache.

Whole builds are cached too: a version's `cache_key` hashes every input of its artifact
(last layer, start and ready commands, shape, the agent's hash and the artifact format),
so an unchanged template reuses the artifact of an earlier version through hard links,
without any VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from sandboxes.models import Host
from sandboxes.runtime import images, lifecycle
from templates_app.models import BuildLayer, TemplateVersion, VersionStatus

BASE_DISK, SNAPSHOT_DIR = "base.qcow2", "snapshot"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def base_key(parent: TemplateVersion, team_id: int | None, *, agent: bytes | None = None) -> str:
    """Root of a build's keys: the version built on, and the team building. The cache is
    per team: no layer, artifact, memory snapshot or build log is ever reused by another
    team, however identical its steps (a layer holds what the steps wrote, secrets too).
    The agent's hash and the artifact format are in it too: a build with another agent
    shares no layer, artifact or memory snapshot with one made by an older one (``agent``:
    the agent's zipapp, by default this checkout's)."""
    return _digest("version", parent.pk, parent.artifact_dir, "team", team_id, images.snapshot_inputs(agent))


def step_keys(
    parent: TemplateVersion,
    commands: list[str],
    env: dict[str, str],
    internet: bool,
    team_id: int | None,
    *,
    env_free: int = 0,
    agent: bytes | None = None,
) -> list[str]:
    """Key of each step's layer: parent key + command (+ the env and network it ran with).
    The first ``env_free`` steps (the image's) run without the env, so it is not in their
    keys: changing an ENV rebuilds only what runs with it."""
    keys, key = [], base_key(parent, team_id, agent=agent)
    for index, command in enumerate(commands):
        key = _digest("step", key, command, {} if index < env_free else env, internet)
        keys.append(key)
    return keys


def artifact_key(
    last_key: str,
    spec: dict[str, Any],
    env: dict[str, str],
    cpu: int,
    memory_mb: int,
    *,
    agent: bytes | None = None,
) -> str:
    """Key of a version's artifact (disk and memory snapshot): its last layer, what runs in
    the saved memory, the shape, and the snapshot inputs (agent hash, artifact format)."""
    return _digest(
        "artifact",
        last_key,
        spec.get("start_cmd") or "",
        spec.get("ready_cmd") or "",
        env,
        cpu,
        memory_mb,
        images.snapshot_inputs(agent),
    )


def layers_dir(host: Host) -> Path:
    path = Path(host.data_dir) / "layers"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)  # QEMU (unprivileged) reads the chain
    return path


def cached_prefix(host: Host, keys: list[str]) -> list[BuildLayer]:
    """The longest chain of registered layers (files present) matching ``keys`` from the start."""
    found = {layer.key: layer for layer in BuildLayer.objects.filter(host=host, key__in=keys)}
    chain: list[BuildLayer] = []
    for key in keys:
        layer = found.get(key)
        if layer is None or not Path(layer.path).is_file():
            break
        expected_parent = chain[-1].pk if chain else None
        if layer.parent_id != expected_parent:
            break
        chain.append(layer)
    if chain:
        BuildLayer.objects.filter(pk__in=[layer.pk for layer in chain]).update(last_used_at=timezone.now())
    return chain


def register(
    *, host: Host, key: str, parent: BuildLayer | None, base_version: TemplateVersion, step: str, path: Path
) -> BuildLayer | None:
    """Record a finished layer; None if another build registered this key first."""
    try:
        with transaction.atomic():
            return BuildLayer.objects.create(
                host=host,
                key=key,
                parent=parent,
                base_version=base_version,
                step=step[:100],
                path=str(path),
                size_bytes=path.stat().st_blocks * 512,
            )
    except IntegrityError:
        return None


def is_registered(path: Path) -> bool:
    return BuildLayer.objects.filter(path=str(path)).exists()


def cached_artifact(host: Host, key: str) -> TemplateVersion | None:
    """A ready version on this host built from exactly these inputs, files present."""
    for version in TemplateVersion.objects.filter(
        host=host, cache_key=key, status=VersionStatus.READY, deleted_at__isnull=True
    ).order_by("-pk"):
        if Path(version.artifact_dir, "snapshot.json").is_file():
            return version
    return None


def link_artifact(snapshot_dir: Path, home: Path) -> Path:
    """Give a version its own copy of another version's artifact, sharing the big
    immutable files (flattened disk, memory image) through hard links; the small
    snapshot overlay is copied and pointed at this version's disk. Deleting either
    version never touches the other's files. Returns the new snapshot directory."""
    source = lifecycle.load_template_snapshot(snapshot_dir)
    disk = home / BASE_DISK
    os.link(snapshot_dir.parent / BASE_DISK, disk)
    dest = home / SNAPSHOT_DIR
    tmp = home / (SNAPSHOT_DIR + ".tmp")
    tmp.mkdir()
    os.link(source.save_path, tmp / source.save_path.name)
    overlay = tmp / source.disk_path.name
    shutil.copyfile(source.disk_path, overlay)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(overlay)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    overlay.chmod(0o444)
    replace(source, save_path=dest / source.save_path.name, disk_path=dest / source.disk_path.name).write(
        tmp / lifecycle.SNAPSHOT_FILE
    )
    os.replace(tmp, dest)
    return dest


def drop_missing(host: Host) -> int:
    """Forget layers whose file is gone (deleted by hand, lost disk) and every layer built on
    them, leaves first, deleting those descendants' files: a key must never point at a
    chain that cannot be opened, or it could not be rebuilt either."""
    doomed = {layer.pk for layer in BuildLayer.objects.filter(host=host) if not Path(layer.path).is_file()}
    frontier = set(doomed)
    while frontier:
        frontier = set(BuildLayer.objects.filter(parent__in=frontier).values_list("pk", flat=True)) - doomed
        doomed |= frontier
    dropped = 0
    while doomed:
        leaves = list(BuildLayer.objects.filter(pk__in=doomed).exclude(children__in=doomed))
        if not leaves:
            break
        for layer in leaves:
            Path(layer.path).unlink(missing_ok=True)
        BuildLayer.objects.filter(pk__in=[layer.pk for layer in leaves]).delete()
        doomed -= {layer.pk for layer in leaves}
        dropped += len(leaves)
    return dropped


def drop_built_on(version: TemplateVersion) -> int:
    """Forget every layer built on a deleted version, leaves first, deleting their files:
    no build can start from a deleted version, so nothing can reach them again."""
    dropped = 0
    while leaves := list(version.child_layers.filter(children__isnull=True)):
        for layer in leaves:
            Path(layer.path).unlink(missing_ok=True)
        BuildLayer.objects.filter(pk__in=[layer.pk for layer in leaves]).delete()
        dropped += len(leaves)
    return dropped

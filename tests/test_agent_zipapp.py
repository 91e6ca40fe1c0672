"""The guest agent as the image ships it: one zipapp with stable bytes, whose hash is part
of every cache key, so an artifact holding another agent is rebuilt, never reused.

No VM: the zipapp is built as the image build builds it, and run on the host.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sandboxes.runtime import images
from sandboxes.runtime.guest.agent.routes import router
from sandboxes.runtime.guest.build import FIXED_TIME, PACKAGE, agent_digest, agent_zipapp, build_zipapp
from templates_app import layers
from templates_app.models import TemplateVersion
from tests.edge_support import agent_zipapp as written_zipapp

MIRROR = "http://deb.debian.org/debian"


def _changed_copy(tmp_path: Path) -> Path:
    """A copy of the agent package with one comment added: a different agent."""
    copy = tmp_path / "agent"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    core = copy / "core.py"
    core.write_text(core.read_text() + "# another agent\n")
    return copy


def test_the_zipapp_is_byte_for_byte_reproducible() -> None:
    # when the agent is packed twice
    first, second = build_zipapp(PACKAGE), build_zipapp(PACKAGE)

    # then the bytes (and so the hash) are the same, and the image build uses exactly them
    assert first == second == agent_zipapp()
    assert images.cache_key(MIRROR) == images.cache_key(MIRROR, agent=first)
    # and the archive is sorted, timeless, one file per module, with its own entry point
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        assert names[0] == "__main__.py"
        assert names[1:] == sorted(names[1:])
        assert {Path(n).name for n in names[1:]} == {p.name for p in PACKAGE.glob("*.py")}
        assert {i.date_time for i in archive.infolist()} == {FIXED_TIME}
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    assert first.startswith(b"#!/usr/bin/python3\n")


def test_the_zipapp_runs_with_the_standard_library_only() -> None:
    # when the zipapp's modules are imported by an interpreter without site-packages
    # (-S -I: no site, no environment, no current directory: the guest has nothing else)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent.server, agent.routes; "
        "print(agent.__file__); print(len(agent.routes.router.routes))"
    )
    written = written_zipapp()
    result = subprocess.run(
        [sys.executable, "-S", "-I", "-c", probe, str(written)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # then it loads from the archive itself, and every route registers
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [f"{written}/agent/__init__.py", str(len(router.routes))]


def test_a_changed_agent_changes_every_cache_key(tmp_path) -> None:
    # given this agent and another one (one comment apart)
    ours, other = agent_zipapp(), build_zipapp(_changed_copy(tmp_path))
    parent = TemplateVersion(pk=7, artifact_dir="/var/lib/watasu/templates/base/v1")
    spec = {"start_cmd": "python3 -m http.server", "ready_cmd": "true"}

    # then the hashes differ, and with them the base image key, the base template's
    # snapshot key, every step layer key and the artifact (memory snapshot) key
    assert agent_digest(other) != agent_digest(ours) == agent_digest()
    assert images.cache_key(MIRROR, agent=other) != images.cache_key(MIRROR)
    image = images.BaseImage(
        key="k", directory=tmp_path, kernel=tmp_path, initrd=tmp_path, disk=tmp_path, kernel_version="6.1"
    )
    assert images.base_snapshot_key(image, agent=other) != images.base_snapshot_key(image)
    assert layers.base_key(parent, 3, agent=other) != layers.base_key(parent, 3)
    steps = ["apt-get install -y curl", "pip install flask"]
    ours_steps = layers.step_keys(parent, steps, {}, True, 3)
    other_steps = layers.step_keys(parent, steps, {}, True, 3, agent=other)
    assert len(set(ours_steps) | set(other_steps)) == 4
    assert layers.artifact_key(ours_steps[-1], spec, {}, 1, 512, agent=other) != layers.artifact_key(
        ours_steps[-1], spec, {}, 1, 512
    )
    # and the artifact format is in every snapshot key beside the agent's hash
    assert images.snapshot_inputs() == {"snapshot_format": images.SNAPSHOT_FORMAT, "agent": agent_digest()}

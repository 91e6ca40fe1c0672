"""Template artifacts on a second host: published from the owner to the artifact store,
pulled into the other host's data directory with every path made local. Small fake
artifacts (qcow2 files from qemu-img, a minimal libvirt save image), no VM."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from sandboxes.models import Host
from sandboxes.runtime import lifecycle, saveimage
from sandboxes.runtime.artifact_store import ArtifactError
from sandboxes.runtime.driver import MemorySnapshot
from templates_app import artifacts
from templates_app.models import HostArtifact, Template, TemplateVersion, VersionStatus
from tests.factories import HostFactory

STREAM = os.urandom(200_000)  # stands in for QEMU's migration stream


def domain_xml(kernel: Path, initrd: Path, disk: Path) -> str:
    return (
        f"<domain type='qemu'><name>watasu-tpl-1</name><uuid>0f1e</uuid>"
        f"<os><type>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd></os>"
        f"<devices><disk type='file' device='disk'><source file='{disk}'/></disk></devices></domain>"
    )


def write_save_image(path: Path, xml: str) -> None:
    header = saveimage.SaveHeader(2, 4096, 1, 0, 3072, reserved=(0,) * 14)
    area, cookie_offset = saveimage.build_data_area(header, xml, "<qemu-migration/>")
    path.write_bytes(saveimage.pack_header(header, cookie_offset) + area + STREAM)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def fake_artifact(root: Path) -> Path:
    """An image cache entry (kernel, initrd, base disk) and a snapshot directory on it."""
    cache, snap = root / "images" / "0123abcd", root / "templates" / "base" / "v1-aa"
    cache.mkdir(parents=True)
    snap.mkdir(parents=True)
    (cache / "vmlinuz").write_bytes(b"kernel" * 1000)
    (cache / "initrd.img").write_bytes(b"initrd" * 1000)
    qemu_img("create", "-q", "-f", "qcow2", str(cache / "rootfs.qcow2"), "8M")
    disk = snap / lifecycle.DISK_FILE
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(cache / "rootfs.qcow2"), "-F", "qcow2", str(disk))
    save = snap / lifecycle.SAVE_FILE
    write_save_image(save, domain_xml(cache / "vmlinuz", cache / "initrd.img", disk))
    MemorySnapshot(
        save_path=save,
        disk_path=disk,
        agent_secret="template-secret",
        vcpus=1,
        memory_mb=512,
        kernel=cache / "vmlinuz",
        initrd=cache / "initrd.img",
        cmdline="console=ttyS0",
    ).write(snap / lifecycle.SNAPSHOT_FILE)
    return snap


@pytest.fixture
def store_dir(settings: Any, tmp_path: Path) -> Path:
    settings.ARTIFACT_STORE = (tmp_path / "store").as_uri()
    return tmp_path / "store"


@pytest.fixture
def hosts(db: None, tmp_path: Path) -> tuple[Host, Host]:
    return (
        HostFactory(name="host-a", data_dir=str(tmp_path / "a")),
        HostFactory(name="host-b", data_dir=str(tmp_path / "b")),
    )


@pytest.fixture
def version(hosts: tuple[Host, Host], tmp_path: Path) -> TemplateVersion:
    owner = hosts[0]
    template = Template.objects.create(slug="base", name="Base")
    return TemplateVersion.objects.create(
        template=template,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=owner,
        artifact_dir=str(fake_artifact(Path(owner.data_dir))),
        size_bytes=1234,
    )


def test_second_host_pulls_and_every_path_is_its_own(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    owner, other = hosts
    # given the version published from its owner
    digest = artifacts.publish(version)
    # when the other host asks for its artifact directory
    local = artifacts.local_dir(version, other)
    # then it was pulled under that host's data dir, and snapshot.json names only files there
    assert local == Path(other.data_dir) / "artifacts" / digest
    snapshot = lifecycle.load_template_snapshot(local)
    assert (snapshot.save_path, snapshot.disk_path, snapshot.kernel, snapshot.initrd) == (
        local / "memory.save",
        local / "disk.qcow2",
        local / "vmlinuz",
        local / "initrd.img",
    )
    assert (snapshot.agent_secret, snapshot.vcpus, snapshot.memory_mb) == ("template-secret", 1, 512)
    # the disk's backing chain is the pulled copy of the base image
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(snapshot.disk_path)))
    assert [Path(image["filename"]) for image in chain] == [local / "disk.qcow2", local / "backing-1.qcow2"]
    # the memory image's domain XML names this host's kernel, initrd and disk; its stream is intact
    _, xml, cookie = saveimage.read_xml(snapshot.save_path)
    domain = ElementTree.fromstring(xml)
    assert [domain.findtext("os/kernel"), domain.findtext("os/initrd")] == [
        str(local / "vmlinuz"),
        str(local / "initrd.img"),
    ]
    assert domain.find("devices/disk/source").get("file") == str(local / "disk.qcow2")  # type: ignore[union-attr]
    assert domain.findtext("name") == "watasu-tpl-1"
    assert cookie == "<qemu-migration/>"
    assert snapshot.save_path.read_bytes()[-len(STREAM) :] == STREAM
    assert (snapshot.kernel.read_bytes(), snapshot.initrd.read_bytes()) == (
        b"kernel" * 1000,
        b"initrd" * 1000,
    )
    # and both hosts are recorded as holding it
    version.refresh_from_db()
    assert version.store_digest == digest
    assert artifacts.hosts_with(version) == {owner.pk, other.pk}
    assert HostArtifact.objects.get(host=other, version=version).path == str(local)


def test_owner_host_gets_its_own_directory(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    # given a published version; when its owner asks; then it gets the build's own directory
    artifacts.publish(version)
    assert artifacts.local_dir(version, hosts[0]) == Path(version.artifact_dir)
    assert not (Path(hosts[0].data_dir) / "artifacts").exists()


def test_second_call_pulls_nothing(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    # given a version already pulled on the other host
    artifacts.publish(version)
    first = artifacts.local_dir(version, hosts[1])
    # when the store loses its objects and the host asks again
    for path in sorted(store_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    # then the local copy answers
    assert artifacts.local_dir(version, hosts[1]) == first


def test_publish_twice_gives_the_same_digest(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    assert artifacts.publish(version) == artifacts.publish(version)


def test_unpublished_version_is_a_clear_error_elsewhere(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    # given a version whose publish never happened; when another host asks for it
    with pytest.raises(ArtifactError) as failure:
        artifacts.local_dir(version, hosts[1])
    # then the error says why, and nothing was recorded
    assert "is not in the artifact store" in str(failure.value)
    assert "host-b cannot start it" in str(failure.value)
    assert artifacts.hosts_with(version) == {hosts[0].pk}


def test_failed_publish_is_logged_and_keeps_the_version(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion, caplog: pytest.LogCaptureFixture
) -> None:
    # given a version whose disk went missing
    Path(version.artifact_dir, "disk.qcow2").unlink()
    # when it is published at the moment it becomes ready
    digest = artifacts.publish_or_log(version)
    # then the failure is logged and the version is still ready, without a digest
    assert digest == ""
    assert "publishing to the artifact store failed" in caplog.text
    version.refresh_from_db()
    assert (version.status, version.store_digest) == (VersionStatus.READY, "")


def test_publish_missing_publishes_the_hosts_unpublished_versions(
    store_dir: Path, hosts: tuple[Host, Host], version: TemplateVersion
) -> None:
    assert artifacts.publish_missing(hosts[1]) == 0
    assert artifacts.publish_missing(hosts[0]) == 1
    version.refresh_from_db()
    assert len(version.store_digest) == 64
    assert artifacts.publish_missing(hosts[0]) == 0

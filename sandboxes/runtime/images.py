"""Base image pipeline: Debian cloud kernel + busybox initramfs + mmdebstrap rootfs (qcow2).

Nothing here mounts anything on the host: the kernel is unpacked with ``dpkg -x``, the
initramfs is a cpio written in Python, the root filesystem is built with
``mkfs.ext4 -d`` from a directory. Outputs are cached under ``cache_dir/<key>`` where the
key hashes every input we control (script version, the agent zipapp, init scripts, package
list, suite, mirror); a build happens in a temp dir and is renamed into place atomically,
so a crashed build never leaves a half image that looks valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .guest.build import agent_digest, agent_zipapp, write_agent_zipapp

# Bumped whenever the image or the domain definition its template snapshots carry
# changes (4: guests without IPv6), so cached snapshots are rebuilt, never restored.
IMAGE_SCRIPT_VERSION = "4"
# The layout of a template artifact (disk.qcow2, memory.save, snapshot.json) and of what
# its saved memory holds. Bumped when either changes; with the agent's hash it is part of
# every memory snapshot's key, so a snapshot of another format or agent is rebuilt, never
# restored. 2: domains carry a virtio-scsi controller (volumes are hot-plugged into it).
SNAPSHOT_FORMAT = "2"
DEFAULT_CACHE_DIR = Path("/var/cache/watasu/images")
SUITE = "bookworm"
ROOTFS_PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "iproute2", "git", "procps", "ca-certificates")
ROOTFS_SIZE = "4G"
GUEST_AGENT_PATH = "/opt/watasu/agent.pyz"  # the agent package as one zipapp (guest/build.py)
GUEST_INIT_PATH = "/sbin/watasu-init"
# Loaded in dependency order (computed from each module's own ``depends=`` list).
# virtio_scsi and sd_mod: volumes are hot-plugged as SCSI disks (sandboxes/runtime/volumes.py).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_scsi", "sd_mod")
STEP_TIMEOUT = 600.0
HOST_EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")

# PID 1 inside the guest. No init system: mount the API filesystems, configure the
# QEMU user-mode network statically (no DHCP round trip) and keep the agent running.
# dash as PID 1 reaps orphans while it waits for the agent.
GUEST_INIT = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
while true; do
    /usr/bin/python3 -S -u %(agent)s >/dev/console 2>&1
    sleep 0.2
done
""" % {"agent": GUEST_AGENT_PATH}  # noqa: UP031 (a shell script full of braces)

# The initramfs's /init: load virtio drivers, mount the root disk, hand over.
INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko; done
root=/dev/vda
init=%(init)s
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; watasu.init=*) init="${arg#watasu.init=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 -o rw,noatime "$root" /newroot || { echo "cannot mount $root"; exec sh; }
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$init"
""" % {"init": GUEST_INIT_PATH}  # noqa: UP031 (a shell script full of braces)


@dataclass(frozen=True)
class BaseImage:
    """A built, verified base image: boot it with ``kernel`` + ``initrd`` on ``disk``."""

    key: str
    directory: Path
    kernel: Path
    initrd: Path
    disk: Path
    kernel_version: str

    @property
    def default_cmdline(self) -> str:
        """Kernel arguments that boot fastest under TCG (quiet console, no legacy probing)."""
        return (
            "console=ttyS0 root=/dev/vda rw quiet loglevel=1 panic=-1 "
            "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on "
            "nomodeset tsc=reliable"
        )


# --------------------------------------------------------------------------- cache


def build_base_image(cache_dir: Path | str = DEFAULT_CACHE_DIR, mirror: str | None = None) -> BaseImage:
    """Return the cached base image for the current inputs, building it if missing/corrupt."""
    cache_dir = Path(cache_dir)
    mirror = mirror or configured_mirror()
    key = cache_key(mirror)
    final = cache_dir / key
    image = load_cached(final, key)
    if image is not None:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(0o755)
    # Two processes (`make run` beside `make test`, two workers) may miss the cache at once:
    # one builds while the other waits, then finds the image instead of building over it.
    with exclusive(cache_dir / f".{key}.lock"):
        image = load_cached(final, key)
        if image is not None:
            return image
        if final.exists():
            shutil.rmtree(final)  # corrupt or partial: rebuild from scratch
        return _build(cache_dir, final, mirror, key)


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (blocking) for the block's duration."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(cache_dir: Path, final: Path, mirror: str, key: str) -> BaseImage:
    """Build the image for `key` beside `final` and move it into place whole."""
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
    try:
        build_into(work, mirror, key)
        # QEMU runs unprivileged: the image must be readable, never writable, by it.
        make_world_readable(work / "out")
        os.replace(work / "out", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = load_cached(final, key)
    if image is None:
        raise RuntimeError(f"freshly built image in {final} failed verification")
    return image


def make_world_readable(directory: Path) -> None:
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def cache_key(mirror: str, agent: bytes | None = None) -> str:
    """Hash of every input that changes the image's bytes (``agent``: the zipapp it holds,
    by default the agent of this checkout)."""
    h = hashlib.sha256()
    for part in (
        IMAGE_SCRIPT_VERSION,
        SUITE,
        mirror,
        ",".join(ROOTFS_PACKAGES),
        ROOTFS_SIZE,
        GUEST_INIT,
        INITRAMFS_INIT,
        ",".join(INITRAMFS_MODULES),
    ):
        h.update(part.encode() + b"\0")
    h.update(agent_zipapp() if agent is None else agent)
    for cert in host_extra_cas():
        h.update(cert.read_bytes())
    return h.hexdigest()[:16]


def snapshot_inputs(agent: bytes | None = None) -> dict[str, str]:
    """What every memory snapshot's cache key holds besides its own inputs: the artifact
    format and the agent (``agent``: its zipapp, by default this checkout's) that will be
    running in the saved memory."""
    return {"snapshot_format": SNAPSHOT_FORMAT, "agent": agent_digest(agent)}


def base_snapshot_key(image: BaseImage, agent: bytes | None = None) -> str:
    """Key of the `base` template's memory snapshot: its image (whose key already hashes the
    agent) and the snapshot inputs."""
    parts = json.dumps([image.key, snapshot_inputs(agent)], sort_keys=True).encode()
    return hashlib.sha256(parts).hexdigest()[:16]


def host_extra_cas() -> list[Path]:
    """CA certificates the operator added to this host (`update-ca-certificates` input).

    Guests trust them too: where egress goes through a TLS-inspecting proxy (as on these
    machines), package installs in a guest fail certificate checks without its CA.
    """
    return sorted(HOST_EXTRA_CA_DIR.glob("**/*.crt"))


def install_extra_cas(rootdir: Path) -> None:
    """Copy the host's extra CAs into the guest and append them to its CA bundle."""
    certs = host_extra_cas()
    if not certs:
        return
    target = rootdir / "usr/local/share/ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    bundle = rootdir / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with bundle.open("a") as out:
        for cert in certs:
            shutil.copy(cert, target / cert.name)
            out.write("\n" + cert.read_text().strip() + "\n")


def load_cached(directory: Path, key: str) -> BaseImage | None:
    """The image in ``directory`` if its manifest, checksums and qcow2 check out."""
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    for name, digest in manifest["sha256"].items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            return None
    if not qcow2_ok(directory / "rootfs.qcow2"):
        return None
    return BaseImage(
        key,
        directory,
        directory / "vmlinuz",
        directory / "initrd.img",
        directory / "rootfs.qcow2",
        manifest["kernel_version"],
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def qcow2_ok(path: Path) -> bool:
    """``qemu-img check`` finds no corruption (it only reads metadata, so it's quick)."""
    r = subprocess.run(
        ["qemu-img", "check", "-q", "-f", "qcow2", str(path)], capture_output=True, timeout=120, check=False
    )
    return r.returncode == 0


# --------------------------------------------------------------------------- build steps


def build_into(work: Path, mirror: str, key: str) -> None:
    """Build all artifacts into ``work/out`` and write its manifest last."""
    out = work / "out"
    out.mkdir()
    kroot = fetch_kernel(work)
    kver = kernel_version(kroot)
    shutil.copy(kroot / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    write_initramfs(out / "initrd.img", kroot / "lib" / "modules" / kver)
    rootdir = work / "rootfs"
    debootstrap_rootfs(rootdir, mirror)
    install_guest_files(rootdir)
    install_extra_cas(rootdir)
    make_qcow2(rootdir, work / "rootfs.raw", out / "rootfs.qcow2")
    shutil.rmtree(rootdir)
    manifest = {
        "key": key,
        "kernel_version": kver,
        "sha256": {n: file_sha256(out / n) for n in ("vmlinuz", "initrd.img", "rootfs.qcow2")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def configured_mirror() -> str:
    """The first Debian mirror in the machine's apt sources (deb822 or one-line format)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:
        for stanza in text.split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M) and "debian-security" not in stanza:
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", legacy.read_text(), re.M)
        if m:
            return m.group(1)
    raise RuntimeError("no Debian mirror found in apt sources; pass mirror=")


def kernel_package() -> str:
    """The versioned package the ``linux-image-cloud-amd64`` metapackage depends on."""
    out = run(["apt-cache", "depends", "linux-image-cloud-amd64"]).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise RuntimeError("cannot resolve linux-image-cloud-amd64 (apt-get update?)")
    return m.group(1)


def fetch_kernel(work: Path) -> Path:
    """``apt-get download`` the cloud kernel and unpack it with ``dpkg -x`` (not installed)."""
    pkg_dir = work / "kpkg"
    pkg_dir.mkdir()
    run(["apt-get", "download", kernel_package()], cwd=pkg_dir)
    deb = next(pkg_dir.glob("*.deb"))
    kroot = work / "kernel"
    run(["dpkg", "-x", str(deb), str(kroot)])
    return kroot


def kernel_version(kroot: Path) -> str:
    return next((kroot / "boot").glob("vmlinuz-*")).name.removeprefix("vmlinuz-")


def module_paths(moddir: Path) -> dict[str, Path]:
    """Module name (underscored) -> .ko path, for every module in the package."""
    return {p.stem.replace("-", "_"): p for p in moddir.rglob("*.ko")}


def module_depends(ko: Path) -> list[str]:
    """Dependencies from the module's .modinfo (the package ships no modules.dep)."""
    m = re.search(rb"depends=([^\0]*)\0", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Wanted modules plus their dependencies, dependencies first (DFS topological sort)."""
    paths = module_paths(moddir)
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in module_depends(paths[name]):
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return [paths[n] for n in order]


def write_initramfs(dest: Path, moddir: Path) -> None:
    """Uncompressed newc cpio: busybox, the virtio modules and /init (~3 MB).

    Uncompressed because decompression under TCG costs more than reading a few MB more.
    """
    mods = module_load_order(moddir, INITRAMFS_MODULES)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "newroot")
    ]
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()))
    entries.append(("init", 0o100755, INITRAMFS_INIT.encode()))
    entries.append(("etc/modules.order", 0o100644, "\n".join(p.stem for p in mods).encode() + b"\n"))
    entries += [(f"lib/modules/{p.stem}.ko", 0o100644, p.read_bytes()) for p in mods]
    dest.write_bytes(cpio_newc(entries))


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """Serialise (name, mode, data) entries as a newc cpio archive with trailer."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nameb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nameb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def debootstrap_rootfs(rootdir: Path, mirror: str) -> None:
    """Minimal Debian with python3 and iproute2 (mmdebstrap as root, no chroot mounts kept)."""
    run(
        [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            SUITE,
            str(rootdir),
            mirror,
        ]
    )


def install_guest_files(rootdir: Path) -> None:
    """Agent (one zipapp), PID 1 script and network config, written as plain files into the tree."""
    write_agent_zipapp(rootdir / GUEST_AGENT_PATH.lstrip("/"))
    init = rootdir / GUEST_INIT_PATH.lstrip("/")
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    (rootdir / "etc/hostname").write_text("sandbox\n")
    (rootdir / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sandbox\n")
    resolv = rootdir / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 10.0.2.3\n")


def make_qcow2(rootdir: Path, raw: Path, dest: Path) -> None:
    """ext4 populated from the directory (no mount), then converted to qcow2."""
    run(["truncate", "-s", ROOTFS_SIZE, str(raw)])
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "watasu-root",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(rootdir),
            str(raw),
        ]
    )
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)])
    raw.unlink()


def run(
    cmd: list[str], cwd: Path | None = None, timeout: float = STEP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a build step; failures raise with the step's stderr attached."""
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


if __name__ == "__main__":
    import sys
    import time

    t = time.monotonic()
    img = build_base_image(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE_DIR)
    print(json.dumps({k: str(v) for k, v in asdict(img).items()}, indent=2))
    print(f"{time.monotonic() - t:.1f}s")

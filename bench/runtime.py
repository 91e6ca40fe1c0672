"""Runtime benchmark: raw QEMU restore floor vs our driver, a shape snapshot's start vs the
baseline's, cold boot, pause/resume, RSS.

Run as root on a host prepared by scripts/setup-host (`make bench` does both):
    .venv/bin/python bench/runtime.py [--runs 3]

The floor restores the *same* template snapshot with plain QEMU: libvirt's own argv for
the template (``virsh domxml-to-native``) minus its monitor / -S / seccomp spawn ban,
``-incoming "exec:cat state"`` on the extracted migration stream, timed from exec to the
agent's /health answering through the port forward.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandboxes.runtime import lifecycle
from sandboxes.runtime.agent_client import AgentClient
from sandboxes.runtime.buildvm import make_template_snapshot
from sandboxes.runtime.driver import MemorySnapshot, free_tcp_port
from sandboxes.runtime.images import DEFAULT_CACHE_DIR, BaseImage, build_base_image
from sandboxes.runtime.libvirt_driver import LibvirtDriver, create_overlay
from sandboxes.runtime.saveimage import CloneIdentity, read_xml, rewrite_domain_xml

PREFIX = "wbench-"
DROP_WITH_ARG = {"-mon", "-sandbox"}


def median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.0f} ms  (runs: {', '.join(f'{x * 1000:.0f}' for x in xs)})"


def raw_argv(snap: MemorySnapshot, work: Path, port: int) -> list[str]:
    """libvirt's QEMU argv for a clone of the template, made runnable without libvirt."""
    _, xml, _ = read_xml(snap.save_path)
    disk = work / f"raw-{port}.qcow2"
    create_overlay(snap.disk_path, disk, "root")
    ident = CloneIdentity(f"{PREFIX}raw", str(uuid.uuid4()), disk, port, work / "raw-console.log")
    xml_path = work / "raw.xml"
    xml_path.write_text(rewrite_domain_xml(xml, ident))
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domxml-to-native", "qemu-argv", str(xml_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    args = shlex.split(out)
    args = args[next(i for i, a in enumerate(args) if a.endswith("qemu-system-x86_64")) :]
    argv, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if a == "-S" or (a in ("-object", "-chardev") and ("masterKey" in nxt or "charmonitor" in nxt)):
            skip = a != "-S"
            continue
        if a in DROP_WITH_ARG:
            skip = True
            continue
        argv.append(a)
    return argv


def extract_stream(snap: MemorySnapshot, dest: Path) -> None:
    """The QEMU migration stream inside libvirt's save image (after header + XML)."""
    h, _, _ = read_xml(snap.save_path)
    with snap.save_path.open("rb") as f, dest.open("wb") as out:
        f.seek(h.stream_offset)
        while chunk := f.read(16 << 20):
            out.write(chunk)


class Qmp:
    """Minimal QMP client: enough to wait for the incoming migration and ``cont``."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.f = self.sock.makefile("rwb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str) -> dict:  # type: ignore[type-arg]
        self.f.write(json.dumps({"execute": name}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


def bench_raw_floor(snap: MemorySnapshot, work: Path, runs: int) -> list[float]:
    state = work / "raw-state.bin"
    extract_stream(snap, state)
    times = []
    for _ in range(runs):
        port = free_tcp_port()
        qmp_path = work / f"qmp-{port}.sock"
        argv = [
            *raw_argv(snap, work, port),
            "-incoming",
            f"exec:cat {state}",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
        ]
        t = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # The stream records the source as paused (libvirt stops vCPUs before saving),
            # so QEMU ends the incoming migration paused: continue it, as libvirt does.
            qmp = Qmp(qmp_path)
            while qmp.cmd("query-migrate")["return"].get("status") != "completed":
                time.sleep(0.002)
            qmp.cmd("cont")
            qmp.close()
            AgentClient(port).wait_ready(30)
            times.append(time.monotonic() - t)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return times


Timings = list[float]


def bench_driver_start(
    d: LibvirtDriver, snap: MemorySnapshot, disks: Path, runs: int
) -> tuple[Timings, Timings]:
    """Snapshot start to agent ready, and to init done."""
    ready, inited = [], []
    for i in range(runs):
        name = f"{PREFIX}snap-{i}"
        spec = lifecycle.sandbox_spec(
            name,
            disks,
            vcpus=snap.vcpus,
            memory_mb=snap.memory_mb,
            kernel=snap.kernel,
            initrd=snap.initrd,
            cmdline=snap.cmdline,
        )
        t = time.monotonic()
        d.restore(spec, snap)
        c = AgentClient(spec.agent_host_port)
        c.wait_ready(30)
        ready.append(time.monotonic() - t)
        c.init(auth=snap.agent_secret, secret=lifecycle.new_secret(), hostname=name)
        inited.append(time.monotonic() - t)
        d.destroy(name)
    return ready, inited


def bench_shape_start(
    d: LibvirtDriver, snap: MemorySnapshot, shape: MemorySnapshot, disks: Path, runs: int
) -> tuple[Timings, Timings]:
    """Sandbox starts (restore + init, as `vm.start` does) from the baseline snapshot and
    from a snapshot of another shape made on its disk, alternating so both see one load."""
    baseline, shaped = [], []
    for i in range(runs):
        for source, times in ((snap, baseline), (shape, shaped)):
            t = time.monotonic()
            vm = lifecycle.start_from_snapshot(d, source, f"{PREFIX}shape-{i}", disks)
            times.append(time.monotonic() - t)
            d.destroy(vm.name)
    return baseline, shaped


def shape_snapshot(d: LibvirtDriver, snap: MemorySnapshot, dest: Path) -> MemorySnapshot:
    """A 2 vCPU / 1 GiB snapshot booted on the baseline snapshot's disk (templates_app/shapes.py)."""
    image = BaseImage(
        key="",
        directory=dest.parent,
        kernel=snap.kernel,
        initrd=snap.initrd,
        disk=snap.disk_path,
        kernel_version="",
    )
    return make_template_snapshot(
        image, dest, d, vcpus=2, memory_mb=1024, name=f"{PREFIX}shape-{secrets.token_hex(3)}"
    )


def bench_cold_boot(d: LibvirtDriver, img, disks: Path, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for i in range(runs):
        name, token = f"{PREFIX}cold-{i}", lifecycle.new_secret()
        spec = lifecycle.sandbox_spec(
            name,
            disks,
            vcpus=1,
            memory_mb=512,
            kernel=img.kernel,
            initrd=img.initrd,
            backing=img.disk,
            cmdline=f"{img.default_cmdline} watasu.token={token}",
        )
        t = time.monotonic()
        d.boot(spec)
        AgentClient(spec.agent_host_port).wait_ready(60)
        times.append(time.monotonic() - t)
        d.destroy(name)
    return times


def bench_pause_resume(
    d: LibvirtDriver, snap: MemorySnapshot, disks: Path, runs: int
) -> tuple[Timings, Timings]:
    sb = lifecycle.start_from_snapshot(d, snap, f"{PREFIX}pr", disks)
    pauses, resumes = [], []
    try:
        for _ in range(runs):
            t = time.monotonic()
            d.pause(sb.name)
            pauses.append(time.monotonic() - t)
            resumes.append(lifecycle.resume(d, sb.name, sb.client))
    finally:
        d.destroy(sb.name)
    return pauses, resumes


def bench_idle_rss(
    d: LibvirtDriver, snap: MemorySnapshot, disks: Path, count: int, idle_s: float
) -> list[int]:
    sbs = [lifecycle.start_from_snapshot(d, snap, f"{PREFIX}rss-{i}", disks) for i in range(count)]
    try:
        time.sleep(idle_s)
        return [d.stats(sb.name).memory_rss_kb for sb in sbs]
    finally:
        for sb in sbs:
            d.destroy(sb.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    args = ap.parse_args()
    img = build_base_image(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="watasu-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # QEMU runs unprivileged and must reach the disks in here
        disks = work / "disks"
        disks.mkdir()
        d = LibvirtDriver(state_dir=work / "state")
        for name in d.list_domains(PREFIX):
            d.destroy(name)
        t = time.monotonic()
        snap = make_template_snapshot(img, work / "template", d, name=f"{PREFIX}tpl-{secrets.token_hex(3)}")
        print(
            f"template snapshot (cold boot + init + save): {time.monotonic() - t:.2f} s, "
            f"memory image {snap.save_path.stat().st_size / 2**20:.0f} MiB"
        )
        floor = bench_raw_floor(snap, work, args.runs)
        print(f"raw QEMU restore -> agent ready:        {median_ms(floor)}")
        ready, inited = bench_driver_start(d, snap, disks, args.runs)
        print(f"driver snapshot start -> agent ready:   {median_ms(ready)}")
        print(f"driver snapshot start -> init done:     {median_ms(inited)}")
        ratio = statistics.median(ready) / statistics.median(floor)
        print(f"ratio driver/raw (agent ready):         {ratio:.2f}x (target <= 2x)")
        t = time.monotonic()
        shape = shape_snapshot(d, snap, work / "shape-2x1024")
        print(f"shape snapshot 2x1024 (cold boot + save):  {time.monotonic() - t:.2f} s")
        base_starts, shape_starts = bench_shape_start(d, snap, shape, disks, args.runs)
        print(f"start, baseline 1x512 (restore + init): {median_ms(base_starts)}")
        print(f"start, shape 2x1024 (restore + init):   {median_ms(shape_starts)}")
        ratio = statistics.median(shape_starts) / statistics.median(base_starts)
        print(f"ratio shape/baseline (p50):             {ratio:.2f}x (target <= 1.2x)")
        cold = bench_cold_boot(d, img, disks, max(1, args.runs - 1))
        print(f"cold boot -> agent ready:               {median_ms(cold)}")
        pauses, resumes = bench_pause_resume(d, snap, disks, args.runs)
        print(f"pause (managed save):                   {median_ms(pauses)}")
        print(f"resume (-> agent ready + clock resync): {median_ms(resumes)}")
        rss = bench_idle_rss(d, snap, disks, 3, 5.0)
        print(
            f"RSS per idle sandbox (512 MiB guest):   {statistics.median(rss) / 1024:.0f} MiB "
            f"(samples: {', '.join(f'{r / 1024:.0f}' for r in rss)})"
        )


if __name__ == "__main__":
    main()

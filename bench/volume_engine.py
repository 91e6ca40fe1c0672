"""Detached volume engine benchmark: debugfs in bubblewrap, against the alternatives.

    .venv/bin/python bench/volume_engine.py [--runs 50] [--size-gib 10] [--no-fuse]

No database, no web server: the engine's functions on a real image, on this machine.
  1. create_image of --size-gib GiB: wall time and bytes allocated on the host;
  2. on that image, --runs rounds (after 5 warm-ups) of: a 1 KiB write then read of a new
     file, an overwrite then read, stat, a listing of a 50-entry directory, mkdir:
     p50/p95 (target: write+read p50 <= 250 ms). Also what one empty sandbox run costs
     (bwrap + setpriv + prlimit around /bin/true), the floor under every tool run;
  3. fuse2fs (rejected design: the host kernel mounts the image through FUSE): the same
     1 KiB write+read through a mount made in a private mount namespace on a throwaway
     copy of our own fresh image, plus mount+unmount per operation, as a detached
     operation would need. Skipped with --no-fuse or when fuse2fs is not installed;
  4. the helper-VM design (hot-plug the disk into a small VM, use it through the guest
     agent) is not built: its estimate comes from the runtime figures in the output's
     notes, and is printed as an estimate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, ms, percentile  # bench/ on sys.path

sys.path.insert(0, str(ROOT))

from volumes import engine  # after the path is set

KIB = b"x" * 1024


def timed(runs: int, warmup: int, step: Callable[[int], object]) -> list[float]:
    """Seconds per call of ``step(i)``, warm-up rounds dropped."""
    times = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def create(work: Path, size_gib: int) -> Path:
    image = work / "volume.img"
    started = time.perf_counter()
    engine.create_image(image, size_gib << 30, label="bench")
    elapsed = time.perf_counter() - started
    allocated = image.stat().st_blocks * 512
    print(
        f"create_image {size_gib} GiB: {elapsed * 1000:.0f} ms, "
        f"{allocated / (1 << 20):.1f} MiB allocated on the host"
    )
    return image


def engine_rounds(image: Path, runs: int) -> dict[str, list[float]]:
    engine.make_dir(image, "/bench/list", force=True)
    for i in range(50):
        engine.write_file(image, f"/bench/list/f{i:02d}", KIB)
    engine.write_file(image, "/bench/same", KIB)

    def write_read(i: int) -> None:
        engine.write_file(image, f"/bench/new-{i}", KIB)
        assert engine.read_file(image, f"/bench/new-{i}", max_bytes=4096) == KIB

    def overwrite_read(i: int) -> None:
        engine.write_file(image, "/bench/same", KIB)
        assert engine.read_file(image, "/bench/same", max_bytes=4096) == KIB

    return {
        "sandbox run of /bin/true (the floor)": timed(
            runs, 5, lambda i: engine.run_tool(["/bin/true"], fds=(), timeout=10, cap=1024, fsize=0)
        ),
        "write 1 KiB (new) + read": timed(runs, 5, write_read),
        "overwrite 1 KiB + read": timed(runs, 5, overwrite_read),
        "stat": timed(runs, 5, lambda i: engine.stat(image, "/bench/same")),
        "list 50 entries": timed(runs, 5, lambda i: engine.list_dir(image, "/bench/list")),
        "mkdir": timed(runs, 5, lambda i: engine.make_dir(image, f"/bench/d{i}")),
        "remove 1 file": timed(runs, 5, lambda i: engine.remove(image, f"/bench/new-{i}")),
    }  # fmt: skip


# fuse2fs's daemon writes the superblock back after umount returns: mounting again before it
# exits reads a half-written superblock ("Superblock checksum does not match"), so each
# mount runs it in the foreground and waits for it to exit.
FUSE_SCRIPT = r"""
set -eu
img=$1 mnt=$2 runs=$3
mount_it() {
    fuse2fs -f -o fakeroot "$img" "$mnt" >/dev/null 2>&1 &
    pid=$!
    n=0
    until grep -q " $mnt " /proc/self/mountinfo; do
        n=$((n + 1)); [ "$n" -lt 20000 ] || { kill "$pid"; exit 3; }
    done
}
unmount_it() { umount "$mnt"; wait "$pid"; }
mount_it
python3 - "$mnt" "$runs" <<'EOF'
import os, sys, time
mnt, runs = sys.argv[1], int(sys.argv[2])
data = b"x" * 1024
times = []
for i in range(runs + 5):
    t = time.perf_counter()
    path = os.path.join(mnt, f"f{i}")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        assert f.read() == data
    if i >= 5:
        times.append(time.perf_counter() - t)
print(" ".join(f"{t:.6f}" for t in times))
EOF
unmount_it
for i in $(seq 1 "$runs"); do
    t0=$(date +%s%N)
    mount_it
    printf x > "$mnt/m$i"; cat "$mnt/m$i" >/dev/null
    unmount_it
    echo "mount $(( ($(date +%s%N) - t0) / 1000 ))"
done
"""


def fuse_rounds(work: Path, runs: int) -> dict[str, list[float]]:
    """fuse2fs on a copy of a fresh image of our own, in a private mount namespace that
    ends with the command: nothing is mounted where anything else on the machine sees it."""
    image = work / "fuse.img"
    engine.create_image(image, 1 << 30)
    mnt = work / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private",
         "sh", "-c", FUSE_SCRIPT, "fuse", str(image), str(mnt), str(runs)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout.splitlines()  # fmt: skip
    per_op = [float(t) for t in out[0].split()]
    per_mount = [int(line.split()[1]) / 1e6 for line in out[1:] if line.startswith("mount ")]
    return {"fuse2fs, mounted: write 1 KiB + fsync + read": per_op, "fuse2fs, mount + op + umount": per_mount}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--size-gib", type=int, default=10)
    parser.add_argument("--no-fuse", action="store_true")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{args.runs} runs each (5 warm-ups)")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="watasu-bench-volumes-"))
    try:
        image = create(work, args.size_gib)
        results = engine_rounds(image, args.runs)
        if not args.no_fuse and shutil.which("fuse2fs"):
            results |= fuse_rounds(work, args.runs)
        else:
            print("fuse2fs: skipped")
        for name, values in results.items():
            print(f"{name:<48} {ms(values)}")
        write_read = percentile(results["write 1 KiB (new) + read"], 0.5)
        print(
            "helper VM (estimate, not built; docs/volumes.md): >= 2 x 66 ms for a write + read as two "
            "agent execs under TCG, + hot-plug and mount when the disk is not attached yet, + one VM "
            f"kept running per host (~195 MiB RSS); engine write + read p50 here: {write_read * 1000:.0f} ms"
        )
        used, allocated = engine.usage(image)
        print(f"after the runs: {used / (1 << 20):.1f} MiB used in the filesystem, "
              f"{allocated / (1 << 20):.1f} MiB allocated on the host")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

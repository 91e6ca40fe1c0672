"""Artifact transfer benchmark: push and pull of a template-sized tree, in MiB/s.

    .venv/bin/python bench/artifacts.py [--size-mib 256] [--no-s3]

No database, no VM: ``sandboxes/runtime/artifact_store.py`` on this machine, through a
FileStore (a directory on the local disk) and through S3 (moto's S3 server on 127.0.0.1,
so network and S3 protocol costs but no real disk or WAN behind it). The tree is one file
of --size-mib MiB of random bytes (a memory image does not compress) plus a 4 MiB one.
For each store: the first push (every chunk uploaded), a second push of the same tree
(dedup: nothing uploaded, only reads and hashes), a pull into an empty directory (every
chunk fetched and verified), and a repeated pull (a no-op).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The repo root instead of bench/ (whose code.py would shadow the standard library's `code`).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from sandboxes.runtime import artifact_store  # noqa: E402
from sandboxes.runtime.artifact_store import FileStore, S3Store, Store  # noqa: E402
from sandboxes.runtime.driver import free_tcp_port  # noqa: E402


def write_random(path: Path, mib: int) -> Path:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def timed(label: str, mib: float, run: Callable[[], object]) -> None:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"  {label:<32} {seconds:7.2f} s   {mib / seconds:8.1f} MiB/s")


def bench_store(name: str, store: Store, files: dict[str, Path], work: Path) -> None:
    mib = sum(p.stat().st_size for p in files.values()) / (1 << 20)
    print(f"{name}: {mib:.0f} MiB, chunks of {artifact_store.CHUNK_SIZE >> 20} MiB")
    digest = ""

    def push() -> None:
        nonlocal digest
        digest = artifact_store.push_tree(store, files, {})

    timed("push (all chunks new)", mib, push)
    timed("push again (all chunks present)", mib, push)
    timed("pull into an empty directory", mib, lambda: artifact_store.pull_tree(store, digest, work / name))
    start = time.perf_counter()
    artifact_store.pull_tree(store, digest, work / name)
    print(f"  {'pull again (present: no-op)':<32} {(time.perf_counter() - start) * 1000:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="watasu-bench-artifacts-") as tmp:
        work = Path(tmp)
        files = {
            "memory.save": write_random(work / "memory.save", args.size_mib),
            "vmlinuz": write_random(work / "vmlinuz", 4),
        }
        bench_store("file", FileStore(work / "store"), files, work)
        if args.no_s3:
            return
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        port = free_tcp_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            s3 = S3Store("bench", "artifacts", f"http://127.0.0.1:{port}", "us-east-1", "bench", "bench")
            s3.client.create_bucket(Bucket="bench")
            bench_store("s3", s3, files, work)
        finally:
            server.stop()


if __name__ == "__main__":
    main()

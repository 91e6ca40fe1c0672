"""The artifact store: content-addressed push and pull of a tree of files, through a
directory and through S3 (moto's real S3 server on 127.0.0.1, the outer edge we do not own)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxes.runtime import artifact_store
from sandboxes.runtime.artifact_store import ArtifactError, FileStore, S3Store, Store, pull_tree, push_tree
from sandboxes.runtime.driver import free_tcp_port

SMALL_CHUNK = 64 << 10
BUCKET = "watasu-artifacts"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_tcp_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_s3_store(endpoint: str, prefix: str) -> S3Store:
    store = S3Store(BUCKET, prefix, endpoint, "us-east-1", "testing", "testing")
    with contextlib.suppress(store.client.exceptions.BucketAlreadyOwnedByYou):
        store.client.create_bucket(Bucket=BUCKET)
    return store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return make_s3_store(endpoint, f"t/{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}")


class CountingStore:
    """A store that records each get and put, and can fail the Nth get (a killed transfer)."""

    def __init__(self, inner: Store, fail_on_get: int | None = None) -> None:
        self.inner, self.fail_on_get = inner, fail_on_get
        self.gets: list[str] = []
        self.puts: list[str] = []

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        if self.fail_on_get is not None and len(self.gets) == self.fail_on_get:
            raise ConnectionError("transfer killed")
        return self.inner.get(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return self.inner.keys(prefix)


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


def qcow2_chain(directory: Path) -> tuple[Path, Path]:
    """base.qcow2 (1 MiB of 0xab) and an overlay on it (512 KiB of 0xcd written over its end)."""
    directory.mkdir(parents=True, exist_ok=True)
    base, top = directory / "base.qcow2", directory / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 768K 512K", str(top))
    return base, top


def guest_bytes(disk: Path, out: Path) -> str:
    """sha256 of what a guest would read from ``disk`` (its whole chain, as raw)."""
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(out))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def chunks_of(store: Store, digest: str, name: str) -> set[str]:
    manifest = json.loads(store.get(f"manifests/{digest}"))
    return {c for f in manifest["files"] if f["name"] == name for c in f["chunks"]}


def test_qcow2_chain_round_trip(store: Store, tmp_path: Path) -> None:
    # given a two-file qcow2 chain pushed as a tree
    base, top = qcow2_chain(tmp_path / "src")
    digest = push_tree(
        store, {"base.qcow2": base, "disk.qcow2": top}, {"disk.qcow2": "base.qcow2"}, chunk_size=SMALL_CHUNK
    )
    # when it is pulled somewhere else
    dest = pull_tree(store, digest, tmp_path / "host-b" / digest)
    # then the pulled overlay's backing file is the pulled base, the image checks, and the
    # guest sees the same bytes
    chain = json.loads(run("qemu-img", "info", "--backing-chain", "--output=json", str(dest / "disk.qcow2")))
    assert [Path(image["filename"]) for image in chain] == [dest / "disk.qcow2", dest / "base.qcow2"]
    run("qemu-img", "check", "-q", str(dest / "disk.qcow2"))
    assert guest_bytes(dest / "disk.qcow2", tmp_path / "b.raw") == guest_bytes(top, tmp_path / "a.raw")
    assert sorted(p.name for p in dest.iterdir()) == [".manifest.json", "base.qcow2", "disk.qcow2"]
    assert not (tmp_path / "host-b" / f"{digest}.partial").exists()


def test_pull_keeps_modes_and_second_pull_is_a_no_op(store: Store, tmp_path: Path) -> None:
    # given a pushed tree with a read-only file, pulled once
    kernel = random_file(tmp_path / "src" / "vmlinuz", 100_000)
    kernel.chmod(0o444)
    digest = push_tree(store, {"vmlinuz": kernel}, {}, chunk_size=SMALL_CHUNK)
    dest = pull_tree(store, digest, tmp_path / "pulled")
    # when it is pulled again
    counting = CountingStore(store)
    pull_tree(counting, digest, tmp_path / "pulled")
    # then nothing was fetched, and the file has its bytes and mode
    assert counting.gets == []
    assert (dest / "vmlinuz").read_bytes() == kernel.read_bytes()
    assert (dest / "vmlinuz").stat().st_mode & 0o777 == 0o444


def test_second_push_uploads_no_chunk_of_a_shared_file(store: Store, tmp_path: Path) -> None:
    # given a pushed tree
    shared = random_file(tmp_path / "src" / "base.img", 5 * SMALL_CHUNK + 17)
    first = random_file(tmp_path / "src" / "one.save", 2 * SMALL_CHUNK)
    push_tree(store, {"base.img": shared, "memory.save": first}, {}, chunk_size=SMALL_CHUNK)
    before = set(store.keys("chunks/"))
    # when a second tree sharing base.img is pushed
    counting = CountingStore(store)
    second = random_file(tmp_path / "src" / "two.save", 3 * SMALL_CHUNK)
    digest = push_tree(counting, {"base.img": shared, "memory.save": second}, {}, chunk_size=SMALL_CHUNK)
    # then only the new file's chunks (and the manifest) were uploaded
    new_chunks = chunks_of(store, digest, "memory.save")
    assert len(new_chunks) == 3
    assert sorted(counting.puts) == sorted([f"chunks/{c}" for c in new_chunks] + [f"manifests/{digest}"])
    assert set(store.keys("chunks/")) == before | {f"chunks/{c}" for c in new_chunks}
    assert chunks_of(store, digest, "base.img") <= {k.removeprefix("chunks/") for k in before}


def test_interrupted_pull_resumes_with_the_missing_chunks_only(store: Store, tmp_path: Path) -> None:
    # given a tree of 8 chunks, and a pull killed at its 5th get (manifest + 3 chunks done)
    data = random_file(tmp_path / "src" / "memory.save", 8 * SMALL_CHUNK)
    digest = push_tree(store, {"memory.save": data}, {}, chunk_size=SMALL_CHUNK)
    dest = tmp_path / "pulled"
    with pytest.raises(ConnectionError):
        pull_tree(CountingStore(store, fail_on_get=5), digest, dest)
    assert not dest.exists()
    # when it is pulled again
    counting = CountingStore(store)
    pull_tree(counting, digest, dest)
    # then only the manifest and the 5 chunks not yet fetched were fetched
    chunks = json.loads(store.get(f"manifests/{digest}"))["files"][0]["chunks"]
    assert counting.gets == [f"manifests/{digest}"] + [f"chunks/{c}" for c in chunks[3:]]
    assert (dest / "memory.save").read_bytes() == data.read_bytes()


def test_corrupt_chunk_is_named_and_nothing_is_put_in_place(store: Store, tmp_path: Path) -> None:
    # given a pushed tree whose second chunk was altered in the store
    data = random_file(tmp_path / "src" / "memory.save", 3 * SMALL_CHUNK)
    digest = push_tree(store, {"memory.save": data}, {}, chunk_size=SMALL_CHUNK)
    bad = json.loads(store.get(f"manifests/{digest}"))["files"][0]["chunks"][1]
    store.put(f"chunks/{bad}", b"not the chunk")
    # when it is pulled
    counting = CountingStore(store)
    with pytest.raises(ArtifactError) as failure:
        pull_tree(counting, digest, tmp_path / "pulled")
    # then the error names the chunk, which was fetched twice, and no artifact is in place
    assert str(failure.value) == f"chunk {bad} of memory.save is corrupt in the store"
    assert counting.gets.count(f"chunks/{bad}") == 2
    assert not (tmp_path / "pulled").exists()


def test_a_damaged_local_chunk_is_fetched_again(store: Store, tmp_path: Path) -> None:
    # given a partial download whose middle chunk was damaged on the local disk
    data = random_file(tmp_path / "src" / "memory.save", 3 * SMALL_CHUNK)
    digest = push_tree(store, {"memory.save": data}, {}, chunk_size=SMALL_CHUNK)
    partial = tmp_path / "pulled.partial"
    partial.mkdir()
    damaged = bytearray(data.read_bytes())
    damaged[SMALL_CHUNK + 10] ^= 0xFF
    (partial / "memory.save").write_bytes(bytes(damaged))
    # when it is pulled
    counting = CountingStore(store)
    dest = pull_tree(counting, digest, tmp_path / "pulled")
    # then only that chunk was fetched, and the file is whole
    chunks = json.loads(store.get(f"manifests/{digest}"))["files"][0]["chunks"]
    assert counting.gets == [f"manifests/{digest}", f"chunks/{chunks[1]}"]
    assert (dest / "memory.save").read_bytes() == data.read_bytes()


def test_unknown_artifact_and_bad_names_are_refused(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is not in the store"):
        pull_tree(store, "0" * 64, tmp_path / "x")
    with pytest.raises(ArtifactError, match="is not an artifact digest"):
        pull_tree(store, "../etc", tmp_path / "y")
    with pytest.raises(ArtifactError, match="is not a valid artifact file name"):
        push_tree(store, {"../escape": random_file(tmp_path / "f", 10)}, {})


def test_store_from_url() -> None:
    assert isinstance(artifact_store.store_from_url("file:///srv/store"), FileStore)
    s3 = artifact_store.store_from_url("s3://bucket/some/prefix", region="us-east-1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ValueError, match="expected file:///path or s3://bucket/prefix"):
        artifact_store.store_from_url("ftp://x/y")

"""Ship template artifacts between hosts through an object store, content addressed.

A tree of files (a version's memory image, its qcow2 disk and backing chain, kernel and
initrd) is cut into chunks of ``CHUNK_SIZE`` bytes, each kept once under
``chunks/<sha256>``; a manifest (JSON) lists every file's name, mode, size, sha256, chunks
and, for a qcow2 overlay, the name of its backing file in the tree. The manifest is kept
under ``manifests/<sha256 of its bytes>``, and that digest names the artifact.

- A push skips every chunk the store already has: a second version sharing the base
  image uploads none of it, and a push cut short resumes where it stopped. The manifest
  is written last, so a manifest in the store means all its chunks are there.
- A pull downloads into ``<dest>.partial/``, keeps what is already there and verified,
  checks every chunk and every file against the manifest, points each overlay at its
  backing file's local path, then renames the directory into place: ``dest`` holds a
  complete artifact or nothing, and a second pull of it is a no-op.
- At most one chunk per transfer is held in memory, never a whole file.

``FileStore`` (a directory, the embedded default) and ``S3Store`` (any S3-compatible
service: MinIO, Ceph, AWS) are the two stores. No Django here: callers pass plain values.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

CHUNK_SIZE = 16 << 20
MANIFEST_FORMAT = 1
MANIFEST_FILE = ".manifest.json"  # the pulled artifact's own manifest (file names never start with ".")
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"[0-9a-f]{64}")
QEMU_IMG_TIMEOUT = 60
S3_TIMEOUT = 60  # seconds, connect and per read


class ArtifactError(Exception):
    """The store lacks or holds a damaged piece of an artifact, or the tree is invalid."""


class Store(Protocol):
    """Where artifacts live: a flat key space of immutable objects."""

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; readers never see a partial object."""

    def get(self, key: str) -> bytes:
        """The object's bytes (``KeyError`` when missing)."""

    def keys(self, prefix: str = "") -> Iterator[str]: ...


class FileStore:
    """A store in a local (or shared, e.g. NFS) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a reader sees the whole object or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def keys(self, prefix: str = "") -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not path.name.startswith(".put-") and key.startswith(prefix):
                yield key


class S3Store:
    """A store in an S3-compatible bucket, under ``prefix``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=Config(
                connect_timeout=S3_TIMEOUT,
                read_timeout=S3_TIMEOUT,
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(key) from None
            raise
        with contextlib.closing(body):
            return bytes(body.read())

    def keys(self, prefix: str = "") -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]


def store_from_url(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
) -> Store:
    """``file:///path`` (or a bare absolute path) or ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{url!r}: an s3:// store needs a bucket (s3://bucket/prefix)")
        return S3Store(parts.netloc, parts.path, endpoint_url, region, access_key, secret_key)
    if parts.scheme == "file" and not parts.netloc and parts.path.startswith("/"):
        return FileStore(Path(parts.path))
    if not parts.scheme and url.startswith("/"):
        return FileStore(Path(url))
    raise ValueError(f"{url!r}: expected file:///path or s3://bucket/prefix")


# --- push ------------------------------------------------------------------------------


def chunk_key(sha: str) -> str:
    return f"chunks/{sha}"


def manifest_key(digest: str) -> str:
    return f"manifests/{digest}"


def _read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def _push_file(store: Store, name: str, path: Path, chunk_size: int) -> dict[str, Any]:
    """Upload the chunks of one file the store lacks; the file's manifest entry."""
    whole, chunks, size = hashlib.sha256(), [], 0
    for data in _read_chunks(path, chunk_size):
        sha = hashlib.sha256(data).hexdigest()
        if not store.exists(chunk_key(sha)):
            store.put(chunk_key(sha), data)
        whole.update(data)
        chunks.append(sha)
        size += len(data)
    mode = path.stat().st_mode & 0o777
    return {"name": name, "mode": mode, "size": size, "sha256": whole.hexdigest(), "chunks": chunks}


def _check_tree(files: dict[str, Path], backing: dict[str, str]) -> None:
    for name in files:
        if not NAME.fullmatch(name):
            raise ArtifactError(f"{name!r} is not a valid artifact file name")
    for overlay, base in backing.items():
        if overlay not in files or base not in files:
            raise ArtifactError(f"backing {overlay} -> {base}: both must be files of the tree")


def manifest_bytes(entries: list[dict[str, Any]], chunk_size: int) -> bytes:
    """The canonical encoding the digest is taken over."""
    body = {"format": MANIFEST_FORMAT, "chunk_size": chunk_size, "files": entries}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def push_tree(
    store: Store, files: dict[str, Path], backing: dict[str, str], *, chunk_size: int = CHUNK_SIZE
) -> str:
    """Upload a tree of files (name -> local path; ``backing``: qcow2 overlay name -> its
    backing file's name) and return the artifact's digest."""
    _check_tree(files, backing)
    entries = []
    for name in sorted(files):
        entry = _push_file(store, name, Path(files[name]), chunk_size)
        entry["backing"] = backing.get(name)
        entries.append(entry)
    data = manifest_bytes(entries, chunk_size)
    digest = hashlib.sha256(data).hexdigest()
    if not store.exists(manifest_key(digest)):
        store.put(manifest_key(digest), data)  # last: its chunks are all in the store
    return digest


# --- pull ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    chunk_size: int
    name: str
    mode: int
    size: int
    sha256: str
    chunks: tuple[str, ...]
    backing: str | None


def read_manifest(store: Store, digest: str) -> tuple[bytes, list[FileEntry]]:
    """The manifest's bytes, checked against its digest, and the artifact's files."""
    if not DIGEST.fullmatch(digest):
        raise ArtifactError(f"{digest!r} is not an artifact digest")
    try:
        data = store.get(manifest_key(digest))
    except KeyError:
        raise ArtifactError(f"artifact {digest} is not in the store") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactError(f"manifest {digest} is corrupt in the store")
    return data, parse_manifest(data)


def parse_manifest(data: bytes) -> list[FileEntry]:
    body = json.loads(data)
    size = body.get("chunk_size")
    if body.get("format") != MANIFEST_FORMAT or not isinstance(size, int) or not 0 < size <= 1 << 30:
        raise ArtifactError(f"unsupported manifest (format {body.get('format')})")
    entries = [
        FileEntry(size, f["name"], f["mode"], f["size"], f["sha256"], tuple(f["chunks"]), f.get("backing"))
        for f in body["files"]
    ]
    names = {e.name for e in entries}
    for entry in entries:
        if not NAME.fullmatch(entry.name) or (entry.backing is not None and entry.backing not in names):
            raise ArtifactError(f"manifest names an invalid file {entry.name!r}")
    return entries


def _fetch_chunk(store: Store, sha: str, name: str) -> bytes:
    """A chunk whose bytes hash to ``sha``: fetched again once when they do not."""
    for _ in range(2):
        try:
            data = store.get(chunk_key(sha))
        except KeyError:
            raise ArtifactError(f"chunk {sha} of {name} is missing from the store") from None
        if hashlib.sha256(data).hexdigest() == sha:
            return data
    raise ArtifactError(f"chunk {sha} of {name} is corrupt in the store")


def _pull_file(store: Store, entry: FileEntry, path: Path) -> None:
    """Bring ``path`` to the entry's bytes, keeping every chunk already there and intact."""
    whole = hashlib.sha256()
    if path.exists():
        path.chmod(0o600)  # writable while we fill it, whatever mode a previous try left
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        have = os.fstat(fd).st_size
        for index, sha in enumerate(entry.chunks):
            offset = index * entry.chunk_size
            length = min(entry.chunk_size, entry.size - offset)
            data = os.pread(fd, length, offset) if offset + length <= have else b""
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
                data = _fetch_chunk(store, sha, entry.name)
                os.pwrite(fd, data, offset)
            whole.update(data)
        os.ftruncate(fd, entry.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if whole.hexdigest() != entry.sha256:
        raise ArtifactError(f"{entry.name} does not match its sha256 after the pull")


def _rebase(overlay: Path, backing: Path) -> None:
    """Point ``overlay`` at ``backing`` without touching data (``-u``: header only)."""
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)],
        check=True,
        capture_output=True,
        timeout=QEMU_IMG_TIMEOUT,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One pull of an artifact at a time on this host (others wait, then find it there)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def pull_tree(
    store: Store,
    digest: str,
    dest: Path,
    *,
    prepare: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Download artifact ``digest`` into ``dest`` (nothing to do when it is there).

    ``prepare(partial, dest)`` runs on the complete, verified files in the partial
    directory just before it is renamed to ``dest`` (to write what refers to final paths).
    """
    dest = Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.is_dir():  # another process pulled it while we waited
            return dest
        data, entries = read_manifest(store, digest)
        partial = dest.with_name(dest.name + ".partial")
        partial.mkdir(exist_ok=True)
        for entry in entries:
            _pull_file(store, entry, partial / entry.name)
        for entry in entries:
            if entry.backing is not None:
                _rebase(partial / entry.name, dest / entry.backing)
        for entry in entries:
            (partial / entry.name).chmod(entry.mode)
        (partial / MANIFEST_FILE).write_bytes(data)
        if prepare is not None:
            prepare(partial, dest)
        os.rename(partial, dest)
    return dest


def remove_tree(dest: Path) -> None:
    """Remove a pulled artifact and any partial download of it."""
    for path in (dest, dest.with_name(dest.name + ".partial")):
        shutil.rmtree(path, ignore_errors=True)
    dest.with_name(dest.name + ".lock").unlink(missing_ok=True)

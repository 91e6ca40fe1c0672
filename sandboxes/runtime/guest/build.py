"""The guest agent as the one file the image holds: a zipapp built deterministically.

Entries are sorted, stored uncompressed (no zlib version can change the bytes) and
stamped with one fixed time and mode, so the same sources always give the same bytes
and the same hash, which is part of every image, layer and snapshot cache key.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipapp
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).parent / "agent"
INTERPRETER = "/usr/bin/python3"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
# The archive's own entry point: the package runs as ``agent`` from the zip's root.
ROOT_MAIN = b"from agent.__main__ import main\n\nmain()\n"


def _entries(package: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    return [
        ("__main__.py", ROOT_MAIN),
        *((f"agent/{p.relative_to(package).as_posix()}", p.read_bytes()) for p in files),
    ]


@functools.cache
def agent_zipapp() -> bytes:
    """The agent's zipapp (its sources are read once per process: they do not change under it)."""
    return build_zipapp(PACKAGE)


def build_zipapp(package: Path) -> bytes:
    """The zipapp of the agent package at ``package``, as bytes."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as archive:
        for name, data in _entries(package):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o100644 << 16
            info.create_system = 3  # unix, whatever the building host
            archive.writestr(info, data)
    inner.seek(0)
    out = io.BytesIO()
    zipapp.create_archive(inner, out, interpreter=INTERPRETER)
    return out.getvalue()


def agent_digest(zipapp_bytes: bytes | None = None) -> str:
    """sha256 of the zipapp (the agent's by default): the agent's identity in every cache key."""
    return hashlib.sha256(agent_zipapp() if zipapp_bytes is None else zipapp_bytes).hexdigest()


def write_agent_zipapp(dest: Path) -> Path:
    """Write the zipapp to ``dest`` (readable by all, written beside and renamed into place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(agent_zipapp())
    tmp.chmod(0o644)
    tmp.replace(dest)
    return dest

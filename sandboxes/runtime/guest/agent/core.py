"""Shared pieces of the agent: limits, the error type and its catalogue, timestamps, logging."""

from __future__ import annotations

import errno
import sys
from datetime import UTC, datetime
from typing import Any

AGENT_PORT = 49983
MAX_BODY = 64 * 1024 * 1024  # JSON bodies (write_files carries base64 data)
CHUNK = 256 * 1024  # file streaming unit


class HttpError(Exception):
    """An error answered as ``{"error": code, "message": ...}`` (plus ``extra`` keys)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = extra or {}
        self.headers = headers or []

    def payload(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def os_error(e: OSError, path: str) -> HttpError:
    """Map a filesystem error to the data plane's error codes (docs/dataplane.md)."""
    table = {
        errno.ENOENT: (404, "file_not_found", f"{path}: no such file or directory"),
        errno.EISDIR: (422, "is_a_directory", f"{path} is a directory"),
        errno.ENOTDIR: (422, "not_a_directory", f"{path}: a path component is not a directory"),
        errno.EEXIST: (409, "already_exists", f"{path} already exists"),
        errno.ENOSPC: (507, "not_enough_space", "no space left on device"),
        errno.EDQUOT: (507, "not_enough_space", "disk quota exceeded"),
        errno.EACCES: (403, "forbidden", f"{path}: permission denied"),
        errno.EPERM: (403, "forbidden", f"{path}: operation not permitted"),
        errno.ENOTEMPTY: (409, "already_exists", f"{path}: directory not empty"),
        errno.ELOOP: (422, "validation_failed", f"{path}: too many levels of symbolic links"),
        errno.ENAMETOOLONG: (422, "validation_failed", f"{path}: name too long"),
        errno.EROFS: (403, "forbidden", f"{path}: read-only file system"),
    }
    status, code, message = table.get(e.errno or 0, (500, "internal_error", f"{path}: {e.strerror}"))
    return HttpError(status, code, message)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as the ISO-8601 UTC string the SDK parses (``...Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def log(msg: str) -> None:
    """Agent diagnostics go to the VM console (the host keeps it)."""
    print(f"watasu-agent: {msg}", file=sys.stderr, flush=True)

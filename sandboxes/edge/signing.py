"""Signed file URLs (spec 3.11): the URL itself is the credential.

The signature is an HMAC (Django's `salted_hmac`, keyed by SECRET_KEY) over
the sandbox id, its session epoch, the operation, the path and the expiry, so
a URL works for exactly one file, one direction and one sandbox, until it
expires or the sandbox is destroyed (destroy bumps the epoch).
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from django.utils.crypto import salted_hmac

from sandboxes.models import Sandbox
from sandboxes.sessions import data_plane_url

_SALT = "watasu.signed-file-url.v1"
SIGNED_PATH = "/runtime/v1/files/signed"
_EXPIRES = re.compile(r"[0-9]{1,12}")
DEFAULT_TTL = 300
MAX_TTL = 24 * 3600
OPERATIONS = {"read": "GET", "write": "POST"}


@dataclass(frozen=True)
class FileUrl:
    method: str
    path: str
    url: str
    expires_at: datetime

    def as_dict(self) -> dict[str, str]:
        iso = self.expires_at.isoformat().replace("+00:00", "Z")
        return {"method": self.method, "path": self.path, "url": self.url, "expires_at": iso}


def _signature(sandbox: Sandbox, *, path: str, op: str, expires: int) -> str:
    message = f"{sandbox.pk}:{sandbox.session_epoch}:{op}:{expires}:{path}"
    return salted_hmac(_SALT, message, algorithm="sha256").hexdigest()


def ttl_pick(*candidates: int | None) -> int:
    """The smallest TTL asked for, else the default, capped at 24 h."""
    asked = [value for value in candidates if value is not None]
    return min(min(asked) if asked else DEFAULT_TTL, MAX_TTL)


def file_url_make(sandbox: Sandbox, *, path: str, op: str, ttl: int, now: float | None = None) -> FileUrl:
    """A URL on the sandbox's data plane that reads (`op="read"`) or writes one file."""
    expires = int((time.time() if now is None else now) + ttl)
    query = urlencode(
        {
            "path": path,
            "op": op,
            "expires": expires,
            "sig": _signature(sandbox, path=path, op=op, expires=expires),
        }
    )
    return FileUrl(
        method=OPERATIONS[op],
        path=path,
        url=f"{data_plane_url(sandbox)}{SIGNED_PATH}?{query}",
        expires_at=datetime.fromtimestamp(expires, tz=UTC),
    )


def file_url_check(sandbox: Sandbox, *, path: str, op: str, expires: str, sig: str) -> str | None:
    """None if the URL is valid now, else why not (for the 403 message)."""
    if op not in OPERATIONS or not path or not _EXPIRES.fullmatch(expires):  # ASCII digits only ("²")
        return "The signed URL is malformed."
    expected = _signature(sandbox, path=path, op=op, expires=int(expires))
    if not hmac.compare_digest(expected, sig):
        return "The signed URL's signature is invalid."
    if int(expires) <= time.time():
        return "The signed URL has expired."
    return None

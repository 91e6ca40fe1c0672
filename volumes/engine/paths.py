"""Checking what callers pass in: paths inside the volume (split into byte components),
permission modes, uids and gids."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .constants import MAX_NAME_BYTES, MAX_PATH_BYTES
from .errors import InvalidArgument, InvalidMode, InvalidPath


def split_path(path: str) -> list[bytes]:
    """Components of an absolute path inside the volume. ``.`` and one trailing ``/`` are
    dropped; ``..``, empty components (``//``), NUL, newlines and over-long names are
    refused. Nothing is URL-decoded: ``%2e%2e`` is a name like any other."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidPath(f"Path {path!r} must be absolute (start with /).")
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidPath("Path is not valid text.") from None
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidPath(f"Path is longer than {MAX_PATH_BYTES} bytes.")
    if raw == b"/":
        return []
    comps = [p for p in raw.removesuffix(b"/")[1:].split(b"/") if p != b"."]  # "/a/" names "/a"
    for comp in comps:
        if comp == b"":
            raise InvalidPath(f"Path {path!r} has an empty component (//).")
        if comp == b"..":
            raise InvalidPath(f"Path {path!r} must not contain '..'.")
        if any(c in comp for c in (b"\0", b"\n", b"\r")):
            raise InvalidPath("Path components must not contain NUL, newline or carriage return.")
        if len(comp) > MAX_NAME_BYTES:
            raise InvalidPath(f"A path component is longer than {MAX_NAME_BYTES} bytes.")
    return comps


def _join(comps: Sequence[bytes]) -> str:
    return "/" + b"/".join(comps).decode("utf-8", "surrogateescape")


def parse_mode(value: int | str) -> int:
    """Permission bits from 420, "0644", "644" or "0o644". setuid, setgid and sticky
    (up to 0o7777) are accepted: guests mount volumes nosuid, so they only round-trip."""
    if isinstance(value, bool):
        raise InvalidMode('mode must be an integer or an octal string such as "0644".')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (m := re.fullmatch(r"(?:0o)?([0-7]{1,6})", value)):
        number = int(m.group(1), 8)
    else:
        raise InvalidMode(f'mode {value!r} is not an octal permission such as "0644".')
    if not 0 <= number <= 0o7777:
        raise InvalidMode(f"mode {value!r} is outside 0000..7777.")
    return number


def _check_id(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not 0 <= value <= 2**32 - 2):
        raise InvalidArgument(f"{what} must be a whole number from 0 to {2**32 - 2}.")

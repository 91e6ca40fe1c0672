"""Database ids and counts from untrusted text (URL segments, query parameters, JSON values).

`str.isdigit()` is true for '²' and '١٢', and `int()` of 5000 digits raises; ids here are
ASCII digits within PostgreSQL's bigint, anything else is simply not an id.
"""

from __future__ import annotations

import re
from typing import Any

MAX_DB_ID = 2**63 - 1
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")


def db_id(raw: Any) -> int | None:
    """The id `raw` names (ASCII digits, or a JSON integer), or None if it names none."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and _ASCII_DIGITS.fullmatch(raw):
        value = int(raw)
    else:
        return None
    return value if 0 < value <= MAX_DB_ID else None


def count(raw: str, *, maximum: int = MAX_DB_ID) -> int | None:
    """A non-negative ASCII integer up to `maximum` (offsets, limits), or None."""
    if not _ASCII_DIGITS.fullmatch(raw):
        return None
    value = int(raw)
    return value if value <= maximum else None

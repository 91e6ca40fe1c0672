"""Naming mistakes instead of absorbing them: unknown keys and their closest known spelling.

Objects the platform defines (a lifecycle policy, a build spec, a volume body) refuse
every unknown key. Where a client may legitimately pass keys through (the top level of a
create, which the SDK fills with its own options), only near-misses of known keys are
refused: a typo there would otherwise silently change what the platform does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from watasu import errors

# How close a key must be to a known one to count as a misspelling of it.
NEAR_MISS = 0.75


def closest(key: str, known: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The known key ``key`` most resembles, compared case-insensitively, or None."""
    by_folded = {name.lower(): name for name in known}
    match = difflib.get_close_matches(key.lower(), list(by_folded), n=1, cutoff=cutoff)
    return by_folded[match[0]] if match else None


def _shape(key: str) -> str:
    """A key with case, `_` and `-` left out: `autoResume`, `auto-resume`, `AUTO_RESUME` alike."""
    return key.lower().replace("_", "").replace("-", "")


def _refuse(where: str, key: str, hint: str | None, known: list[str], code: str) -> errors.Invalid:
    field = f"{where}.{key}" if where else key
    if hint:
        message = f"Unknown key '{field}': did you mean '{hint}'?"
    else:
        message = f"Unknown key '{field}'; known keys: {', '.join(sorted(known))}."
    return errors.Invalid(
        message, code=code, errors=[message], field=field, **({"did_you_mean": hint} if hint else {})
    )


def refuse_unknown_keys(
    body: Mapping[str, Any], known: Iterable[str], *, where: str, code: str = "unknown_field"
) -> None:
    """422 naming the first key of ``body`` not in ``known``, with the closest known one."""
    known = list(known)
    for key in body:
        if key not in known:
            raise _refuse(where, str(key), closest(str(key), known), known, code)


def refuse_near_misses(
    body: Mapping[str, Any],
    known: Iterable[str],
    *,
    where: str = "",
    code: str = "unknown_field",
    meant: Mapping[str, str] | None = None,
) -> None:
    """422 for a key that is not known but is a close misspelling of one, or one of `meant`
    (keys other platforms use for one of ours: `cpu` for `cpu_count`); others pass."""
    known = list(known)
    by_shape = {_shape(alias): ours for alias, ours in (meant or {}).items()}
    for key in body:
        if key in known:
            continue
        hint = by_shape.get(_shape(str(key))) or closest(str(key), known, cutoff=NEAR_MISS)
        if hint is not None:
            raise _refuse(where, str(key), hint, known, code)

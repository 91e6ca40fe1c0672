"""Waiting on events, never on time.

Tests synchronise with what they await (a row recorded, a frame received, a port
answering) through `wait_until`, the one place in `tests/` allowed to sleep between
polls (`test_hygiene.py` enforces it). It imports nothing from Django so the SDK
scenarios, which run as their own programs, can use it too.

Timeouts are generous limits for a loaded 2-core machine running guests under TCG,
not expectations: a passing wait returns as soon as the event happens.
`WATASU_TEST_TIMEOUT_SCALE` multiplies every limit on a machine slower than ours
(`make test-stress` leaves it at 1: the hog is the load the limits are sized for).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.1


def timeout_scale() -> float:
    """How much longer than usual waits may take on this run (at least 1)."""
    try:
        return max(1.0, float(os.environ.get("WATASU_TEST_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    until: Callable[[T], object] = bool,
    seen: Callable[[], object] | None = None,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until `until` holds for its value (by default: it is truthy),
    and return that value.

    `what` names the awaited event; when `timeout` (seconds, times the run's scale)
    passes first, the failure says what was awaited and what was last seen: `seen()`
    when given, else the predicate's last value (a response, a list of frames).
    Exceptions of the `ignoring` types count as "not yet" (a server still starting
    refuses connections).
    """
    if not what:
        raise ValueError("wait_until needs a description of what it awaits")
    limit = timeout * timeout_scale()
    deadline = time.monotonic() + limit
    while True:
        try:
            value = predicate()
        except ignoring as error:
            last: object = error
        else:
            if until(value):
                return value
            last = value
        if time.monotonic() >= deadline:
            shown = seen() if seen is not None else last
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}; last seen: {shown!r}")
        time.sleep(POLL_SECONDS)

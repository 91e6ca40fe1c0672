"""The edge's thread pools: fast lookups, and auto-resumes that never block them.

A request for a paused sandbox with `auto_resume` must itself wait for the resume
(the SDKs do not retry a 503). Waiting happens on the event loop, not on a thread:
every request for one sandbox awaits the same resume (single flight, per web
process), which runs on a small pool of its own, so token and route lookups for
everyone else (their own pool) never queue behind resumes. A request waits at most
`EDGE_RESUME_WAIT_SECONDS`; past that it gets 503 `sandbox_overloaded` with
`Retry-After`, while the resume carries on and a retry finds the sandbox ready.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings

from sandboxes.edge import access
from sandboxes.edge.access import ResumeNeeded, Upstream

T = TypeVar("T")
RETRY_AFTER_SECONDS = 5
_lookups = ThreadPoolExecutor(max_workers=settings.EDGE_LOOKUP_THREADS, thread_name_prefix="edge-lookup")
_resumes = ThreadPoolExecutor(max_workers=settings.EDGE_RESUME_THREADS, thread_name_prefix="edge-resume")
_in_flight: dict[tuple[asyncio.AbstractEventLoop, int, str], asyncio.Future[Upstream]] = {}
stats = {"resumes_started": 0}


def in_flight() -> int:
    """Resumes running now (all event loops of this process)."""
    return len(_in_flight)


async def lookup(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a fast, synchronous lookup (the ORM) on the lookup threads."""
    return await asyncio.get_running_loop().run_in_executor(
        _lookups, functools.partial(function, *args, **kwargs)
    )


async def upstream(function: Callable[..., Upstream], *args: Any) -> Upstream:
    """`function`'s upstream, resuming the sandbox first when it says `ResumeNeeded`."""
    try:
        return await lookup(function, *args)
    except ResumeNeeded as needed:
        return await resumed(needed.sandbox_id, needed.role)


def _retrieve(future: asyncio.Future[Upstream]) -> None:
    if not future.cancelled():
        future.exception()  # every waiter may have given up: the outcome is still consumed


async def resumed(sandbox_id: int, role: str) -> Upstream:
    """Wait (bounded) for the one resume of this sandbox, starting it if none runs."""
    loop = asyncio.get_running_loop()
    key = (loop, sandbox_id, role)
    future = _in_flight.get(key)
    if future is None:
        bound = settings.EDGE_RESUME_WAIT_SECONDS
        # The resume outlives its first waiter by a little, never by a stuck neighbour's 120 s.
        future = loop.run_in_executor(_resumes, access.resume_upstream, sandbox_id, role, bound + 5.0)
        _in_flight[key] = future
        future.add_done_callback(lambda done: (_in_flight.pop(key, None), _retrieve(done)))
        stats["resumes_started"] += 1
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=settings.EDGE_RESUME_WAIT_SECONDS)
    except TimeoutError:
        error = access.overloaded(
            f"Sandbox {sandbox_id} is still resuming; retry in {RETRY_AFTER_SECONDS} s."
        )
        error.headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        raise error from None

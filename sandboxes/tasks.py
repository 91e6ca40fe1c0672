"""Celery tasks of the sandboxes app: the sweeps beat starts (see settings.CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from sandboxes import hostcalls  # noqa: F401  (registers the host step task)


@shared_task(name="sweeps.run", bind=True, acks_late=False, time_limit=900)
def sweep_task(self: Any, name: str) -> dict[str, Any]:
    """Run one sweep; while it stops at its batch bound, queue it again right away."""
    from sandboxes.sweeps import sweep_run

    result = sweep_run(name)
    if result.get("more"):
        self.apply_async(args=[name], expires=float(settings.SWEEP_INTERVAL_SECONDS[name]))
    return result


@shared_task(
    name="sandboxes.network_apply",
    autoretry_for=(Exception,),
    retry_backoff=1,
    retry_backoff_max=60,
    max_retries=None,
    acks_late=True,
)
def network_apply(sandbox_id: int) -> bool:
    """Apply a sandbox's recorded network policy the host could not take at once; retried
    (backing off to a minute) until it is in force or the sandbox stopped running."""
    from sandboxes.services import sandbox_network_retry

    return sandbox_network_retry(sandbox_id)


# --- the host worker (`make host`, sandboxes/hosts.py) -----------------------------------------


@worker_ready.connect
def _host_worker_ready(**_: Any) -> None:
    """A host worker registers its host and starts its heartbeat once it consumes its queue."""
    if not settings.HOST_WORKER:
        return
    import sandboxes.network
    import sandboxes.pool
    import sandboxes.runtime.vm
    import sandboxes.sweeps  # noqa: F401
    from sandboxes.hosts import host_register_worker, start_heartbeat

    host = host_register_worker()
    start_heartbeat(host)

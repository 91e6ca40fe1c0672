"""VM hosts: a worker per host, its registration and heartbeat, and its health.

Each VM host runs one Celery worker of its own (`manage.py host_worker`, `make host`) that
consumes the host's queue (``host.<name>``), owns its libvirt connection and its data
directory, and runs every step touching them (`sandboxes.hostcalls`). On start the worker
registers its host (name, address, data directory, capacity, queue) and then writes a
heartbeat every WATASU_HOST_HEARTBEAT_SECONDS with what it measured (free memory as
libvirt sees it, free disk), which placement reads instead of asking the host.

The hosts sweep marks a host whose heartbeat is older than WATASU_HOST_DOWN_AFTER_SECONDS
`down` (no placements) and its sandboxes unreachable (``Sandbox.reachable``: their state is
kept, nothing is destroyed, the edge answers 503 for them), and both back when the
heartbeat returns. A host driven in-process (the embedded mode) is judged by whether its
libvirt answers. `draining` (the admin's action) stops placements on a host and lets its
sandboxes run and end.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections
from django.db.models import Count
from django.utils import timezone

from sandboxes.hostcalls import host_step
from sandboxes.models import RUNTIME_STATES, Host, HostState, Sandbox, SandboxState
from watasu.sweeps import Result

logger = logging.getLogger(__name__)

S = SandboxState
# Sandboxes a silent host strands: everything that still has a VM or is about to.
STRANDED_STATES = (*RUNTIME_STATES, S.STOPPED, S.STOPPING, S.RESTORING)


def queue_name(name: str) -> str:
    return f"host.{name}"


def _check_address(address: str) -> str:
    """A host's agents listen on its address and their only check is the per-sandbox secret:
    the address must be loopback or private (a private network or VPN between the web
    processes and the hosts), never a public one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise ImproperlyConfigured(f"WATASU_HOST_ADDRESS {address!r} is not an IP address") from exc
    if not (ip.is_loopback or ip.is_private) or ip.is_unspecified:
        raise ImproperlyConfigured(
            f"WATASU_HOST_ADDRESS {address} is not a loopback or private address; agent ports must "
            "never listen on a public one (put the hosts and the web processes on a private network)"
        )
    return address


def host_register_worker() -> Host:
    """Register (or refresh) this machine's host as one driven by its own worker.

    Capacity comes from the settings at first registration only (operators' edits in the
    admin last); an operator's drain stays."""
    name = settings.RUNTIME_HOST_NAME
    fields = {
        "libvirt_uri": settings.RUNTIME_LIBVIRT_URI,
        "data_dir": str(settings.RUNTIME_HOST_DATA_DIR),
        "address": _check_address(settings.RUNTIME_HOST_ADDRESS),
        "queue": queue_name(name),
        "vm_prefix": settings.RUNTIME_VM_PREFIX,
    }
    host, created = Host.objects.get_or_create(
        name=name,
        defaults={
            **fields,
            "cpu_capacity": settings.RUNTIME_HOST_CPU_CAPACITY,
            "memory_capacity_mb": settings.RUNTIME_HOST_MEMORY_CAPACITY_MB,
        },
    )
    if not created:
        Host.objects.filter(pk=host.pk).update(**fields)
    if (Path(settings.DATA_DIR) / "artifact-store").as_uri() == settings.ARTIFACT_STORE:
        logger.warning(
            "host %s: WATASU_ARTIFACT_STORE is this host's own directory (the default): other hosts "
            "cannot pull the templates it builds; set it to the deployment's shared store",
            name,
        )
    Path(host.data_dir if created else fields["data_dir"]).mkdir(parents=True, exist_ok=True)
    host_heartbeat(host)
    host.refresh_from_db()
    return host


def host_heartbeat(host: Host, now: datetime | None = None) -> bool:
    """Record that the host's worker is alive, with its measured free memory and disk.
    False (nothing written, so the host goes down) when its libvirt does not answer."""
    from sandboxes.runtime import driver_for

    try:
        driver = driver_for(host)
        if not driver.alive():
            return False
        available = driver.memory_available_mb()
    except Exception:
        logger.warning("host %s: libvirt does not answer; no heartbeat", host.name, exc_info=True)
        return False
    stats = os.statvfs(host.data_dir)
    Host.objects.filter(pk=host.pk).update(
        last_seen_at=now or timezone.now(),
        memory_available_mb=max(available, 0),
        disk_free_bytes=stats.f_bavail * stats.f_frsize,
    )
    return True


def start_heartbeat(host: Host) -> threading.Thread:
    """The worker's heartbeat thread (a daemon: it ends with the worker)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(settings.HOST_HEARTBEAT_SECONDS):
            try:
                close_old_connections()
                host_heartbeat(host)
            except Exception:  # the database away for a moment: the next beat tries again
                logger.warning("host %s: heartbeat failed", host.name, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{host.name}", daemon=True)
    thread.start()
    return thread


@host_step
def physical_memory_mb(host: Host) -> int:
    """The host's RAM as libvirt reports it (the admin's check on a capacity edit)."""
    from sandboxes.runtime import driver_for

    return driver_for(host).memory_mb()


# --- health -----------------------------------------------------------------------------------


def _alive(host: Host, now: datetime) -> bool:
    if host.queue:
        fresh = now - timedelta(seconds=settings.HOST_DOWN_AFTER_SECONDS)
        return host.last_seen_at is not None and host.last_seen_at >= fresh
    from sandboxes.runtime import driver_for

    try:
        alive = driver_for(host).alive()
    except Exception:  # cannot even connect
        alive = False
    if alive:
        Host.objects.filter(pk=host.pk).update(last_seen_at=now)
    return alive


def host_health_sweep(*, now: datetime | None = None) -> Result:
    """Mark silent hosts down and their sandboxes unreachable; both back when they answer."""
    now = now or timezone.now()
    report: dict[str, object] = {}
    for host in Host.objects.all():
        on_host = Sandbox.objects.filter(host=host, state__in=STRANDED_STATES)
        if _alive(host, now):
            Host.objects.filter(pk=host.pk, state=HostState.DOWN).update(state=HostState.UP)
            back = on_host.filter(reachable=False).update(reachable=True)
            if back or host.state == HostState.DOWN:
                logger.warning("host %s answers again; %s sandboxes reachable again", host.name, back)
            report[host.name] = "up" if host.state != HostState.DRAINING else "draining"
            continue
        # A draining host stays draining (it takes no placements either way), so the
        # operator's drain outlives an outage instead of ending as `up` when it returns.
        went_down = Host.objects.filter(pk=host.pk, state=HostState.UP).update(state=HostState.DOWN)
        newly = on_host.filter(reachable=True).update(reachable=False)
        stranded = {
            row["state"]: row["n"]
            for row in on_host.values("state").annotate(n=Count("pk")).order_by("state")
        }
        report[host.name] = {"state": "down", "sandboxes": stranded}
        log = logger.error if went_down or newly else logger.info  # said once, not on every run while away
        log("host %s does not answer; marked down; sandboxes on it: %s", host.name, stranded)
    return {"hosts": report, "more": False}

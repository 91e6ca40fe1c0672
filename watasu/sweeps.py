"""The one registry of sweeps: every app registers the periodic jobs and hooks it owns.

Each app does so in its `AppConfig.ready()`, so no sweep reaches into another app's
internals: the sandboxes app registers its sweeps (deadlines, stuck, reconcile, hosts,
retention), the templates app its builds sweep and its part of retention and
reconciliation, the teams app the expiry of idempotency records. Intervals (and so the
beat schedule) stay in settings (`SWEEP_INTERVAL_SECONDS`); a sweep without one is refused.
`sandboxes.sweeps.sweep_run` runs a registered sweep and records it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

Result = dict[str, Any]
Sweep = Callable[..., Result]
# Retention hooks: delete what the app keeps past its time; counts, and "more" when a
# batch bound stopped them.
RetentionHook = Callable[[datetime], Result]
# Domain owners: of the VM names no sandbox owns, those the app still needs (the rest
# are destroyed by reconciliation).
DomainOwner = Callable[[list[str]], set[str]]

SWEEPS: dict[str, Sweep] = {}
_retention_hooks: list[RetentionHook] = []
_domain_owners: list[DomainOwner] = []


def register_sweep(name: str, sweep: Sweep) -> None:
    """Make ``sweep`` runnable as ``name`` (beat, admin, `manage.py sweep`), in settings' order."""
    order = list(settings.SWEEP_INTERVAL_SECONDS)
    if name not in order:
        raise ImproperlyConfigured(f"sweep {name!r} has no interval in SWEEP_INTERVAL_SECONDS")
    registered = {**SWEEPS, name: sweep}
    SWEEPS.clear()
    SWEEPS.update(sorted(registered.items(), key=lambda item: order.index(item[0])))


def register_retention(hook: RetentionHook) -> None:
    """Run ``hook`` as part of the retention sweep."""
    if hook not in _retention_hooks:
        _retention_hooks.append(hook)


def register_domain_owner(owner: DomainOwner) -> None:
    """Ask ``owner`` which VMs it still needs before reconciliation destroys unowned ones."""
    if owner not in _domain_owners:
        _domain_owners.append(owner)


def retention_hooks() -> tuple[RetentionHook, ...]:
    return tuple(_retention_hooks)


def owned_domains(names: list[str]) -> set[str]:
    """Those of ``names`` some app still needs."""
    return set().union(*(owner(names) for owner in _domain_owners)) if names else set()

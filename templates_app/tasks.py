"""Celery tasks of the templates app: thin wrappers that call a service."""

from __future__ import annotations

from celery import shared_task

from templates_app.services import base_template_ensure


@shared_task(name="templates.base_template_ensure", acks_late=True, time_limit=1800)
def base_template_ensure_task() -> int:
    """Build or repair the `base` template on this worker's host; returns the version id."""
    return base_template_ensure().pk


@shared_task(name="templates.build", acks_late=True, time_limit=3600)
def template_build_task(version_id: int) -> None:
    """Build one template version (idempotent: only a draft version is claimed)."""
    from templates_app.builds import template_build_run

    template_build_run(version_id=version_id)


@shared_task(name="templates.provider_template_ensure", acks_late=True, time_limit=3600)
def provider_template_ensure_task(slug: str) -> int:
    """Queue (or find) the build of one provider template; returns its version id."""
    from templates_app.provider import provider_template_ensure

    return provider_template_ensure(slug, wait=False).pk


# Not retried by Celery: a failed make backs off and is asked for again by the next create.
@shared_task(name="templates.shape_snapshot", acks_late=True, time_limit=3600)
def shape_snapshot_task(version_id: int, cpu: int, memory_mb: int) -> str:
    """Make a template version's memory snapshot in another shape; returns what happened."""
    from templates_app.shapes import make

    return make(version_id, cpu, memory_mb)

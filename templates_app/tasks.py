"""Celery tasks of the templates app: thin wrappers that call a service."""

from __future__ import annotations

from celery import shared_task

from templates_app.services import base_template_ensure


@shared_task(name="templates.base_template_ensure", acks_late=True, time_limit=1800)
def base_template_ensure_task() -> int:
    """Build or repair the `base` template on this worker's host; returns the version id."""
    return base_template_ensure().pk

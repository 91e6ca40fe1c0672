"""Self-hostable, Watasu-compatible sandbox platform."""

from watasu.celery import app as celery_app

__all__ = ["celery_app"]

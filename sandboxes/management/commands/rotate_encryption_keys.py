"""Re-encrypt every stored secret with the first of WATASU_ENCRYPTION_KEYS."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction
from django.db.models import QuerySet

from sandboxes.models import Sandbox
from teams.models import IdempotencyRecord, TotpDevice
from templates_app.models import TemplateVersion
from watasu import crypto

BATCH = 500


class Command(BaseCommand):
    help = (
        "Re-encrypt sandbox env vars, agent secrets, template build env, stored idempotent "
        "responses and two-factor secrets with the first key of WATASU_ENCRYPTION_KEYS; then "
        "the other keys may go."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        sandboxes = _rotate(
            Sandbox.objects.exclude(env_vars_encrypted="", agent_secret_encrypted=""),
            ["env_vars_encrypted", "agent_secret_encrypted"],
        )
        versions = _rotate(TemplateVersion.objects.exclude(env_encrypted=""), ["env_encrypted"])
        records = _rotate(IdempotencyRecord.objects.exclude(response_body=None), ["response_body"])
        devices = _rotate(TotpDevice.objects.all(), ["secret_encrypted"])
        self.stdout.write(
            f"re-encrypted {sandboxes} sandboxes, {versions} template versions, "
            f"{records} idempotency records and {devices} two-factor secrets"
        )


def _rotate(rows: QuerySet[Any], fields: list[str]) -> int:
    """Re-encrypt `fields` of every row in `rows`, each row under its own lock."""
    model, done = rows.model, 0
    for pk in rows.values_list("pk", flat=True).iterator(chunk_size=BATCH):
        with transaction.atomic():
            row = model.objects.select_for_update().get(pk=pk)
            model.objects.filter(pk=pk).update(**{name: _rotated(getattr(row, name)) for name in fields})
        done += 1
    return done


def _rotated(value: Any) -> Any:
    if not value:
        return value
    if isinstance(value, bytes | memoryview):
        return crypto.rotate_bytes(bytes(value))
    return crypto.rotate_text(value)

"""Re-encrypt every stored secret with the first of WATASU_ENCRYPTION_KEYS."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from sandboxes.models import Sandbox
from teams.models import IdempotencyRecord
from templates_app.models import TemplateVersion
from watasu import crypto

BATCH = 500


class Command(BaseCommand):
    help = ("Re-encrypt sandbox env vars, agent secrets, template build env and stored idempotent "
            "responses with the first key of WATASU_ENCRYPTION_KEYS; then the other keys may go.")

    def handle(self, *args: Any, **options: Any) -> None:
        sandboxes = records = 0
        for pk in Sandbox.objects.exclude(env_vars_encrypted="", agent_secret_encrypted="").values_list(
                "pk", flat=True).iterator(chunk_size=BATCH):
            with transaction.atomic():
                row = Sandbox.objects.select_for_update().get(pk=pk)
                Sandbox.objects.filter(pk=pk).update(
                    env_vars_encrypted=crypto.rotate_text(row.env_vars_encrypted),
                    agent_secret_encrypted=crypto.rotate_text(row.agent_secret_encrypted))
            sandboxes += 1
        for pk in IdempotencyRecord.objects.exclude(response_body=None).values_list(
                "pk", flat=True).iterator(chunk_size=BATCH):
            with transaction.atomic():
                row = IdempotencyRecord.objects.select_for_update().get(pk=pk)
                body = bytes(row.response_body or b"")
                IdempotencyRecord.objects.filter(pk=pk).update(
                    response_body=crypto.rotate_text(body.decode()).encode())
            records += 1
        versions = 0
        for pk in TemplateVersion.objects.exclude(env_encrypted="").values_list("pk", flat=True).iterator(
                chunk_size=BATCH):
            with transaction.atomic():
                row = TemplateVersion.objects.select_for_update().get(pk=pk)
                TemplateVersion.objects.filter(pk=pk).update(env_encrypted=crypto.rotate_text(row.env_encrypted))
            versions += 1
        self.stdout.write(f"re-encrypted {sandboxes} sandboxes, {versions} template versions and "
                          f"{records} idempotency records")

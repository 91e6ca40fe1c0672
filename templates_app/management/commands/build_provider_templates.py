"""`build_provider_templates`: build (or queue) the platform's templates beyond `base`."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from templates_app.models import VersionStatus
from templates_app.provider import SLUGS, provider_template_ensure


class Command(BaseCommand):
    help = (
        "Build the provider templates (code-interpreter, mcp-gateway) through the template build "
        "pipeline, or with --queue hand them to a build worker; a no-op for those already ready."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slugs", nargs="*", help=f"any of {', '.join(SLUGS)} (default: all)")
        parser.add_argument(
            "--queue", action="store_true", help="queue missing builds for a worker instead of building here"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        unknown = sorted(set(options["slugs"]) - set(SLUGS))
        if unknown:
            raise CommandError(f"not provider templates: {', '.join(unknown)} (known: {', '.join(SLUGS)})")
        failed = []
        for slug in options["slugs"] or SLUGS:
            started = time.monotonic()
            version = provider_template_ensure(slug, wait=not options["queue"])
            self.stdout.write(
                f"{slug}:{version.version} {version.status} [{time.monotonic() - started:.1f} s]"
                + (f": {version.last_error_message}" if version.status == VersionStatus.FAILED else "")
            )
            if version.status == VersionStatus.FAILED:
                failed.append(slug)
        if failed:
            raise CommandError(f"failed to build: {', '.join(failed)}")

"""`build_base_image`: build (or verify) the guest image and the `base` template snapshot."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand

from templates_app.services import base_template_ensure


class Command(BaseCommand):
    help = (
        "Build the Debian guest image (cached under WATASU_IMAGE_CACHE_DIR) and the ready "
        "`base` template version with its memory snapshot; a no-op when both are intact."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        version = base_template_ensure()
        self.stdout.write(
            f"{version.template.slug}:{version.version} {version.status} "
            f"({version.size_bytes // 2**20} MiB) in {version.artifact_dir} "
            f"[{time.monotonic() - started:.1f} s]"
        )

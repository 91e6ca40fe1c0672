"""`register_local_host`: make this machine a placement target (embedded mode)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from sandboxes.services import host_register_local


class Command(BaseCommand):
    help = "Register this machine as a libvirt host using the WATASU_HOST_* settings."

    def handle(self, *args: Any, **options: Any) -> None:
        host = host_register_local()
        self.stdout.write(
            f"host {host.name}: {host.libvirt_uri}, {host.cpu_capacity} vCPU, "
            f"{host.memory_capacity_mb} MB, data in {host.data_dir}"
        )

"""`manage.py sweep [name ...] [--all] [--until-done]`: run sweeps now, print what they did."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes.sweeps import SWEEPS, sweep_run


class Command(BaseCommand):
    help = f"Run maintenance sweeps now ({', '.join(SWEEPS)}); what beat runs on a schedule."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", help="sweeps to run (default: list them)")
        parser.add_argument("--all", action="store_true", help="run every sweep")
        parser.add_argument(
            "--until-done",
            action="store_true",
            help="repeat a sweep while it reports more work (full batches)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        names = list(SWEEPS) if options["all"] else options["names"]
        if not names:
            for name, function in SWEEPS.items():
                self.stdout.write(f"{name:10} {(function.__doc__ or '').strip().splitlines()[0]}")
            return
        unknown = [name for name in names if name not in SWEEPS]
        if unknown:
            raise CommandError(f"unknown sweep(s) {', '.join(unknown)}; sweeps: {', '.join(SWEEPS)}")
        for name in names:
            while True:
                result = sweep_run(name)
                self.stdout.write(f"{name}: {json.dumps(result, default=str)}")
                if not (options["until_done"] and result.get("more")):
                    break

"""`dev_api_key --file F`: the write key for the local dev team, made once.

`make run` prints a usable key on every start without minting a new one each
time: the key is kept (mode 0600) in the data directory and re-checked.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from teams.services import api_key_authenticate


class Command(BaseCommand):
    help = "Print the dev team's write API key, creating it on first use."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--file", required=True, type=Path)
        parser.add_argument("--email", default="dev@localhost.localdomain")
        parser.add_argument("--team", default="dev")

    def handle(self, *args: Any, file: Path, email: str, team: str, **_: Any) -> None:
        if file.exists():
            raw = file.read_text().strip()
            if raw and api_key_authenticate(raw_key=raw) is not None:
                self.stdout.write(raw)
                return
        out = io.StringIO()
        call_command("create_api_key", email=email, team=team, scope="write", name="make run", stdout=out)
        raw = out.getvalue().strip()
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(raw + "\n")
        self.stdout.write(raw)

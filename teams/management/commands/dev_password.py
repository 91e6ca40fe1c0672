"""`dev_password --file F`: the dev user's dashboard password, set once.

`make run` prints how to sign in to the dashboard as the user whose key it prints. The
password is random, kept (mode 0600) in the data directory, and set again only when the
user's password no longer matches it (an operator changed it: then nothing is printed).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from teams.services import user_get_or_create


class Command(BaseCommand):
    help = "Print the dev user's dashboard password, setting one on first use."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--file", required=True, type=Path)
        parser.add_argument("--email", default="dev@localhost.localdomain")

    def handle(self, *args: Any, file: Path, email: str, **_: Any) -> None:
        user = user_get_or_create(email=email)
        kept = file.read_text().strip() if file.exists() else ""
        if kept and user.check_password(kept):
            self.stdout.write(kept)
            return
        if kept or user.has_usable_password():
            return  # someone set their own password: keep it, print nothing
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        user.save(update_fields=["password"])
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        self.stdout.write(password)

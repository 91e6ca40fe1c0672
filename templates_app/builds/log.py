"""A build's log, written to the database while the build runs."""

from __future__ import annotations

import time

from django.db.models import Max
from django.utils import timezone

from templates_app.models import BuildLogEntry, TemplateVersion


class BuildLog:
    """A version's build log, written to the database as lines arrive.

    One build writes one version's log, so indexes are counted here; lines are
    flushed in small batches (at most every ``FLUSH_SECONDS``) so a chatty step
    costs a few inserts a second, and readers see output while the step runs.
    """

    FLUSH_SECONDS, FLUSH_LINES = 0.5, 200

    def __init__(self, version: TemplateVersion) -> None:
        self.version = version
        last = version.log_entries.aggregate(m=Max("index"))["m"]
        self.next_index = 0 if last is None else last + 1
        self.pending: list[BuildLogEntry] = []
        self.flushed_at = time.monotonic()
        self.partial: dict[str, bytes] = {}

    def add(self, message: str, level: str = "info") -> None:
        self.pending.append(
            BuildLogEntry(
                version=self.version,
                index=self.next_index,
                at=timezone.now(),
                level=level,
                message=message[:20000],
            )
        )
        self.next_index += 1
        if len(self.pending) >= self.FLUSH_LINES or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def output(self, stream: str, data: bytes) -> None:
        """Raw process output: complete lines are logged, a partial line waits for its end."""
        lines = (self.partial.pop(stream, b"") + data).split(b"\n")
        self.partial[stream] = lines.pop()
        for line in lines:
            self.add(line.decode(errors="replace").rstrip("\r"), "debug")

    def end_output(self) -> None:
        for stream in list(self.partial):
            rest = self.partial.pop(stream)
            if rest:
                self.add(rest.decode(errors="replace"), "debug")

    def flush(self) -> None:
        if self.pending:
            BuildLogEntry.objects.bulk_create(self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()

"""A process's output as events: the retained log's entries, and the bounded backlog of
one attached socket (which is declared lagged rather than ever blocking the process)."""

from __future__ import annotations

import base64
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

SUBSCRIBER_BYTES = 4 * 1024 * 1024  # per-socket backlog before it is declared lagged


def utf8_split(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 sequence.

    Output frames are decoded per chunk by the SDK, so a split multi-byte character
    would show as two replacement characters; we hold back at most 3 bytes.
    """
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:
            return n
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n


@dataclass
class Event:
    """One entry of a process's event log; ``cursor`` is its position."""

    cursor: int
    kind: str  # stdout | stderr | pty | exit
    data: bytes = b""
    exit: dict[str, Any] | None = None

    def frame(self) -> dict[str, Any]:
        if self.kind == "exit":
            return {"type": "exit", "cursor": self.cursor, **(self.exit or {})}
        return {"type": self.kind, "cursor": self.cursor, "data": base64.b64encode(self.data).decode()}


class Subscriber:
    """Bounded backlog of live events for one attached socket.

    The process reader never blocks on a slow socket: when the backlog is full the
    subscriber is marked lagged and stops receiving; its socket then sends ``lagged``
    and the client reconnects with ``since=`` to replay from the retained log.
    """

    def __init__(self, limit: int = SUBSCRIBER_BYTES) -> None:
        self.items: deque[Event] = deque()
        self.bytes = 0
        self.limit = limit
        self.lagged = False
        self.dropped = 0
        self.closed = False
        self.cond = threading.Condition()

    def push(self, ev: Event) -> None:
        with self.cond:
            if self.closed:
                return
            if self.lagged or (self.items and self.bytes + len(ev.data) > self.limit):
                self.lagged = True
                self.dropped += 1
            else:
                self.items.append(ev)
                self.bytes += len(ev.data)
            self.cond.notify_all()

    def pop(self, timeout: float) -> Event | None:
        """Next event, or None on timeout / when lagged-and-drained / closed."""
        with self.cond:
            if not self.items and not self.lagged and not self.closed:
                self.cond.wait(timeout)
            if self.items:
                ev = self.items.popleft()
                self.bytes -= len(ev.data)
                return ev
            return None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

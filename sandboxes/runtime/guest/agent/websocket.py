"""The server side of RFC 6455 WebSocket connections."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
from typing import Any

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_MESSAGE = 64 * 1024 * 1024


class WsClosed(Exception):
    """The peer closed the WebSocket or the connection broke."""


class WebSocket:
    """Server side of one upgraded connection; sends text frames only (the SDK rejects binary).

    Reads come from the handler's buffered ``rfile`` (one reader thread at a time); writes
    are serialised by a lock so a process pump and a frame reader can both send.
    """

    def __init__(self, rfile: Any, sock: socket.socket) -> None:
        self.rfile, self.sock = rfile, sock
        self.send_lock = threading.Lock()
        self.close_sent = False
        self.closed = False

    @staticmethod
    def accept_key(key: str) -> str:
        return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n) if n else b""
        if len(data) < n:
            self.closed = True
            raise WsClosed("connection closed mid-frame")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b1, b2 = self._read(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        if n > WS_MAX_MESSAGE:
            self.close(1009)
            raise WsClosed("frame too large")
        mask = self._read(4) if b2 & 0x80 else b""
        payload = self._read(n)
        if mask and n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return bool(b1 & 0x80), b1 & 0x0F, payload

    def recv(self) -> str | None:
        """Next complete data message as text; ``None`` once the peer has closed."""
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                fin, op, payload = self._frame()
                if op == 0x9:  # ping
                    self._send(0xA, payload)
                    continue
                if op == 0xA:  # pong
                    continue
                if op == 0x8:  # close: echo the code and stop
                    self.closed = True
                    self.close(struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1000)
                    return None
                if op in (0x1, 0x2):
                    parts, size = [payload], len(payload)
                elif op == 0x0:
                    parts.append(payload)
                    size += len(payload)
                if size > WS_MAX_MESSAGE:  # fragments count together, checked as they arrive
                    self.close(1009)
                    raise WsClosed("message too large")
                if fin:
                    return b"".join(parts).decode("utf-8", "replace")
        except (OSError, ValueError, WsClosed):
            self.closed = True
            return None

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            header = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        with self.send_lock:
            if self.close_sent:
                raise WsClosed("close already sent")
            if opcode == 0x8:
                self.close_sent = True
            try:
                self.sock.sendall(header + payload)
            except OSError as e:
                self.closed = True
                raise WsClosed(str(e)) from e

    def send_json(self, payload: dict[str, Any]) -> None:
        self._send(0x1, json.dumps(payload, separators=(",", ":")).encode())

    def close(self, code: int = 1000) -> None:
        """Send a close frame once (errors ignored: the peer may be gone already)."""
        with contextlib.suppress(WsClosed):
            self._send(0x8, struct.pack(">H", code))

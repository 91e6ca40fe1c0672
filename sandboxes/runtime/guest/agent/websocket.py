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
WS_MAX_MESSAGE = 64 * 1024 * 1024  # one message, all its fragments together
OPCODES = {0x0, 0x1, 0x2, 0x8, 0x9, 0xA}


class WsClosed(Exception):
    """The peer closed the WebSocket or the connection broke."""


class WsFail(Exception):
    """The peer broke RFC 6455: the connection is failed with close ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def close_reply(payload: bytes) -> int:
    """The code to answer a client's close frame with: its own, or 1002/1007 for a bad one."""
    if not payload:
        return 1000
    if len(payload) == 1:
        return 1002
    code = struct.unpack(">H", payload[:2])[0]
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return 1002
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return 1007
    return code


def message_text(opcode: int, data: bytes) -> str:
    """A text message must be UTF-8 (else 1007); binary ones are read as text leniently."""
    if opcode == 0x2:
        return data.decode("utf-8", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WsFail(1007, "text message is not valid UTF-8") from e


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

    def _read(self, n: int, *, first: bool = False) -> bytes:
        data = self.rfile.read(n) if n else b""
        if len(data) < n:
            self.closed = True
            if first and not data:
                raise WsClosed("connection closed")
            raise WsFail(1002, "connection closed mid-frame")
        return data

    def _frame(self, budget: int) -> tuple[bool, int, bytes]:
        """One frame from the client, checked before its payload is read: masked, no
        reserved bits, a known opcode, control frames whole and at most 125 bytes, data
        frames within ``budget`` (what is left of the message limit)."""
        b1, b2 = self._read(2, first=True)
        fin, op, n = bool(b1 & 0x80), b1 & 0x0F, b2 & 0x7F
        if b1 & 0x70:
            raise WsFail(1002, "reserved bits set, and no extension was negotiated")
        if op not in OPCODES:
            raise WsFail(1002, f"unknown opcode {op:#x}")
        if not b2 & 0x80:
            raise WsFail(1002, "client frames must be masked")
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
            if n >> 63:
                raise WsFail(1002, "frame length has its most significant bit set")
        if op & 0x8 and (not fin or n > 125):
            raise WsFail(1002, "control frames must not be fragmented and carry at most 125 bytes")
        if not op & 0x8 and n > budget:
            raise WsFail(1009, f"message over {WS_MAX_MESSAGE} bytes")
        mask = self._read(4)
        payload = self._read(n)
        if n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return fin, op, payload

    def recv(self) -> str | None:
        """Next complete data message as text; ``None`` once the connection is over (the
        peer closed, or broke the protocol and was sent a close frame with its RFC 6455 code)."""
        parts: list[bytes] = []
        size, opcode = 0, 0
        try:
            while True:
                fin, op, payload = self._frame(WS_MAX_MESSAGE - size)
                if op == 0x9:  # ping
                    self._send(0xA, payload)
                    continue
                if op == 0xA:  # pong
                    continue
                if op == 0x8:  # close: echo the code and stop
                    self.closed = True
                    self.close(close_reply(payload))
                    return None
                if (op == 0x0) == (opcode == 0):
                    raise WsFail(
                        1002,
                        "continuation frame without a message"
                        if op == 0x0
                        else "a new message inside a fragmented one",
                    )
                opcode = opcode or op
                parts.append(payload)
                size += len(payload)  # fragments count together: ``_frame`` checks the rest
                if fin:
                    return message_text(opcode, b"".join(parts))
        except WsFail as e:
            self.closed = True
            self.close(e.code)
            return None
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

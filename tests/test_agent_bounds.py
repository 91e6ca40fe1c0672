"""The guest agent's parsing is bounded and strict: malformed or oversized input, sent byte
for byte over a raw socket, gets a clean 4xx (HTTP) or a close frame with the RFC 6455 code
(WebSocket), and the agent goes on serving other clients.

The agent is the real one (the zipapp the image holds, run on the host): no VM needed.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import pytest

from sandboxes.runtime.agent_client import AgentClient
from sandboxes.runtime.guest.agent.websocket import WS_MAX_MESSAGE
from tests.edge_support import RealAgent

SECRET = "bounds-agent-secret-" + "s" * 20
AUTH = f"Authorization: Bearer {SECRET}\r\n".encode()
WRITE_FILES = b"POST /runtime/v1/files/write_files HTTP/1.1\r\nHost: agent\r\n" + AUTH


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


def _send(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` as is and read until the agent closes the connection."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # the agent hung up on unread input, after its answer
    return bytes(received)


def _http_answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def _still_serving(port: int) -> None:
    """Other clients still get answers: health, and a command run through the data plane."""
    client = AgentClient(port, secret=SECRET)
    assert client.health()
    assert client.exec("echo still-serving")["stdout"] == "still-serving\n"


MALFORMED_HTTP = {
    "request line over 16 KiB": (
        b"GET /" + b"a" * 16 * 1024 + b" HTTP/1.1\r\nHost: agent\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "header line over 16 KiB": (
        b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 16 * 1024 + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    "101 header fields": (
        b"GET /health HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n",
        431,
        "header_too_large",
    ),
    "headers over 64 KiB in all": (
        b"GET /health HTTP/1.1\r\n"
        + b"".join(b"X-B%d: " % i + b"b" * 9000 + b"\r\n" for i in range(8))
        + b"\r\n",
        431,
        "header_too_large",
    ),
    "request line that is not one": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "negative Content-Length": (WRITE_FILES + b"Content-Length: -1\r\n\r\n", 400, "bad_request"),
    "garbage Content-Length": (WRITE_FILES + b"Content-Length: 12abc\r\n\r\n", 400, "bad_request"),
    "non-ASCII digit Content-Length": (WRITE_FILES + b"Content-Length: \xb2\r\n\r\n", 400, "bad_request"),
    "underscored Content-Length": (WRITE_FILES + b"Content-Length: 1_0\r\n\r\n", 400, "bad_request"),
    "conflicting Content-Lengths": (
        WRITE_FILES + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        "bad_request",
    ),
    "Content-Length and chunked": (
        WRITE_FILES + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "unknown transfer coding": (
        WRITE_FILES + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "not_implemented",
    ),
    "JSON body over 64 MiB declared": (
        WRITE_FILES + b"Content-Length: 67108865\r\n\r\n{",
        413,
        "payload_too_large",
    ),
    "chunk size not hex": (WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request"),
    "chunk size with a sign": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n+2\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "chunk size with 0x": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "chunk size of 16 hex digits": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 16 + b"\r\n",
        400,
        "bad_request",
    ),
    "chunk size line over 4 KiB": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n2;" + b"x" * 5000 + b"\r\n",
        400,
        "bad_request",
    ),
    "chunk data without its CRLF": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
        400,
        "bad_request",
    ),
    "chunks over the JSON limit": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n4000001\r\n",
        413,
        "payload_too_large",
    ),
    "33 trailer fields": (
        WRITE_FILES + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + b"X-T: 1\r\n" * 33 + b"\r\n",
        431,
        "header_too_large",
    ),
    "257 query fields": (
        b"GET /runtime/v1/files?"
        + b"&".join([b"a=1"] * 257)
        + b" HTTP/1.1\r\nHost: agent\r\n"
        + AUTH
        + b"\r\n",
        400,
        "bad_request",
    ),
    # well framed, so the connection could stay open: this client asks for it to close
    "JSON nested deeper than the parser": (
        WRITE_FILES + b"Connection: close\r\n" + b"Content-Length: 200000\r\n\r\n" + b"[" * 200000,
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", MALFORMED_HTTP)
def test_malformed_or_oversized_http_gets_a_clean_4xx(real_agent, case) -> None:
    # given a request the agent must not parse as sent
    data, status, code = MALFORMED_HTTP[case]

    # when it arrives byte for byte on a connection of its own
    answer = _http_answer(_send(real_agent.port, data))

    # then the agent answers in its error shape and closes that connection
    assert (answer[0], answer[2]["error"]) == (status, code)
    assert answer[1]["content-type"] == "application/json"
    assert answer[1]["connection"] == "close"
    # and it goes on serving everyone else
    _still_serving(real_agent.port)


def _frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    length: int | None = None,
    mask_key: bool = True,
) -> bytes:
    """A client frame as written, including ones RFC 6455 forbids."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    key = b"\x11\x22\x33\x44"
    return head + (key if mask_key else b"") + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


HANDSHAKE = (
    b"GET /runtime/v1/process HTTP/1.1\r\nHost: agent\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n" + AUTH + b"\r\n"
)


def _close_code(raw: bytes) -> int:
    """The code of the close frame the agent sent after its 101."""
    head, _, frames = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert frames[:1] == b"\x88", frames[:16]
    length = frames[1]
    assert length >= 2
    return int(struct.unpack(">H", frames[2:4])[0])


BIG = WS_MAX_MESSAGE // 64  # 1 MiB
MALFORMED_WS = {
    "unknown opcode": (_frame(0x3, b"{}"), 1002),
    "unmasked client frame": (_frame(0x1, b"{}", masked=False), 1002),
    "reserved bit set": (_frame(0x1, b"{}", rsv=0x40), 1002),
    "ping over 125 bytes": (_frame(0x9, b"p" * 126), 1002),
    "fragmented ping": (_frame(0x9, b"p", fin=False), 1002),
    "continuation without a message": (_frame(0x0, b"{}"), 1002),
    "new message inside a fragmented one": (_frame(0x1, b"{", fin=False) + _frame(0x1, b"}"), 1002),
    "text that is not UTF-8": (_frame(0x1, b'{"type": "\xff\xfe"}'), 1007),
    "close with a code never sent on the wire": (_frame(0x8, struct.pack(">H", 1005)), 1002),
    "close with a one-byte payload": (_frame(0x8, b"\x03"), 1002),
    # fragments count together: the last header alone takes the message past the limit
    "fragmented message over the limit": (
        _frame(0x1, b" " * BIG, fin=False)
        + _frame(0x0, length=WS_MAX_MESSAGE - BIG + 1, mask_key=False)[:10],
        1009,
    ),
    "single frame over the limit": (_frame(0x1, length=WS_MAX_MESSAGE + 1, mask_key=False)[:10], 1009),
}


@pytest.mark.parametrize("case", MALFORMED_WS)
def test_a_websocket_client_that_breaks_rfc_6455_gets_the_right_close_code(real_agent, case) -> None:
    # given an open process socket, and frames that break the protocol
    frames, code = MALFORMED_WS[case]

    # when they arrive after the handshake
    answer = _send(real_agent.port, HANDSHAKE + frames)

    # then the agent closes with the RFC 6455 code, and serves everyone else
    assert _close_code(answer) == code
    _still_serving(real_agent.port)


def test_a_truncated_frame_is_a_protocol_error(real_agent) -> None:
    # given a frame announcing ten bytes, of which three arrive before the client stops sending
    frames = _frame(0x1, b"0123456789")[: 2 + 4 + 3]

    # when the client half-closes the connection
    answer = _send(real_agent.port, HANDSHAKE + frames, half_close=True)

    # then the agent fails the connection with 1002, and serves everyone else
    assert _close_code(answer) == 1002
    _still_serving(real_agent.port)


def test_a_well_formed_close_is_echoed(real_agent) -> None:
    # when the client closes with an application code and a UTF-8 reason
    answer = _send(real_agent.port, HANDSHAKE + _frame(0x8, struct.pack(">H", 4000) + "bye ✓".encode()))

    # then the agent echoes the code
    assert _close_code(answer) == 4000
    _still_serving(real_agent.port)

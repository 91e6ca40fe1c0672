"""A request's head and body framing, read with every size bounded.

The standard library parses the head once these checks have passed: the request line,
each header line, their count and their total are bounded here, and the body framing
(Content-Length, chunked) is refused whenever it could be read two ways.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import BinaryIO

from .core import HttpError

MAX_REQUEST_LINE = 16 * 1024  # the edge (uvicorn/h11) never sends a head over 16 KiB
MAX_HEADER_LINE = 16 * 1024
MAX_HEADERS = 100
MAX_HEAD = 64 * 1024  # all header lines together
MAX_QUERY_FIELDS = 256
MAX_CHUNK_LINE = 4 * 1024  # a chunk's size line, extensions included
MAX_TRAILERS = 32
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only: no sign, no '_', no '²'
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")


def read_head(rfile: BinaryIO) -> tuple[bytes, bytes] | None:
    """The request line and the header block (up to its blank line), or None when the
    client closed the connection between requests."""
    line = rfile.readline(MAX_REQUEST_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, "uri_too_long", f"request line over {MAX_REQUEST_LINE} bytes")
    block = _header_lines(rfile, MAX_HEADERS, "header")
    return line, block


def read_trailers(rfile: BinaryIO) -> None:
    """Skip a chunked body's trailer section, bounded like headers."""
    _header_lines(rfile, MAX_TRAILERS, "trailer")


def _header_lines(rfile: BinaryIO, most: int, what: str) -> bytes:
    lines: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HttpError(431, "header_too_large", f"a {what} line is over {MAX_HEADER_LINE} bytes")
        total += len(line)
        if total > MAX_HEAD:
            raise HttpError(431, "header_too_large", f"{what}s over {MAX_HEAD} bytes in all")
        if line in (b"\r\n", b"\n"):
            return b"".join(lines) + line
        if not line.endswith(b"\n"):
            raise HttpError(400, "bad_request", f"the connection ended inside the {what}s")
        lines.append(line)
        if len(lines) > most:
            raise HttpError(431, "header_too_large", f"more than {most} {what} fields")


def body_framing(headers: Message) -> tuple[bool, int]:
    """``(chunked, content length)``; a body that could be framed two ways is refused."""
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = {v.strip() for v in headers.get_all("Content-Length") or []}
    if encodings:
        if lengths:
            raise HttpError(400, "bad_request", "both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for value in encodings for c in value.split(",")]
        if codings != ["chunked"]:
            raise HttpError(501, "not_implemented", f"unsupported Transfer-Encoding {', '.join(codings)}")
        return True, 0
    if len(lengths) > 1:
        raise HttpError(400, "bad_request", "conflicting Content-Length values")
    if not lengths:
        return False, 0
    value = lengths.pop()
    if CONTENT_LENGTH.fullmatch(value) is None:
        raise HttpError(400, "bad_request", "Content-Length must be a non-negative decimal integer")
    return False, int(value)


def chunk_size(rfile: BinaryIO) -> int:
    """The size on a chunk's size line (its extensions ignored)."""
    line = rfile.readline(MAX_CHUNK_LINE + 1)
    if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\n"):
        raise HttpError(400, "bad_request", "malformed chunked body: size line too long or cut short")
    size = line.split(b";", 1)[0].strip(b" \t\r\n")
    if CHUNK_SIZE.fullmatch(size) is None:
        raise HttpError(400, "bad_request", "malformed chunked body: bad chunk size")
    return int(size, 16)


def chunk_end(rfile: BinaryIO) -> None:
    """The CRLF that ends a chunk's data."""
    if rfile.read(2) != b"\r\n":
        raise HttpError(400, "bad_request", "malformed chunked body: chunk data not followed by CRLF")

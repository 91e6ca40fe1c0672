"""The first file part of a `multipart/form-data` body, streamed (signed uploads, spec 3.11).

A signed upload stores its body; a browser form or `curl -F file=@x` sends the file
inside a multipart envelope, and the file's bytes are what the user means. The parser
never holds more than one part's headers and a delimiter's length of data: the file
part streams through as it arrives, the parts after it are read and dropped.

Everything up to the first file part's content (preamble, other fields, its headers)
is read before the agent is asked to write anything, so a body that is not multipart
at all is refused without touching the file. A body that ends inside the file part
(no delimiter after it) is refused too, but by then the agent has written the bytes
that came.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from sandboxes.edge.access import EdgeError

MAX_HEADERS = 16 * 1024  # one part's header block
# RFC 2046 5.1.1: 1 to 70 characters from a restricted set, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PARAM = re.compile(r';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def invalid(message: str) -> EdgeError:
    return EdgeError(400, "invalid_multipart", f"The multipart/form-data body is malformed: {message}")


def _params(value: str) -> dict[str, str]:
    """`type; a=1; b="x y"` -> {"a": "1", "b": "x y"} (names lowercased, quotes removed)."""
    found = {}
    for name, raw in _PARAM.findall(value):
        raw = raw.strip()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        found[name.lower()] = raw
    return found


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data` content type; None for any other type."""
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return None
    boundary = _params(content_type).get("boundary", "")
    if not _BOUNDARY.fullmatch(boundary):
        raise invalid("its Content-Type has no valid boundary parameter.")
    return boundary.encode("latin-1")


def _is_file_part(headers: bytes) -> bool:
    """A part whose Content-Disposition names a filename (`filename=` or `filename*=`)."""
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            return bool({"filename", "filename*"} & set(_params(";" + value.partition(";")[2])))
    return False


class FirstFilePart:
    """Reads `chunks` (a multipart body) and yields the bytes of its first file part.

    `start()` reads up to the start of that part's content (raising EdgeError 400 if
    there is none); `content()` then streams it and drains the rest of the body.
    """

    def __init__(self, chunks: AsyncIterator[bytes], boundary: bytes) -> None:
        self.chunks = chunks
        # The first delimiter may open the body without the CRLF in front of the others.
        self.buffer = b"\r\n"
        self.delimiter = b"\r\n--" + boundary
        self.ended = False

    async def _more(self) -> bool:
        if self.ended:
            return False
        try:
            self.buffer += await anext(self.chunks)
        except StopAsyncIteration:
            self.ended = True
            return False
        return True

    async def _skip_to_delimiter(self) -> None:
        """Drop everything up to and including the next delimiter."""
        while (at := self.buffer.find(self.delimiter)) < 0:
            self.buffer = self.buffer[-len(self.delimiter) + 1 :]
            if not await self._more():
                raise invalid("it ends before a closing boundary.")
        self.buffer = self.buffer[at + len(self.delimiter) :]

    async def _part_headers(self) -> bytes | None:
        """After a delimiter: None for the closing one (`--`), else the part's header block."""
        while len(self.buffer) < 2 and await self._more():
            pass
        if self.buffer.startswith(b"--"):
            return None
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEADERS:
                raise invalid(f"a part's headers are longer than {MAX_HEADERS} bytes.")
            if not await self._more():
                raise invalid("it ends inside a part's headers.")
        line_end = self.buffer.find(b"\r\n")
        if self.buffer[:line_end].strip(b" \t"):  # only transport padding may follow a delimiter
            raise invalid("a boundary line carries text after the boundary.")
        headers, self.buffer = self.buffer[line_end + 2 : end], self.buffer[end + 4 :]
        return headers

    async def start(self) -> None:
        while True:
            await self._skip_to_delimiter()
            headers = await self._part_headers()
            if headers is None:
                raise invalid("it has no file part (a part whose Content-Disposition has a filename).")
            if _is_file_part(headers):
                return
            # a plain form field before the file: its value is not what is stored

    async def content(self) -> AsyncIterator[bytes]:
        keep = len(self.delimiter) - 1
        while (at := self.buffer.find(self.delimiter)) < 0:
            if len(self.buffer) > keep:
                yield self.buffer[:-keep]
                self.buffer = self.buffer[-keep:]
            if not await self._more():
                raise invalid(
                    "it ends inside the file part, before the next boundary; nothing was "
                    "stored and the file is as it was."
                )
        if at:
            yield self.buffer[:at]
        self.buffer = b""
        while await self._more():  # the parts after the first file are read, not stored
            self.buffer = b""


async def first_file_part(chunks: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[bytes]:
    """The first file part of the multipart body `chunks`, once its content is reached."""
    part = FirstFilePart(chunks, boundary)
    await part.start()
    return part.content()

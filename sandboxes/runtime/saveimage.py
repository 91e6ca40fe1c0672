"""Rewrite libvirt QEMU save images so one template snapshot can start many clones.

libvirt refuses to restore a save image under another name or UUID (its ABI check
compares the override XML with the XML stored in the image). But it restores an image
*as written*, so we write each clone a copy whose embedded XML already carries the
clone's identity: name, UUID, disk overlay, console path, forwarded agent port.

Layout (libvirt ``virQEMUSaveHeader``, format version 2):
  92-byte header: magic "LibvirtQemudSave", then little-endian uint32 version,
  data_len, was_running, compressed, cookieOffset, 14 reserved words;
  data area (data_len bytes): domain XML, NUL, padding, cookie XML at cookieOffset, NUL
  padding; then QEMU's migration stream, untouched.
The data area keeps its length so the migration stream stays at the same offset; the
XML may grow into the padding before the cookie (libvirt leaves ample room), and the
cookie is moved only if it has to.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import driver

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # written while a save is in progress
HEADER_FMT = "<16s5I14I"
HEADER_LEN = struct.calcsize(HEADER_FMT)  # 92
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
COPY_CHUNK = 64 << 20


class SaveImageError(Exception):
    """The file is not a save image we know how to rewrite."""


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    reserved: tuple[int, ...]

    @property
    def stream_offset(self) -> int:
        """Where QEMU's migration stream starts in the file."""
        return HEADER_LEN + self.data_len


@dataclass(frozen=True)
class CloneIdentity:
    """What must differ between clones of one snapshot."""

    name: str
    uuid: str
    disk_path: Path
    agent_host_port: int
    console_path: Path | None = None
    internet: bool = True  # False: QEMU user-mode net with restrict=on (no egress)
    dac_label: str | None = None  # "+uid:+gid" QEMU runs as (None: libvirt's configured user)


def read_header(f: BinaryIO) -> SaveHeader:
    raw = f.read(HEADER_LEN)
    fields = struct.unpack(HEADER_FMT, raw)
    if fields[0] != MAGIC:
        raise SaveImageError(f"bad magic {fields[0]!r}")
    version, data_len, was_running, compressed, cookie_offset = fields[1:6]
    h = SaveHeader(version, data_len, was_running, compressed, cookie_offset, reserved=tuple(fields[6:]))
    if h.version != 2:
        raise SaveImageError(f"unsupported save image version {h.version}")
    if h.compressed != 0:
        raise SaveImageError("compressed save images are not supported")
    return h


def read_xml(path: Path) -> tuple[SaveHeader, str, str]:
    """Header, domain XML and cookie XML of a save image."""
    with path.open("rb") as f:
        h = read_header(f)
        data = f.read(h.data_len)
    xml = data[: data.index(b"\0")].decode()
    cookie = data[h.cookie_offset :].split(b"\0", 1)[0].decode() if h.cookie_offset else ""
    return h, xml, cookie


def build_data_area(h: SaveHeader, xml: str, cookie: str) -> tuple[bytes, int]:
    """New data area of exactly ``h.data_len`` bytes and the cookie's offset in it."""
    xml_b, cookie_b = xml.encode() + b"\0", (cookie.encode() + b"\0") if cookie else b""
    cookie_offset = max(h.cookie_offset, len(xml_b)) if cookie_b else 0
    if cookie_b and cookie_offset + len(cookie_b) > h.data_len:
        raise SaveImageError("rewritten XML does not fit the save image's data area")
    if not cookie_b and len(xml_b) > h.data_len:
        raise SaveImageError("rewritten XML does not fit the save image's data area")
    area = bytearray(h.data_len)
    area[: len(xml_b)] = xml_b
    if cookie_b:
        area[cookie_offset : cookie_offset + len(cookie_b)] = cookie_b
    return bytes(area), cookie_offset


def pack_header(h: SaveHeader, cookie_offset: int) -> bytes:
    return struct.pack(
        HEADER_FMT, MAGIC, h.version, h.data_len, h.was_running, h.compressed, cookie_offset, *h.reserved
    )


def rewrite_domain_xml(xml: str, ident: CloneIdentity) -> str:
    """The template's domain XML with the clone's identity substituted."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)
    _set_text(root, "name", ident.name)
    _set_text(root, "uuid", ident.uuid)
    disks = [d for d in root.iter("disk") if d.get("device", "disk") == "disk"]
    if not disks:
        raise SaveImageError("no disk in domain XML")
    source = disks[0].find("source")
    if source is None:
        raise SaveImageError("disk has no source")
    source.set("file", str(ident.disk_path))
    disks[0].attrib.pop("index", None)
    for bs in disks[0].findall("backingStore"):
        disks[0].remove(bs)  # libvirt re-detects the chain from the overlay itself
    for arg in root.iter(f"{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        # this host's address, whichever host the snapshot was taken on
        forward = f"hostfwd=tcp:{driver.agent_address}:{ident.agent_host_port}-"
        value = re.sub(r"hostfwd=tcp:[\d.]*:\d+-", forward, value)
        if value.startswith("user,"):
            value = value.replace(",restrict=on", "") + ("" if ident.internet else ",restrict=on")
        arg.set("value", value)
    for label in root.findall("seclabel"):
        if label.get("model") == "dac":
            root.remove(label)
    if ident.dac_label is not None:
        seclabel = ET.SubElement(root, "seclabel", {"type": "static", "model": "dac", "relabel": "no"})
        ET.SubElement(seclabel, "label").text = ident.dac_label
    if ident.console_path is not None:
        for tag in ("serial", "console"):
            for dev in root.iter(tag):
                src = dev.find("source")
                if dev.get("type") == "file" and src is not None:
                    src.set("path", str(ident.console_path))
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, value: str) -> None:
    el = root.find(tag)
    if el is None:
        raise SaveImageError(f"no <{tag}> in domain XML")
    el.text = value


def write_clone(src: Path, dest: Path, ident: CloneIdentity) -> str:
    """Write ``dest``: ``src`` with the clone identity in its XML. Returns the new XML.

    The migration stream (~100+ MB) is copied in the kernel with copy_file_range (a
    reflink on filesystems that support it), never through Python buffers.
    """
    h, xml, cookie = read_xml(src)
    new_xml = rewrite_domain_xml(xml, ident)
    area, cookie_offset = build_data_area(h, new_xml, cookie)
    size = src.stat().st_size
    with src.open("rb") as fin, open(dest, "wb") as fout:
        fout.write(pack_header(h, cookie_offset) + area)
        fout.flush()
        copy_range(fin.fileno(), fout.fileno(), h.stream_offset, size - h.stream_offset)
    return new_xml


class CloneStream:
    """Serve a clone's save image through a FIFO instead of writing a 100+ MB copy.

    libvirt opens the path, reads header + XML and hands the fd to QEMU, which reads
    the migration stream sequentially — exactly what ``-incoming "exec:cat file"``
    does. A writer thread feeds the rewritten header, then ``sendfile``s the template's
    stream (page cache -> pipe, no disk writes). If libvirt never opens the FIFO, the
    thread gives up after ``open_timeout``; if the reader dies, the write fails (EPIPE).
    """

    def __init__(self, src: Path, fifo: Path, ident: CloneIdentity, open_timeout: float = 30.0) -> None:
        h, xml, cookie = read_xml(src)
        self.xml = rewrite_domain_xml(xml, ident)
        area, cookie_offset = build_data_area(h, self.xml, cookie)
        self._prefix = pack_header(h, cookie_offset) + area
        self._src, self._fifo, self._h = src, fifo, h
        self._open_timeout = open_timeout
        self.error: BaseException | None = None
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        self._thread = threading.Thread(target=self._run, name=f"clone-stream-{ident.name}", daemon=True)

    def start(self) -> CloneStream:
        self._thread.start()
        return self

    def _open_writer(self) -> int:
        """Non-blocking open fails with ENXIO until a reader has the FIFO open."""
        deadline = time.monotonic() + self._open_timeout
        while True:
            try:
                fd = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(fd, True)
                return fd
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def _run(self) -> None:
        try:
            fd = self._open_writer()
            try:
                os.write(fd, self._prefix)
                with self._src.open("rb") as f:
                    offset, end = self._h.stream_offset, os.fstat(f.fileno()).st_size
                    while offset < end:
                        offset += os.sendfile(fd, f.fileno(), offset, min(end - offset, COPY_CHUNK))
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e

    def finish(self, timeout: float = 30.0, raise_errors: bool = True) -> None:
        """Wait for the writer, remove the FIFO, re-raise a writer failure."""
        self._thread.join(timeout)
        if self._fifo.exists() and stat.S_ISFIFO(os.lstat(self._fifo).st_mode):
            self._fifo.unlink()
        if not raise_errors:
            return
        if self._thread.is_alive():
            raise SaveImageError("clone stream writer did not finish")
        if self.error is not None:
            raise SaveImageError(f"clone stream failed: {self.error!r}") from self.error


def copy_range(fd_in: int, fd_out: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``fd_in`` at ``offset`` to the current end of ``fd_out``."""
    out_off = offset
    while count > 0:
        n = os.copy_file_range(fd_in, fd_out, min(count, COPY_CHUNK), offset, out_off)
        if n == 0:
            raise SaveImageError("unexpected end of save image")
        offset, out_off, count = offset + n, out_off + n, count - n

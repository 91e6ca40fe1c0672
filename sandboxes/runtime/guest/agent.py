#!/usr/bin/env python3
"""Watasu guest agent: runs inside every sandbox VM, stdlib only (Python 3.11+).

It is the data plane's far end. Besides the host's own routes (health, init, exec, a
process list) it serves the ``/runtime/v1`` protocol of the wire spec (files, directories,
processes over WebSocket with replayable cursors, PTY, filesystem watch, git helpers) and
``/proxy/<port>/...`` for preview traffic. The host-side edge authenticates clients and
forwards their requests here verbatim, with ``Authorization`` replaced by the agent secret.

Authentication (see NOTES.md, "agent secret scheme"):
- At boot the only accepted credential is the boot token the host put on the kernel
  command line (``watasu.token=``): only the host and this guest can read it.
- ``POST /init`` must carry the *current* credential and installs a new secret. While
  the agent is *fresh* (just booted, or sealed as a template with ``"seal": true``) the
  new secret must differ from the current one and nothing but /init and /health is
  served. A clone restored from a template snapshot therefore accepts exactly one thing:
  an init authenticated by the template secret, which rotates it away. If anyone else
  won that race, the host's init gets 401 and the host destroys the sandbox.
- Every other route needs a bearer credential, and which one depends on the route
  (defence in depth behind the edge's own path checks): the host's control routes
  (``/init``, ``/exec``, ``/processes``) take only the secret itself, which the edge never
  sends; ``/runtime/v1/*`` also takes the *data-plane* credential and ``/proxy/*`` takes
  only the *preview* credential, both derived from the secret (``role_secret``). A request
  that reaches the agent with a path other than the one the edge checked therefore finds
  its credential refused.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import grp
import hashlib
import hmac
import http.client
import json
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

AGENT_PORT = 49983
CONTROL, DATAPLANE, PREVIEW = "control", "dataplane", "preview"
MAX_BODY = 64 * 1024 * 1024  # JSON bodies (write_files carries base64 data)
CHUNK = 256 * 1024  # file streaming unit
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
CLOCK_REALTIME = 0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RETAIN_BYTES = 16 * 1024 * 1024  # per-process output kept for replay
RETAIN_EVENTS = 100_000
SUBSCRIBER_BYTES = 4 * 1024 * 1024  # per-socket backlog before it is declared lagged
FINISHED_KEEP = 1000  # finished process records kept (oldest purged first)
DROPPED_KEEP = 100_000  # ids of purged records remembered, to say so in their 404
FINISHED_RETAIN_BYTES = 64 * 1024 * 1024  # output kept across all finished processes
EXIT_LINGER = 0.5  # seconds a socket stays open after `exit` for in-flight client frames
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_MESSAGE = 64 * 1024 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}


class HttpError(Exception):
    """An error answered as ``{"error": code, "message": ...}`` (plus ``extra`` keys)."""

    def __init__(self, status: int, code: str, message: str, extra: dict[str, Any] | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = extra or {}
        self.headers = headers or []

    def payload(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def os_error(e: OSError, path: str) -> HttpError:
    """Map a filesystem error to the spec's error catalogue (§8.4)."""
    table = {
        errno.ENOENT: (404, "file_not_found", f"{path}: no such file or directory"),
        errno.EISDIR: (422, "is_a_directory", f"{path} is a directory"),
        errno.ENOTDIR: (422, "not_a_directory", f"{path}: a path component is not a directory"),
        errno.EEXIST: (409, "already_exists", f"{path} already exists"),
        errno.ENOSPC: (507, "not_enough_space", "no space left on device"),
        errno.EDQUOT: (507, "not_enough_space", "disk quota exceeded"),
        errno.EACCES: (403, "forbidden", f"{path}: permission denied"),
        errno.EPERM: (403, "forbidden", f"{path}: operation not permitted"),
        errno.ENOTEMPTY: (409, "already_exists", f"{path}: directory not empty"),
        errno.ELOOP: (422, "validation_failed", f"{path}: too many levels of symbolic links"),
        errno.ENAMETOOLONG: (422, "validation_failed", f"{path}: name too long"),
        errno.EROFS: (403, "forbidden", f"{path}: read-only file system"),
    }
    status, code, message = table.get(e.errno or 0, (500, "internal_error", f"{path}: {e.strerror}"))
    return HttpError(status, code, message)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as the ISO-8601 UTC string the SDK parses (``...Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def log(msg: str) -> None:
    """Agent diagnostics go to the VM console (the host keeps it)."""
    print(f"watasu-agent: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- state


@dataclass
class AgentState:
    """Mutable agent identity; one lock guards it because handlers run in threads."""

    secret: str
    fresh: bool = True
    env: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, token: str | None, *, roles: tuple[str, ...] = (CONTROL,),
              allow_fresh: bool = False) -> None:
        """Raise 401 unless ``token`` is the credential of one of ``roles`` (``control`` is
        the secret itself) and the agent is initialised."""
        if token is None or not any(hmac.compare_digest(token.encode(), self.credential(role).encode())
                                    for role in roles):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token")
        if self.fresh and not allow_fresh:
            raise HttpError(401, "unauthorized", "agent not initialised")

    def credential(self, role: str) -> str:
        return self.secret if role == CONTROL else role_secret(self.secret, role)

    def rotate(self, token: str | None, new_secret: str, seal: bool) -> None:
        """Atomically check the current credential and install ``new_secret``."""
        if len(new_secret) < 16:
            raise HttpError(400, "bad_request", "secret too short")
        with self.lock:
            self.check(token, allow_fresh=True)
            if self.fresh and hmac.compare_digest(new_secret.encode(), self.secret.encode()):
                raise HttpError(400, "bad_request", "a fresh agent must get a new secret")
            self.secret, self.fresh = new_secret, seal


def role_secret(secret: str, role: str) -> str:
    """The credential of one edge role (``dataplane``, ``preview``), derived from the secret.
    The host derives it the same way (``sandboxes.runtime.agent_client.role_secret``)."""
    return hmac.new(secret.encode(), f"watasu-agent-role:{role}".encode(), hashlib.sha256).hexdigest()


def boot_token(cmdline_path: str = "/proc/cmdline") -> str:
    """The ``watasu.token=`` kernel argument, or a random value nobody knows."""
    try:
        with open(cmdline_path) as f:
            for arg in f.read().split():
                if arg.startswith("watasu.token="):
                    return arg.split("=", 1)[1]
    except OSError:
        pass
    return os.urandom(32).hex()


# --------------------------------------------------------------------------- system effects


def set_clock(epoch: float) -> None:
    """Set CLOCK_REALTIME: a restored clone wakes up with the template's clock."""

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    libc = ctypes.CDLL(None, use_errno=True)
    ts = Timespec(int(epoch), int((epoch % 1) * 1e9))
    if libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
        raise OSError(ctypes.get_errno(), "clock_settime failed")


def add_entropy(data: bytes) -> None:
    """Mix host entropy into the kernel pool and reseed: clones share the template's RNG.

    RNDADDENTROPY mixes (and credits) the bytes into the input pool, but since Linux
    5.18 the ChaCha output state is only rebuilt on its reseed interval, so without
    RNDRESEEDCRNG two clones would read identical /dev/urandom bytes for a minute.
    Failing either ioctl fails the init: a clone with a shared RNG must not be used.
    Python's ``random`` module state is reseeded too.
    """
    if not data:
        raise ValueError("init needs entropy")
    with open("/dev/urandom", "wb") as f:
        req = struct.pack("ii", len(data) * 8, len(data)) + data
        fcntl.ioctl(f.fileno(), RNDADDENTROPY, req)
        fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
    random.seed(os.urandom(32))


def set_hostname(name: str) -> None:
    """Set the kernel hostname and /etc/hostname (best effort for the file)."""
    socket.sethostname(name)
    try:
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- paths and entries


def norm_path(raw: str | None, what: str = "path") -> str:
    """Absolute, normalised path; relative paths are refused (the SDK always sends absolute)."""
    if not raw:
        raise HttpError(422, "validation_failed", f"{what} is required")
    if "\0" in raw:
        raise HttpError(422, "validation_failed", f"{what} contains a NUL byte")
    if not raw.startswith("/"):
        raise HttpError(422, "validation_failed", f"{what} must be absolute: {raw!r}")
    path = os.path.normpath(raw)
    return "/" + path.lstrip("/")  # normpath keeps a leading "//"


def _perm_string(mode: int) -> str:
    """``rwxr-xr-x`` from mode bits (stat.filemode minus the type letter)."""
    return stat.filemode(mode)[1:]


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def entry_from_stat(path: str, st: os.stat_result, link_target: str | None = None) -> dict[str, Any]:
    """A FileEntry (spec §2.10): ``mode`` is an int, ``modified_time`` ISO, ``mtime`` epoch."""
    if stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": os.path.basename(path) or "/", "path": path, "type": kind,
        "bytes": st.st_size, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
        "permissions": _perm_string(st.st_mode), "owner": _owner(st.st_uid), "group": _group(st.st_gid),
        "uid": st.st_uid, "gid": st.st_gid, "modified_time": iso(st.st_mtime), "mtime": int(st.st_mtime),
        "symlink_target": link_target,
    }


def file_entry(path: str) -> dict[str, Any]:
    """FileEntry of ``path`` without following a final symlink (stat semantics of §4.4)."""
    try:
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    except OSError as e:
        raise os_error(e, path) from e
    return entry_from_stat(path, st, target)


def list_dir(path: str, depth: int) -> list[dict[str, Any]]:
    """Entries below ``path`` up to ``depth`` levels (1 = children), sorted, never following links."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise os_error(e, path) from e
    if not stat.S_ISDIR(st.st_mode):
        raise HttpError(422, "not_a_directory", f"{path} is not a directory")
    out: list[dict[str, Any]] = []
    stack = [(path, 1)]
    while stack:
        directory, level = stack.pop()
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError:
            continue  # vanished or unreadable subdirectory: skip it, keep the listing
        for d in items:
            try:
                dst = d.stat(follow_symlinks=False)
                target = os.readlink(d.path) if stat.S_ISLNK(dst.st_mode) else None
            except OSError:
                continue
            out.append(entry_from_stat(d.path, dst, target))
            if level < depth and stat.S_ISDIR(dst.st_mode):
                stack.append((d.path, level + 1))
    out.sort(key=lambda e: e["path"])
    return out


def ensure_parent(path: str) -> None:
    """mkdir -p the parent; a file in the way is ``not_a_directory`` (422)."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError as e:
        raise HttpError(422, "not_a_directory", f"{parent} is not a directory") from e
    except OSError as e:
        raise os_error(e, parent) from e


def write_stream(path: str, chunks: Iterator[bytes], gzipped: bool) -> dict[str, Any]:
    """Write ``path`` from ``chunks`` without holding the file in memory, all or nothing.

    A regular file (or a new one) is written beside itself and renamed into place once the
    body is whole, so an upload cut short leaves the old contents, never half of the new;
    the replacement keeps the old file's mode and owner. A symlink is written through to
    its target; anything else (a FIFO, a device) is written in place.
    """
    ensure_parent(path)
    if os.path.isdir(path):
        raise HttpError(422, "is_a_directory", f"{path} is a directory")
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        existing: os.stat_result | None = os.stat(target)
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        return _write_in_place(path, target, chunks, gzipped)
    directory, name = os.path.split(target)
    temp = os.path.join(directory, upload_temp_name(name, replacing=existing is not None))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise os_error(e, path) from e
    try:
        with open(fd, "wb") as f:
            _copy_body(f, chunks, gzipped)
            if existing is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode))
                with contextlib.suppress(OSError):
                    os.fchown(f.fileno(), existing.st_uid, existing.st_gid)
        os.replace(temp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(e, OSError):
            raise os_error(e, path) from e
        raise
    return file_entry(path)


# An upload in progress, beside its file: `.<name>.watasu-<new|put>-<12 hex>`. Watches never
# report it; its rename into place is reported as the write (and create) of the file itself.
UPLOAD_TEMP = re.compile(r"\..*\.watasu-(new|put)-[0-9a-f]{12}", re.DOTALL)


def upload_temp_name(name: str, *, replacing: bool) -> str:
    return f".{name}.watasu-{'put' if replacing else 'new'}-{os.urandom(6).hex()}"


def _write_in_place(path: str, target: str, chunks: Iterator[bytes], gzipped: bool) -> dict[str, Any]:
    try:
        with open(target, "wb") as f:
            _copy_body(f, chunks, gzipped)
    except OSError as e:
        raise os_error(e, path) from e
    return file_entry(path)


def _copy_body(f: Any, chunks: Iterator[bytes], gzipped: bool) -> None:
    inflate = zlib.decompressobj(wbits=47) if gzipped else None  # 47 = auto gzip/zlib header
    try:
        for chunk in chunks:
            f.write(inflate.decompress(chunk) if inflate is not None else chunk)
        if inflate is not None:
            f.write(inflate.flush())
    except zlib.error as e:
        raise HttpError(400, "bad_request", f"body is not valid gzip: {e}") from e


def remove_path(path: str) -> None:
    """rm -rf semantics for directories, unlink for anything else (links are not followed)."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if path == "/":
                raise HttpError(422, "validation_failed", "refusing to delete /")
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:
        raise os_error(e, path) from e


def move_path(src: str, dst: str) -> dict[str, Any]:
    """Rename (replacing an existing destination file); falls back to copy across filesystems."""
    try:
        os.lstat(src)
    except OSError as e:
        raise os_error(e, src) from e
    ensure_parent(dst)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise os_error(e, dst) from e
        try:
            shutil.move(src, dst)
        except OSError as e2:
            raise os_error(e2, dst) from e2
    return file_entry(dst)


def make_dir(path: str) -> dict[str, Any]:
    """mkdir -p, idempotent; an existing non-directory is ``not_a_directory``."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as e:
        raise HttpError(422, "not_a_directory", f"{path} exists and is not a directory") from e
    except NotADirectoryError as e:
        raise HttpError(422, "not_a_directory", f"a component of {path} is not a directory") from e
    except OSError as e:
        raise os_error(e, path) from e
    return file_entry(path)


# --------------------------------------------------------------------------- WebSocket (RFC 6455)


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


# --------------------------------------------------------------------------- host exec (legacy)


@dataclass
class TrackedProcess:
    """A background process started through the host's ``/exec``."""

    pid: int
    cmd: list[str]
    popen: subprocess.Popen[bytes]


class ProcessTable:
    """Background processes started by ``/exec``, so they can be listed (and reaped)."""

    def __init__(self) -> None:
        self._procs: dict[int, TrackedProcess] = {}
        self._lock = threading.Lock()

    def start(self, cmd: list[str], env: dict[str, str], cwd: str | None) -> int:
        """Start ``cmd`` detached from the request (own session, output discarded)."""
        p = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        with self._lock:
            self._procs[p.pid] = TrackedProcess(p.pid, cmd, p)
        return p.pid

    def list(self) -> list[dict[str, Any]]:
        """Snapshot of tracked processes with running state / exit code."""
        with self._lock:
            procs = list(self._procs.values())
        out = []
        for t in procs:
            code = t.popen.poll()
            out.append({"pid": t.pid, "cmd": t.cmd, "running": code is None, "exit_code": code})
        return out


def run_command(cmd: list[str], env: dict[str, str], cwd: str | None, timeout: float,
                stdin: bytes | None, user: str | None = None) -> dict[str, Any]:
    """Run to completion and capture output; a timeout kills the process group."""
    started = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True, **user_kwargs(user, env))
    try:
        out, err = p.communicate(stdin, timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        timed_out = True
    return {
        "exit_code": p.returncode, "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"), "timed_out": timed_out,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


def user_kwargs(user: str | None, env: dict[str, str]) -> dict[str, Any]:
    """Popen arguments that run as ``user`` (and fix HOME/USER in ``env``); root needs none."""
    if not user or user == "root":
        return {}
    try:
        pw = pwd.getpwnam(user)
    except KeyError as e:
        raise HttpError(422, "validation_failed", f"unknown user {user!r}") from e
    env.setdefault("HOME", pw.pw_dir)
    env["HOME"], env["USER"], env["LOGNAME"] = pw.pw_dir, user, user
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}


# --------------------------------------------------------------------------- managed processes


def parse_signal(raw: Any, default: int = signal.SIGTERM) -> int:
    """``TERM``, ``SIGTERM``, ``15`` or ``"15"`` → 15."""
    if raw is None or raw == "":
        return default
    if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
        return int(raw)
    name = str(raw).upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError as e:
        raise HttpError(422, "validation_failed", f"unknown signal {raw!r}") from e


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
    """One entry of a process's event log; ``cursor`` is its position (spec §5.5)."""

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


class ManagedProcess:
    """A process started over the data plane: its record, event log and attached sockets."""

    def __init__(self, pid: str, argv: list[str], envs: dict[str, str], cwd: str, user: str | None,
                 pty: bool, tag: str | None) -> None:
        self.id, self.argv, self.envs, self.cwd, self.user = pid, argv, envs, cwd, user
        self.pty, self.tag = pty, tag
        self.popen: subprocess.Popen[bytes] | None = None
        self.os_pid = 0
        self.status = "running"
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.kill_requested_at: float | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.timed_out = False
        self.stdin_fd: int | None = None  # pipe write end, or the PTY master
        self.stdin_enabled = False  # set by start: a pipe was asked for (``stdin: true``), or a PTY
        self.master_fd: int | None = None
        self.events: deque[Event] = deque()
        self.next_cursor = 0
        self.retained = 0
        self.totals = {"stdout": 0, "stderr": 0, "pty": 0}
        self.subscribers: set[Subscriber] = set()
        self.cond = threading.Condition()
        self.stdin_lock = threading.Lock()
        self.timer: threading.Timer | None = None

    # -- record

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def record(self) -> dict[str, Any]:
        """Process record (spec §2.11): ``id`` = ``pid`` = stable id, ``os_pid`` = guest pid."""
        return {
            "id": self.id, "pid": self.id, "os_pid": self.os_pid, "tag": self.tag,
            "cmd": self.argv[0], "command": self.argv[0], "args": self.argv[1:], "envs": self.envs,
            "cwd": self.cwd, "user": self.user or "root", "pty": self.pty, "status": self.status,
            "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
            "exit_code": self.exit_code, "error": self.error,
            "kill_requested_at": iso(self.kill_requested_at),
        }

    def started_frame(self) -> dict[str, Any]:
        return {"type": "started", "pid": self.id, "os_pid": self.os_pid, "process": self.record()}

    # -- event log

    def append(self, kind: str, data: bytes = b"", exit: dict[str, Any] | None = None) -> None:
        """Add an event, evict beyond the retention budget, fan out to subscribers."""
        with self.cond:
            ev = Event(self.next_cursor, kind, data, exit)
            self.next_cursor += 1
            self.events.append(ev)
            self.retained += len(data)
            if kind in self.totals:
                self.totals[kind] += len(data)
            while len(self.events) > 1 and (self.retained > RETAIN_BYTES
                                            or len(self.events) > RETAIN_EVENTS):
                self.retained -= len(self.events.popleft().data)
            subs = list(self.subscribers)
            self.cond.notify_all()
        for s in subs:
            s.push(ev)

    def attach(self, since: int) -> tuple[list[Event], Subscriber]:
        """Replay (cursor >= since) plus a subscriber for later events, atomically: no gap, no dup."""
        sub = Subscriber()
        with self.cond:
            replay = [e for e in self.events if e.cursor >= since]
            if not self.finished:
                self.subscribers.add(sub)
        return replay, sub

    def detach(self, sub: Subscriber) -> None:
        with self.cond:
            self.subscribers.discard(sub)
        sub.close()

    def output(self, since: int, limit_bytes: int | None) -> dict[str, Any]:
        """Non-blocking read of retained events (spec §4.12)."""
        with self.cond:
            retained = list(self.events)
            first = retained[0].cursor if retained else self.next_cursor
        events, used = [], 0
        for e in retained:
            if e.cursor < since or e.kind == "exit":
                continue
            if limit_bytes is not None and events and used + len(e.data) > limit_bytes:
                break
            events.append({"cursor": e.cursor, "type": e.kind, "data": base64.b64encode(e.data).decode()})
            used += len(e.data)
        return {
            "pid": self.id, "status": self.status, "exit_code": self.exit_code,
            "finished_at": iso(self.finished_at),
            "next_cursor": events[-1]["cursor"] + 1 if events else since,
            "truncated_before_cursor": since < first, "truncated_by_retention": since < first,
            "events": events, "first_retained_cursor": first if retained else None,
            "last_retained_cursor": retained[-1].cursor if retained else None,
            "retained_bytes": sum(len(e.data) for e in retained), "returned_bytes": used,
            "total_bytes_observed": sum(self.totals.values()), "stream_totals": dict(self.totals),
        }

    # -- control

    def write_stdin(self, data: bytes) -> None:
        """Write to the stdin pipe / PTY master; dropped when stdin is closed or the process ended."""
        with self.stdin_lock:
            fd = self.stdin_fd
            if fd is None or self.finished:
                return
            view, deadline = memoryview(data), time.monotonic() + 30
            try:
                while view and time.monotonic() < deadline:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:  # the PTY master is non-blocking
                        select.select([], [fd], [], 1.0)
            except OSError:
                pass

    def close_stdin(self) -> None:
        """EOF on the pipe; for a PTY write EOT (the master must stay open for output)."""
        with self.stdin_lock:
            if self.pty:
                if self.master_fd is not None and not self.finished:
                    with contextlib.suppress(OSError):
                        os.write(self.master_fd, b"\x04")
                return
            fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def send_signal(self, sig: int, group: bool = True) -> None:
        if self.finished or not self.os_pid:
            return
        try:
            if group:
                os.killpg(self.os_pid, sig)
            else:
                os.kill(self.os_pid, sig)
        except ProcessLookupError:
            pass

    def resize(self, cols: int, rows: int) -> None:
        """TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground group."""
        if self.master_fd is None or self.finished:
            return
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def kill(self, sig: int, group: bool, grace_ms: int) -> None:
        """Signal now; after ``grace_ms`` escalate to SIGKILL if still alive (0 = never)."""
        if self.finished:
            return
        with self.cond:
            if self.kill_requested_at is None:
                self.kill_requested_at = time.time()
            self.status = "killing"
        self.send_signal(sig, group)
        if grace_ms > 0 and sig != signal.SIGKILL:
            t = threading.Timer(grace_ms / 1000, self.send_signal, (signal.SIGKILL, group))
            t.daemon = True
            t.start()

    def on_timeout(self) -> None:
        if not self.finished:
            self.timed_out = True
            self.send_signal(signal.SIGKILL, True)

    def wait_finished(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.finished, timeout)

    # -- reader

    def pump(self, fds: dict[int, str]) -> None:
        """The process's single reader thread: multiplex its output fds into the event log.

        When the main process has exited, whatever is already buffered is drained and the
        log is closed with ``exit`` even if a stray background child still holds the pipe.
        """
        assert self.popen is not None
        carry: dict[int, bytes] = {fd: b"" for fd in fds}
        open_fds = set(fds)
        for fd in fds:
            os.set_blocking(fd, False)
        exited_at: float | None = None
        while open_fds:
            try:
                ready, _, _ = select.select(list(open_fds), [], [], 0.1)
            except InterruptedError:
                continue
            for fd in ready:
                self._read_fd(fd, fds[fd], carry, open_fds)
            if self.popen.poll() is not None:
                if exited_at is None:
                    exited_at = time.monotonic()
                elif not ready or time.monotonic() - exited_at > 0.5:
                    for fd in list(open_fds):
                        self._read_fd(fd, fds[fd], carry, open_fds)
                    break
        for fd, rest in carry.items():
            if rest:
                self.append(fds[fd], rest)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._finish(self.popen.wait())

    def _read_fd(self, fd: int, kind: str, carry: dict[int, bytes], open_fds: set[int]) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: PTY slave closed
                data = b""
            if not data:
                open_fds.discard(fd)
                return
            data = carry[fd] + data
            cut = utf8_split(data)
            carry[fd] = data[cut:]
            if cut:
                self.append(kind, data[:cut])

    def _finish(self, rc: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.stdin_lock:
            if self.stdin_fd is not None and not self.pty:
                with contextlib.suppress(OSError):
                    os.close(self.stdin_fd)
            self.stdin_fd = self.master_fd = None
        if self.timed_out:
            status, code, error = "timed_out", rc if rc < 0 else -signal.SIGKILL, "timeout"
        elif rc < 0:
            status, code, error = "killed", rc, None
        else:
            status, code, error = "exited", rc, None
        with self.cond:
            self.status, self.exit_code, self.error = status, code, error
            self.finished_at = time.time()
        self.append("exit", exit={"pid": self.id, "exit_code": code, "status": status, "error": error,
                                  "finished_at": iso(self.finished_at)})
        with self.cond:
            subs, self.subscribers = self.subscribers, set()
        for s in subs:
            s.close()


class ProcessManager:
    """Data-plane processes by stable id (``proc-<n>`` unless the caller chose one)."""

    def __init__(self) -> None:
        self.procs: dict[str, ManagedProcess] = {}
        self.dropped: dict[str, float] = {}  # id -> finished_at of records purged to keep FINISHED_KEEP
        self.lock = threading.Lock()
        self.counter = 0

    def get(self, pid: str) -> ManagedProcess:
        """The process, or a 404 that says which of the two things happened."""
        with self.lock:
            proc, finished_at = self.procs.get(pid), self.dropped.get(pid)
        if proc is not None:
            return proc
        if finished_at is not None:
            raise HttpError(404, "process_not_found", f"process {pid} finished at {iso(finished_at)} and its "
                            f"record was dropped: the sandbox keeps the {FINISHED_KEEP} most recently "
                            "finished processes")
        raise HttpError(404, "process_not_found", f"no process {pid} was started in this sandbox")

    def list(self) -> list[ManagedProcess]:
        with self.lock:
            return list(self.procs.values())

    def _reserve(self, wanted: Any) -> str:
        with self.lock:
            if wanted not in (None, ""):
                pid = str(wanted)
                old = self.procs.get(pid)
                if old is not None and not old.finished:
                    raise HttpError(409, "process_exists", f"process {pid} is already running")
            else:
                while True:
                    self.counter += 1
                    pid = f"proc-{self.counter}"
                    if pid not in self.procs:
                        break
            finished = [p for p in self.procs.values() if p.finished]
            finished.sort(key=lambda p: p.finished_at or 0)
            for old in finished[:max(0, len(finished) - FINISHED_KEEP)]:
                del self.procs[old.id]
                self.dropped[old.id] = old.finished_at or 0.0
            while len(self.dropped) > DROPPED_KEEP:  # a bounded memory of what was dropped
                del self.dropped[next(iter(self.dropped))]
            self._trim_finished([p for p in finished if p.id in self.procs])
            return pid

    @staticmethod
    def _trim_finished(finished: list[ManagedProcess]) -> None:
        """Keep finished processes' output under one global budget (oldest dropped first).

        A VM may have 512 MiB of RAM; records stay (status, exit code, the ``exit``
        event), only old output goes, which replay reports as truncation.
        """
        total = sum(p.retained for p in finished)
        for p in finished:
            if total <= FINISHED_RETAIN_BYTES:
                break
            with p.cond:
                total -= p.retained
                while len(p.events) > 1:
                    p.retained -= len(p.events.popleft().data)

    def start(self, msg: dict[str, Any], base_env: dict[str, str], default_cwd: str) -> ManagedProcess:
        """Start a process from a ``start`` frame (spec §5.2); errors become ``error`` frames."""
        cmd, args = msg.get("cmd"), msg.get("args") or []
        if not isinstance(cmd, str) or not cmd:
            raise HttpError(422, "validation_failed", "start.cmd must be a non-empty string")
        if not isinstance(args, list):
            raise HttpError(422, "validation_failed", "start.args must be a list")
        argv = [cmd, *(str(a) for a in args)]
        cwd = msg.get("cwd") or default_cwd
        if not os.path.isdir(cwd):
            raise HttpError(422, "cwd_not_found", f"working directory {cwd} does not exist")
        extra = msg.get("environment") or msg.get("envs") or {}
        envs = {str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
        env = {**base_env, **envs}
        user = msg.get("user") or None
        kwargs = user_kwargs(user, env)
        pty_size = msg.get("pty")
        pid = self._reserve(msg.get("id"))
        proc = ManagedProcess(pid, argv, envs, cwd, user, bool(pty_size), msg.get("tag"))
        proc.stdin_enabled = bool(pty_size) or bool(msg.get("stdin"))
        fds = self._spawn(proc, argv, env, cwd, kwargs, pty_size, proc.stdin_enabled)
        with self.lock:
            self.procs[pid] = proc
        threading.Thread(target=proc.pump, args=(fds,), daemon=True, name=f"pump-{pid}").start()
        timeout_ms = msg.get("timeout_ms")
        if isinstance(timeout_ms, int | float) and timeout_ms > 0:
            proc.timer = threading.Timer(timeout_ms / 1000, proc.on_timeout)
            proc.timer.daemon = True
            proc.timer.start()
        return proc

    @staticmethod
    def _spawn(proc: ManagedProcess, argv: list[str], env: dict[str, str], cwd: str,
               kwargs: dict[str, Any], pty_size: Any, want_stdin: bool) -> dict[int, str]:
        """Fork/exec in a new session; returns the output fds the reader multiplexes."""
        try:
            if pty_size:
                master, slave = os.openpty()
                cols = int((pty_size or {}).get("cols") or 80)
                rows = int((pty_size or {}).get("rows") or 24)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                env.setdefault("TERM", "xterm-256color")
                try:
                    proc.popen = subprocess.Popen(
                        argv, env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                        start_new_session=True, preexec_fn=_make_controlling_tty, **kwargs)
                finally:
                    os.close(slave)
                proc.os_pid, proc.master_fd, proc.stdin_fd = proc.popen.pid, master, master
                return {master: "pty"}
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            try:
                proc.popen = subprocess.Popen(
                    argv, env=env, cwd=cwd, stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                    stdout=w_out, stderr=w_err, start_new_session=True, **kwargs)
            except BaseException:
                for fd in (r_out, r_err):
                    os.close(fd)
                raise
            finally:
                os.close(w_out)
                os.close(w_err)
        except FileNotFoundError as e:
            raise HttpError(422, "command_not_found", f"{argv[0]}: command not found") from e
        except PermissionError as e:
            raise HttpError(422, "command_not_executable", f"{argv[0]}: permission denied") from e
        except OSError as e:
            raise HttpError(500, "internal_error", f"cannot start {argv[0]}: {e}") from e
        proc.os_pid = proc.popen.pid
        if proc.popen.stdin is not None:
            proc.stdin_fd = os.dup(proc.popen.stdin.fileno())
            proc.popen.stdin.close()
        return {r_out: "stdout", r_err: "stderr"}


def _make_controlling_tty() -> None:
    """In the child after setsid: make the PTY slave (fd 0) the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# --------------------------------------------------------------------------- apply_diff


class PatchError(Exception):
    """The patch document cannot be parsed (422 patch_parse_failed)."""


@dataclass
class Hunk:
    """One ``@@`` block: the lines it expects (``old``) and their replacement (``new``)."""

    hint: str
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    eof: bool = False
    plus: int = 0
    minus: int = 0


@dataclass
class PatchOp:
    kind: str  # add | update | delete | move
    path: str
    move_to: str | None = None
    content: list[str] = field(default_factory=list)
    hunks: list[Hunk] = field(default_factory=list)


def parse_apply_patch(text: str) -> list[PatchOp]:
    """Parse the "ApplyPatch" envelope (``*** Begin Patch`` ... ``*** End Patch``)."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].strip() != "*** Begin Patch":
        raise PatchError("patch must start with '*** Begin Patch'")
    if lines[-1].strip() != "*** End Patch":
        raise PatchError("patch must end with '*** End Patch'")
    ops: list[PatchOp] = []
    body, i = lines[1:-1], 0
    while i < len(body):
        line = body[i]
        if line.startswith("*** Add File: "):
            op = PatchOp("add", line[len("*** Add File: "):].strip())
            i += 1
            while i < len(body) and not body[i].startswith("*** "):
                if not body[i].startswith("+"):
                    raise PatchError(f"line {i + 2}: added file lines must start with '+'")
                op.content.append(body[i][1:])
                i += 1
            ops.append(op)
        elif line.startswith("*** Delete File: "):
            ops.append(PatchOp("delete", line[len("*** Delete File: "):].strip()))
            i += 1
        elif line.startswith("*** Update File: "):
            op = PatchOp("update", line[len("*** Update File: "):].strip())
            i += 1
            if i < len(body) and body[i].startswith("*** Move to: "):
                op.kind, op.move_to = "move", body[i][len("*** Move to: "):].strip()
                i += 1
            i = _parse_hunks(body, i, op)
            ops.append(op)
        elif not line.strip():
            i += 1
        else:
            raise PatchError(f"line {i + 2}: unexpected {line[:60]!r}")
    if not ops:
        raise PatchError("patch contains no file operations")
    return ops


def _parse_hunks(body: list[str], i: int, op: PatchOp) -> int:
    hunk: Hunk | None = None
    while i < len(body):
        line = body[i]
        if line.startswith("*** End of File"):
            if hunk is not None:
                hunk.eof = True
            i += 1
            continue
        if line.startswith("*** "):
            break
        if line.startswith("@@"):
            hunk = Hunk(line[2:].strip().removesuffix("@@").strip())
            op.hunks.append(hunk)
        else:
            if hunk is None:
                hunk = Hunk("")
                op.hunks.append(hunk)
            tag, rest = (line[:1], line[1:]) if line else (" ", "")
            if tag == " ":
                hunk.old.append(rest)
                hunk.new.append(rest)
            elif tag == "-":
                hunk.old.append(rest)
                hunk.minus += 1
            elif tag == "+":
                hunk.new.append(rest)
                hunk.plus += 1
            else:
                raise PatchError(f"bad hunk line {line[:60]!r} in {op.path}")
        i += 1
    if op.kind == "update" and not op.hunks:
        raise PatchError(f"update of {op.path} has no hunks")
    return i


def _find(lines: list[str], seq: list[str], start: int, eof: bool) -> int:
    """Index where ``seq`` occurs at/after ``start``: exact, then ignoring trailing, then all blanks."""
    if not seq:
        return len(lines) if eof else start
    for norm in (lambda s: s, str.rstrip, str.strip):
        target = [norm(s) for s in seq]
        candidates = [len(lines) - len(seq)] if eof else range(start, len(lines) - len(seq) + 1)
        for k in candidates:
            if k >= 0 and [norm(s) for s in lines[k:k + len(seq)]] == target:
                return k
    return -1


def apply_hunks(text: str, hunks: list[Hunk]) -> tuple[str, int, int]:
    """Apply hunks in order; returns (new text, added, removed) or raises ValueError(index, msg)."""
    trailing_nl = text.endswith("\n") or not text
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    pos, added, removed = 0, 0, 0
    for n, h in enumerate(hunks):
        start = pos
        if h.hint:
            k = _find(lines, [h.hint], pos, False)
            if k >= 0:
                start = k + 1 if h.hint.strip() not in (s.strip() for s in h.old[:1]) else k
        k = _find(lines, h.old, start, h.eof)
        if k < 0 and start != pos:
            k = _find(lines, h.old, pos, h.eof)
        if k < 0:
            raise ValueError(n, f"hunk {n} did not match", pos + 1)
        lines[k:k + len(h.old)] = h.new
        pos = k + len(h.new)
        added, removed = added + h.plus, removed + h.minus
    out = "\n".join(lines)
    return (out + "\n" if trailing_nl and lines else out), added, removed


def apply_patch_document(text: str, cwd: str) -> dict[str, Any]:
    """Apply an ApplyPatch document file by file; a failed file is reported, the rest applied."""
    try:
        ops = parse_apply_patch(text)
    except PatchError as e:
        raise HttpError(422, "patch_parse_failed", str(e)) from e
    files, applied, failed, touched = [], [], [], []

    def resolve(p: str) -> str:
        return os.path.normpath(p if p.startswith("/") else os.path.join(cwd, p))

    for op in ops:
        shown = op.move_to or op.path
        try:
            added, removed = _apply_op(op, resolve)
        except ValueError as e:
            index, msg, line = e.args if len(e.args) == 3 else (0, str(e), None)
            failed.append({"path": op.path, "error": msg,
                           "failed_hunk": {"index": index, "old_start": line} if line else None})
            continue
        except (OSError, HttpError) as e:
            failed.append({"path": op.path, "error": getattr(e, "message", None) or str(e)})
            continue
        files.append({"path": shown, "kind": op.kind, "added": added, "removed": removed,
                      "source_path": op.path if op.kind == "move" else None})
        applied.append(shown)
        touched.extend([op.path, shown] if op.kind == "move" else [shown])
    status = "applied" if not failed else "failed" if not applied else "partial"
    return {"status": status, "parsed_diff_blocks": len(ops), "patches": len(ops), "files": files,
            "summary": {"requested": len(ops), "applied": len(applied), "failed": len(failed)},
            "applied": applied, "failed": failed, "touched": touched}


def _apply_op(op: PatchOp, resolve: Callable[[str], str]) -> tuple[int, int]:
    src = resolve(op.path)
    if op.kind == "add":
        content = "\n".join(op.content) + ("\n" if op.content else "")
        ensure_parent(src)
        with open(src, "w") as f:
            f.write(content)
        return len(op.content), 0
    if op.kind == "delete":
        with open(src) as f:
            removed = f.read().count("\n")
        os.unlink(src)
        return 0, removed
    with open(src) as f:
        text = f.read()
    new, added, removed = apply_hunks(text, op.hunks)
    dst = resolve(op.move_to) if op.move_to else src
    ensure_parent(dst)
    with open(dst, "w") as f:
        f.write(new)
    if dst != src:
        os.unlink(src)
    return added, removed


def apply_unified_diff(text: str, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    """git-style unified diffs are handed to ``git apply`` (optional in the spec)."""
    stat_run = subprocess.run(["git", "apply", "--numstat", "-"], input=text.encode(), cwd=cwd,
                              env=env, capture_output=True, timeout=60)
    if stat_run.returncode != 0:
        raise HttpError(422, "patch_parse_failed", stat_run.stderr.decode(errors="replace").strip())
    files = []
    for row in stat_run.stdout.decode(errors="replace").splitlines():
        parts = row.split("\t", 2)
        if len(parts) == 3:
            a, r, p = parts
            files.append({"path": p, "kind": "update", "added": int(a) if a.isdigit() else 0,
                          "removed": int(r) if r.isdigit() else 0, "source_path": None})
    run = subprocess.run(["git", "apply", "--recount", "--whitespace=nowarn", "-"], input=text.encode(),
                         cwd=cwd, env=env, capture_output=True, timeout=60)
    ok = run.returncode == 0
    paths = [f["path"] for f in files]
    return {"status": "applied" if ok else "failed", "parsed_diff_blocks": len(files), "patches": len(files),
            "files": files if ok else [],
            "summary": {"requested": len(files), "applied": len(files) if ok else 0,
                        "failed": 0 if ok else len(files)},
            "applied": paths if ok else [],
            "failed": [] if ok else [{"path": p, "error": run.stderr.decode(errors="replace").strip()}
                                     for p in paths],
            "touched": paths if ok else []}


# --------------------------------------------------------------------------- filesystem watch

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, 0o4000, 0o2000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
SCAN_MEMORY = 10.0  # seconds a scanned entry's own create event is awaited, to drop it
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "sshfs", "ceph", "glusterfs", "virtiofs"}


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class Inotify:
    """Minimal inotify through ctypes; recursive watches add new subdirectories as they appear.

    A directory's watch starts after it was created, so whatever was made in it before
    (``mkdir -p a/b/c; echo z > a/b/c/f``: the first event names ``a`` only) is found by
    scanning it once watched, and reported as created; an inotify event for the same
    entry arriving after the scan is not reported twice.
    """

    def __init__(self, root: str, recursive: bool) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.root = root
        self.recursive = recursive
        self.paths: dict[int, str] = {}
        self.scanned: dict[str, float] = {}  # path -> when a scan reported it created
        self.uploads: dict[int, str] = {}  # rename cookie -> "new" / "put" of an upload's temp file
        if recursive:
            self.add_tree(root)
        else:
            self.add(root)

    def add(self, path: str) -> None:
        wd = self.libc.inotify_add_watch(self.fd, path.encode(errors="surrogateescape"), WATCH_MASK)
        if wd >= 0:
            self.paths[wd] = path

    def add_tree(self, root: str) -> list[str]:
        """Watch ``root`` and every directory under it; the entries found under it."""
        self.add(root)
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                self.add(os.path.join(dirpath, d))
            found += [os.path.join(dirpath, name) for name in sorted(dirnames) + sorted(filenames)
                      if not UPLOAD_TEMP.fullmatch(name)]
        return found

    def _created_inside(self, directory: str) -> list[tuple[str, int]]:
        """Watch a new directory's tree; what it already holds, as create events."""
        now = time.monotonic()
        self.scanned = {p: t for p, t in self.scanned.items() if now - t < SCAN_MEMORY}
        out = []
        for path in self.add_tree(directory):
            self.scanned[path] = now
            out.append((path, IN_CREATE | (IN_ISDIR if os.path.isdir(path) else 0)))
        return out

    def relative(self, path: str) -> str:
        """``path`` as named from the watched directory (``a/b/c/f``)."""
        return os.path.relpath(path, self.root)

    def read(self) -> list[tuple[str, int]]:
        """Pending (path, mask) pairs; empty when nothing is queued."""
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(buf):
            wd, mask, cookie, n = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + n].split(b"\0", 1)[0].decode(errors="surrogateescape")
            i += 16 + n
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                continue
            base = self.paths.get(wd)
            if base is None:
                continue
            path = os.path.join(base, name) if name else base
            if upload := UPLOAD_TEMP.fullmatch(name):
                if mask & IN_MOVED_FROM:  # an upload renamed into place: its MOVED_TO follows
                    self.uploads[cookie] = upload.group(1)
                    while len(self.uploads) > 64:
                        self.uploads.pop(next(iter(self.uploads)))
                continue
            if mask & IN_MOVED_TO and (kind := self.uploads.pop(cookie, None)) is not None:
                out += [(path, IN_CREATE), (path, IN_CLOSE_WRITE)] if kind == "new" else [
                    (path, IN_CLOSE_WRITE)]
                continue
            if mask & IN_CREATE and self.scanned.pop(path, None) is not None:
                continue  # already reported by the scan of its new parent
            out.append((path, mask))
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                out += self._created_inside(path)
        return out

    def close(self) -> None:
        os.close(self.fd)


def watch_event(path: str, mask: int, include_entry: bool, name: str) -> dict[str, Any] | None:
    """inotify mask → spec §5.8 event (create / write / rename / remove / chmod); ``path``
    is absolute, ``name`` relative to the watched directory."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        kind = "create"
    elif mask & (IN_DELETE | IN_DELETE_SELF):
        kind = "remove"
    elif mask & (IN_MOVED_FROM | IN_MOVE_SELF):
        kind = "rename"
    elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
        kind = "write"
    elif mask & IN_ATTRIB:
        kind = "chmod"
    else:
        return None
    ev: dict[str, Any] = {"type": kind, "path": path, "name": name}
    if include_entry and kind != "remove":
        with contextlib.suppress(HttpError):
            ev["file"] = file_entry(path)
    return ev


def run_watch(ws: WebSocket, ino: Inotify, include_entry: bool) -> None:
    """Stream batched events until the client closes (it never sends anything after the handshake).

    The watch is installed before the handshake completes (see ``watch``): the SDK's
    ``watch_dir`` returns on the 101, and a write made right after it must be seen.
    """
    stop = threading.Event()

    def drain_client() -> None:
        while ws.recv() is not None:
            pass
        stop.set()

    threading.Thread(target=drain_client, daemon=True).start()
    try:
        ws.send_json({"type": "ready"})
        last_ping = time.monotonic()
        while not stop.is_set():
            r, _, _ = select.select([ino.fd], [], [], 0.5)
            if not r:
                if time.monotonic() - last_ping > 30:  # keep idle proxies from dropping the socket
                    ws.send_json({"type": "pong"})
                    last_ping = time.monotonic()
                continue
            time.sleep(0.05)  # let a burst accumulate into one batch
            batch, last = [], None
            for path, mask in ino.read():
                ev = watch_event(path, mask, include_entry, ino.relative(path))
                if ev is not None and (ev["type"], ev["path"]) != last:
                    batch.append(ev)
                    last = (ev["type"], ev["path"])
            if batch:
                ws.send_json({"type": "events", "events": batch})
    except WsClosed:
        pass
    finally:
        ino.close()
        ws.close()


# --------------------------------------------------------------------------- git helpers (§4.14)

GIT_CRED_HELPER = ("!f() { echo username=\"$WATASU_GIT_USERNAME\"; "
                   "echo password=\"$WATASU_GIT_PASSWORD\"; }; f")


@dataclass
class GitCall:
    """The context of one git route: body, environment, working directory, timeout."""

    body: dict[str, Any]
    env: dict[str, str]
    cwd: str
    timeout: float
    user: str | None

    def arg(self, key: str, required: bool = False) -> Any:
        value = self.body.get(key)
        if required and value in (None, ""):
            raise HttpError(422, "validation_failed", f"{key} is required")
        return value

    def repo(self) -> str:
        """The ``path`` argument, absolute (relative paths resolve against ``cwd``)."""
        path = str(self.arg("path", True))
        return os.path.normpath(path if path.startswith("/") else os.path.join(self.cwd, path))

    def creds(self) -> list[str]:
        """``-c`` options that answer git's credential prompt for this call only."""
        username, password = self.body.get("username"), self.body.get("password")
        if not (username or password):
            return []
        self.env["WATASU_GIT_USERNAME"] = str(username or "git")
        self.env["WATASU_GIT_PASSWORD"] = str(password or "")
        return ["-c", "credential.helper=", "-c", f"credential.helper={GIT_CRED_HELPER}"]

    def run(self, argv: list[str], cwd: str | None = None, check: bool = True,
            stdin: str | None = None) -> dict[str, Any]:
        """Run git; a non-zero exit is a 422 with a code that says why (never 401)."""
        kwargs = user_kwargs(self.user, self.env)
        try:
            p = subprocess.run(argv, cwd=cwd or self.cwd, env=self.env, capture_output=True,
                               timeout=self.timeout, input=stdin.encode() if stdin is not None else None,
                               **kwargs)
        except subprocess.TimeoutExpired as e:
            raise HttpError(504, "gateway_timeout", f"git timed out after {self.timeout:g}s") from e
        except FileNotFoundError as e:
            raise HttpError(500, "internal_error", f"cannot run git: {e}") from e
        out = {"stdout": p.stdout.decode(errors="replace"), "stderr": p.stderr.decode(errors="replace"),
               "command": {"argv": _redact(argv), "exit_code": p.returncode}}
        if check and p.returncode != 0:
            raise git_failure(out)
        return out


def _redact(argv: list[str]) -> list[str]:
    return [re.sub(r"//[^/@\s]+@", "//***@", a) for a in argv]


def git_failure(out: dict[str, Any]) -> HttpError:
    """Classify a failed git run: auth, missing upstream, or generic."""
    err = out["stderr"]
    low = err.lower()
    if any(s in low for s in ("authentication failed", "could not read username",
                              "could not read password", "permission denied (publickey)",
                              "invalid username or password", "terminal prompts disabled")):
        code = "git_auth_failed"
    elif any(s in low for s in ("has no upstream branch", "no tracking information",
                                "no upstream configured", "does not appear to be a git repository")):
        code = "git_upstream_missing"
    else:
        code = "git_command_failed"
    return HttpError(422, code, err.strip() or f"git exited with {out['command']['exit_code']}",
                     {"git": out})


def git_result(path: str | None, out: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """GitResult with every key the SDK may read (unknown ones null)."""
    base: dict[str, Any] = {"path": path, "stdout": "", "stderr": "", "url": None, "ref": None,
                            "branch": None, "remote": None, "name": None, "value": None, "branches": [],
                            "current_branch": None, "command": None}
    if out:
        base.update(out)
    base.update(extra)
    return {"git": base}


def _scope(call: GitCall) -> list[str]:
    scope = call.arg("scope") or ("local" if call.body.get("path") else "global")
    if scope not in ("global", "local", "system", "worktree"):
        raise HttpError(422, "validation_failed", f"bad scope {scope!r}")
    return [f"--{scope}"]


def _config_cwd(call: GitCall) -> str | None:
    return call.repo() if call.body.get("path") else None


def git_clone(call: GitCall) -> dict[str, Any]:
    url = str(call.arg("url", True))
    argv = ["git", *call.creds(), "clone"]
    branch, depth = call.arg("branch"), call.arg("depth")
    if branch:
        argv += ["--branch", str(branch), "--single-branch"]
    if depth:
        argv += ["--depth", str(int(depth))]
    if call.arg("recursive"):
        argv.append("--recurse-submodules")
    path = call.body.get("path")
    if not path:
        path = os.path.basename(url.rstrip("/")).removesuffix(".git") or "repo"
    dest = os.path.normpath(path if str(path).startswith("/") else os.path.join(call.cwd, str(path)))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    out = call.run([*argv, "--", url, dest])
    if call.arg("dangerously_store_credentials") and call.body.get("username"):
        _store_credentials(call, url)
    return git_result(dest, out, url=url, branch=branch)


def _store_credentials(call: GitCall, url: str) -> None:
    parts = urlsplit(url)
    call.run(["git", "config", "--global", "credential.helper", "store"])
    call.run(["git", "credential", "approve"], stdin=(
        f"protocol={parts.scheme or 'https'}\nhost={parts.netloc.rsplit('@', 1)[-1]}\n"
        f"username={call.body.get('username')}\npassword={call.body.get('password') or ''}\n\n"))


def git_authenticate(call: GitCall) -> dict[str, Any]:
    call.arg("username", True)
    call.arg("password", True)
    host = call.arg("host") or "github.com"
    _store_credentials(call, f"{call.arg('protocol') or 'https'}://{host}")
    return git_result(None, remote=host)


def git_configure_user(call: GitCall) -> dict[str, Any]:
    name, email = str(call.arg("name", True)), str(call.arg("email", True))
    scope, cwd = _scope(call), _config_cwd(call)
    call.run(["git", "config", *scope, "user.name", name], cwd=cwd)
    out = call.run(["git", "config", *scope, "user.email", email], cwd=cwd)
    return git_result(cwd, out, name=name, value=email)


def git_init(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    os.makedirs(path, exist_ok=True)
    argv = ["git", "init"]
    if call.arg("bare"):
        argv.append("--bare")
    if call.arg("initial_branch"):
        argv.append(f"--initial-branch={call.arg('initial_branch')}")
    return git_result(path, call.run([*argv, path]), branch=call.arg("initial_branch"))


def git_status(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    out = call.run(["git", "status", "--porcelain=v1", "--branch"], cwd=path)
    return git_result(path, out, current_branch=_current_branch(call, path))


def _current_branch(call: GitCall, path: str) -> str | None:
    out = call.run(["git", "branch", "--show-current"], cwd=path, check=False)
    return out["stdout"].strip() or None


def git_branches(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    out = call.run(["git", "branch", "--list", "--format=%(refname:short)"], cwd=path)
    names = [b for b in out["stdout"].splitlines() if b and not b.startswith("(")]
    current = _current_branch(call, path)
    return git_result(path, out, branches=names, current_branch=current, branch=current)


def git_create_branch(call: GitCall) -> dict[str, Any]:
    path, branch = call.repo(), str(call.arg("branch", True))
    out = call.run(["git", "checkout", "-b", branch], cwd=path)
    return git_result(path, out, branch=branch, current_branch=branch)


def git_delete_branch(call: GitCall) -> dict[str, Any]:
    path, branch = call.repo(), str(call.arg("branch", True))
    out = call.run(["git", "branch", "-D" if call.arg("force") else "-d", branch], cwd=path)
    return git_result(path, out, branch=branch)


def git_add(call: GitCall) -> dict[str, Any]:
    path, files = call.repo(), call.arg("files")
    if files:
        argv = ["git", "add", "--", *(str(f) for f in files)]
    elif call.body.get("all", True):
        argv = ["git", "add", "-A"]
    else:
        argv = ["git", "add", "-u"]
    return git_result(path, call.run(argv, cwd=path))


def git_commit(call: GitCall) -> dict[str, Any]:
    path, message = call.repo(), str(call.arg("message", True))
    name, email = call.arg("author_name"), call.arg("author_email")
    if name:
        call.env["GIT_AUTHOR_NAME"] = call.env["GIT_COMMITTER_NAME"] = str(name)
    if email:
        call.env["GIT_AUTHOR_EMAIL"] = call.env["GIT_COMMITTER_EMAIL"] = str(email)
    argv = ["git", "commit", "-m", message]
    if call.arg("allow_empty"):
        argv.append("--allow-empty")
    out = call.run(argv, cwd=path)
    head = call.run(["git", "rev-parse", "HEAD"], cwd=path, check=False)["stdout"].strip()
    return git_result(path, out, ref=head or None, current_branch=_current_branch(call, path))


def git_reset(call: GitCall) -> dict[str, Any]:
    path, mode, target, paths = call.repo(), call.arg("mode"), call.arg("target"), call.arg("paths")
    if paths:
        argv = ["git", "reset", "-q", *([str(target)] if target else []), "--", *(str(p) for p in paths)]
    else:
        if mode and mode not in ("soft", "mixed", "hard", "merge", "keep"):
            raise HttpError(422, "validation_failed", f"bad reset mode {mode!r}")
        argv = ["git", "reset", *([f"--{mode}"] if mode else []), *([str(target)] if target else [])]
    return git_result(path, call.run(argv, cwd=path), ref=target)


def git_restore(call: GitCall) -> dict[str, Any]:
    path, paths = call.repo(), call.arg("paths", True)
    argv = ["git", "restore"]
    if call.arg("staged"):
        argv.append("--staged")
    if call.arg("worktree"):
        argv.append("--worktree")
    if call.arg("source"):
        argv.append(f"--source={call.arg('source')}")
    return git_result(path, call.run([*argv, "--", *(str(p) for p in paths)], cwd=path))


def git_pull(call: GitCall) -> dict[str, Any]:
    path, remote, branch = call.repo(), call.arg("remote"), call.arg("branch")
    argv = ["git", *call.creds(), "pull", "--ff-only"]
    if remote:
        argv.append(str(remote))
        if branch:
            argv.append(str(branch))
    return git_result(path, call.run(argv, cwd=path), remote=remote, branch=branch)


def git_push(call: GitCall) -> dict[str, Any]:
    path, remote, branch = call.repo(), call.arg("remote"), call.arg("branch")
    argv = ["git", *call.creds(), "push"]
    if call.arg("set_upstream"):
        remote = remote or "origin"
        branch = branch or _current_branch(call, path)
        argv.append("--set-upstream")
    if remote:
        argv.append(str(remote))
        if branch:
            argv.append(str(branch))
    return git_result(path, call.run(argv, cwd=path), remote=remote, branch=branch)


def git_checkout(call: GitCall) -> dict[str, Any]:
    path, ref = call.repo(), str(call.arg("ref", True))
    out = call.run(["git", "checkout", ref], cwd=path)
    current = _current_branch(call, path)
    return git_result(path, out, ref=ref, branch=current, current_branch=current)


def git_remote_add(call: GitCall) -> dict[str, Any]:
    path, name, url = call.repo(), str(call.arg("name", True)), str(call.arg("url", True))
    exists = call.run(["git", "remote", "get-url", name], cwd=path, check=False)["command"]["exit_code"] == 0
    if exists and call.arg("overwrite"):
        out = call.run(["git", "remote", "set-url", name, url], cwd=path)
        if call.arg("fetch"):
            out = call.run(["git", "fetch", name], cwd=path)
    else:
        out = call.run(["git", "remote", "add", *(["-f"] if call.arg("fetch") else []), name, url], cwd=path)
    return git_result(path, out, name=name, url=url, remote=name, value=url)


def git_remote_get(call: GitCall) -> dict[str, Any]:
    path, name = call.repo(), str(call.arg("name", True))
    out = call.run(["git", "remote", "get-url", name], cwd=path, check=False)
    url = out["stdout"].strip() if out["command"]["exit_code"] == 0 else None
    return git_result(path, out, name=name, remote=name, url=url, value=url)


def git_set_config(call: GitCall) -> dict[str, Any]:
    key, value = str(call.arg("key", True)), str(call.arg("value", True))
    cwd = _config_cwd(call)
    out = call.run(["git", "config", *_scope(call), key, value], cwd=cwd)
    return git_result(cwd, out, name=key, value=value)


def git_get_config(call: GitCall) -> dict[str, Any]:
    key, cwd = str(call.arg("key", True)), _config_cwd(call)
    out = call.run(["git", "config", *_scope(call), "--get", key], cwd=cwd, check=False)
    code = out["command"]["exit_code"]
    if code not in (0, 1):
        raise git_failure(out)
    return git_result(cwd, out, name=key, value=out["stdout"].rstrip("\n") if code == 0 else None)


GIT_OPS: dict[str, Callable[[GitCall], dict[str, Any]]] = {
    "clone": git_clone, "dangerously_authenticate": git_authenticate, "configure_user": git_configure_user,
    "init": git_init, "status": git_status, "branches": git_branches, "create_branch": git_create_branch,
    "delete_branch": git_delete_branch, "add": git_add, "commit": git_commit, "reset": git_reset,
    "restore": git_restore, "pull": git_pull, "push": git_push, "checkout": git_checkout,
    "remote_add": git_remote_add, "remote_get": git_remote_get, "set_config": git_set_config,
    "get_config": git_get_config,
}


# --------------------------------------------------------------------------- routing

Result = tuple[int, Any] | None  # None: the handler wrote the response (stream, WebSocket)
Handler = Callable[["Agent", "Request"], Result]


@dataclass
class Request:
    """What a route handler sees. ``body`` (JSON) is read lazily so streaming routes can stream."""

    method: str
    path: str
    token: str | None
    query: dict[str, str] = field(default_factory=dict)
    raw_query: str = ""
    params: dict[str, str] = field(default_factory=dict)
    http: AgentHandler | None = None
    _json: dict[str, Any] | None = None

    @property
    def body(self) -> dict[str, Any]:
        if self._json is None:
            self._json = self.http.read_json() if self.http is not None else {}
        return self._json

    def q(self, key: str, default: str | None = None) -> str | None:
        return self.query.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.query.get(key)
        return default if value is None else value.lower() in ("1", "true", "yes", "on")

    def int_q(self, key: str, default: int | None = None) -> int | None:
        value = self.query.get(key)
        if value in (None, "", "null", "None"):
            return default
        try:
            return int(value)
        except ValueError as e:
            raise HttpError(400, "bad_request", f"{key} must be an integer") from e


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    fn: Handler
    auth: str
    websocket: bool


class Router:
    """Maps (method, path pattern, websocket?) to handlers; each route declares its auth."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, path: str, auth: str = "secret",
            websocket: bool = False) -> Callable[[Handler], Handler]:
        """Decorator. ``auth`` is "none", "init" (custom check in handler) or "secret";
        ``{name}`` in ``path`` captures one (percent-decoded) segment."""
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")

        def deco(fn: Handler) -> Handler:
            self.routes.append(Route(method, regex, fn, auth, websocket))
            return fn
        return deco

    def match(self, method: str, path: str, websocket: bool) -> tuple[Route, dict[str, str]]:
        """The route for the request; 405 (with ``Allow``) when the path has routes but none
        for this method, 426 when its only ``GET`` is a WebSocket one and this is no upgrade."""
        allowed: set[str] = set()
        upgrade_only = False
        for r in self.routes:
            m = r.pattern.match(path)
            if m is None:
                continue
            if r.websocket == websocket and r.method in (method, "*"):
                return r, {k: unquote(v) for k, v in m.groupdict().items()}
            if r.websocket and not websocket and r.method == method:
                upgrade_only = True
            allowed.add(r.method)
        if upgrade_only:
            raise HttpError(426, "upgrade_required", f"{method} {path} is a WebSocket: connect with an "
                            "Upgrade: websocket request", headers=[("Upgrade", "websocket")])
        if allowed:
            methods = ", ".join(sorted(allowed))
            raise HttpError(405, "method_not_allowed", f"{path} answers {methods}, not {method}",
                            headers=[("Allow", methods)])
        raise HttpError(404, "not_found", f"no route {method} {path}")


router = Router()


class Agent:
    """The agent's state and services, shared by all request threads."""

    def __init__(self, secret: str) -> None:
        self.state = AgentState(secret=secret)
        self.processes = ProcessTable()
        self.procs = ProcessManager()
        self.workdir: str | None = None

    def dispatch(self, req: Request, websocket: bool = False) -> Result:
        """Find the route, enforce its auth, call it."""
        if req.path.startswith("/proxy/"):
            self.state.check(req.token, roles=(PREVIEW,))
            return proxy(self, req)
        route, req.params = router.match(req.method, req.path, websocket)
        if route.auth == "secret":
            data_plane = req.path.startswith(RT + "/")
            self.state.check(req.token, roles=(CONTROL, DATAPLANE) if data_plane else (CONTROL,))
        return route.fn(self, req)

    def process_env(self) -> dict[str, str]:
        """Environment for new processes: a sane base plus the sandbox env vars from init (§6.5)."""
        base = {"PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
                "SHELL": "/bin/bash", "LANG": "C.UTF-8"}
        with self.state.lock:
            return {**base, **self.state.env}

    def default_cwd(self) -> str:
        """The template workdir if init gave one, else /workspace, else root's home."""
        for candidate in (self.workdir, "/workspace", "/root"):
            if candidate and os.path.isdir(candidate):
                return candidate
        return "/"


# --------------------------------------------------------------------------- host routes


@router.add("GET", "/health", auth="none")
def health(agent: Agent, req: Request) -> Result:
    return 200, {"status": "ok"}


@router.add("POST", "/init", auth="init")
def init(agent: Agent, req: Request) -> Result:
    """Give this VM its identity: secret, env vars, clock, hostname, entropy."""
    b = req.body
    secret = b.get("secret")
    if not isinstance(secret, str):
        raise HttpError(400, "bad_request", "secret required")
    agent.state.rotate(req.token, secret, seal=bool(b.get("seal", False)))
    if "entropy" in b:
        add_entropy(base64.b64decode(b["entropy"]))
    if "clock" in b:
        set_clock(float(b["clock"]))
    if b.get("hostname"):
        set_hostname(str(b["hostname"]))
    if "env_vars" in b:
        env = {str(k): str(v) for k, v in (b["env_vars"] or {}).items()}
        with agent.state.lock:
            agent.state.env = env
    if b.get("workdir"):
        agent.workdir = str(b["workdir"])
    return 200, {"status": "ok", "time": time.time()}


@router.add("POST", "/exec")
def exec_(agent: Agent, req: Request) -> Result:
    """Run ``cmd`` (list, or string for ``sh -c``); ``background`` returns at once with a pid."""
    cmd = req.body.get("cmd")
    if isinstance(cmd, str):
        cmd = ["/bin/sh", "-c", cmd]
    if not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
        raise HttpError(400, "bad_request", "cmd must be a string or a list of strings")
    env = {**agent.process_env(), **{str(k): str(v) for k, v in req.body.get("env", {}).items()}}
    cwd = req.body.get("cwd")
    if req.body.get("background"):
        return 200, {"pid": agent.processes.start(cmd, env, cwd)}
    stdin = req.body.get("stdin")
    timeout = float(req.body.get("timeout", 60))
    return 200, run_command(cmd, env, cwd, timeout, stdin.encode() if stdin else None)


@router.add("GET", "/processes")
def processes(agent: Agent, req: Request) -> Result:
    return 200, {"processes": agent.processes.list()}


# --------------------------------------------------------------------------- /runtime/v1 files

RT = "/runtime/v1"


@router.add("GET", f"{RT}/files")
def read_file(agent: Agent, req: Request) -> Result:
    """Stream the file: sendfile with Content-Length, or chunked (gzip=true, /proc-like files)."""
    path = norm_path(req.q("path"))
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after streaming)
    except OSError as e:
        raise os_error(e, path) from e
    with f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise HttpError(422, "is_a_directory", f"{path} is a directory")
        h = req.http
        assert h is not None
        headers = [("Content-Type", "application/octet-stream"),
                   ("Content-Disposition", content_disposition(os.path.basename(path)))]
        if req.flag("gzip"):
            deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
            h.start_response(200, headers, None)
            while chunk := f.read(CHUNK):
                h.write_body(deflate.compress(chunk))
            h.write_body(deflate.flush())
        elif stat.S_ISREG(st.st_mode) and st.st_size > 0:
            h.start_response(200, headers, st.st_size)
            sent = h.connection.sendfile(f, 0, st.st_size)
            if sent != st.st_size:  # file shrank meanwhile: the framing is broken, drop the connection
                h.close_connection = True
        else:
            h.start_response(200, headers, None)
            while chunk := f.read(CHUNK):
                h.write_body(chunk)
        h.end_body()
    return None


def content_disposition(name: str) -> str:
    """``attachment`` naming the file (RFC 6266): a quoted ASCII fallback, and the exact
    name in ``filename*`` (RFC 5987) when it is not plain ASCII. Control characters
    never reach the header."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name) or "download"
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        raw = name.encode("utf-8", "surrogateescape")  # names that are not UTF-8 keep their bytes
        value += "; filename*=UTF-8''" + quote(raw, safe="!#$&+-.^_`|~")
    return value


@router.add("PUT", f"{RT}/files")
def write_file(agent: Agent, req: Request) -> Result:
    path = norm_path(req.q("path"))
    assert req.http is not None
    return 200, {"file": write_stream(path, req.http.body_chunks(), req.flag("gzip"))}


@router.add("POST", f"{RT}/files/write_files")
def write_files(agent: Agent, req: Request) -> Result:
    """Validate and decode every file first, then write them in request order."""
    files = req.body.get("files")
    if not isinstance(files, list) or not files:
        raise HttpError(422, "validation_failed", "files must be a non-empty list")
    decoded: list[tuple[str, bytes]] = []
    for i, item in enumerate(files):
        if not isinstance(item, dict):
            raise HttpError(422, "validation_failed", f"files[{i}] must be an object")
        path = norm_path(item.get("path"), f"files[{i}].path")
        try:
            data = base64.b64decode(item.get("data_base64") or item.get("data") or "", validate=True)
            if item.get("gzip"):
                data = zlib.decompress(data, 47)
        except (ValueError, zlib.error) as e:
            raise HttpError(422, "validation_failed", f"files[{i}]: bad data: {e}") from e
        decoded.append((path, data))
    return 200, {"files": [write_stream(p, iter((d,)), False) for p, d in decoded]}


@router.add("GET", f"{RT}/files/stat")
def stat_file(agent: Agent, req: Request) -> Result:
    return 200, {"file": file_entry(norm_path(req.q("path")))}


@router.add("DELETE", f"{RT}/files")
def delete_file(agent: Agent, req: Request) -> Result:
    remove_path(norm_path(req.q("path")))
    return 200, {"deleted": True}


@router.add("POST", f"{RT}/files/move")
def move_file(agent: Agent, req: Request) -> Result:
    src = norm_path(req.body.get("from_path") or req.body.get("from"), "from_path")
    dst = norm_path(req.body.get("to_path") or req.body.get("to"), "to_path")
    return 200, {"file": move_path(src, dst)}


@router.add("POST", f"{RT}/files/apply_diff")
def apply_diff(agent: Agent, req: Request) -> Result:
    diff = req.body.get("diff")
    if not isinstance(diff, str) or not diff.strip():
        raise HttpError(422, "patch_parse_failed", "diff must be a non-empty string")
    cwd = norm_path(req.body["cwd"], "cwd") if req.body.get("cwd") else agent.default_cwd()
    if not os.path.isdir(cwd):
        raise HttpError(404, "file_not_found", f"cwd {cwd} does not exist")
    if diff.lstrip().startswith("*** Begin Patch"):
        return 200, apply_patch_document(diff, cwd)
    return 200, apply_unified_diff(diff, cwd, agent.process_env())


@router.add("GET", f"{RT}/directories")
def list_directory(agent: Agent, req: Request) -> Result:
    depth = max(1, req.int_q("depth", 1) or 1)
    return 200, {"entries": list_dir(norm_path(req.q("path")), depth)}


@router.add("POST", f"{RT}/directories")
def create_directory(agent: Agent, req: Request) -> Result:
    return 200, {"file": make_dir(norm_path(req.q("path")))}


@router.add("GET", f"{RT}/files/watch", websocket=True)
def watch(agent: Agent, req: Request) -> Result:
    path = norm_path(req.q("path"))
    try:
        st = os.stat(path)
    except OSError as e:
        raise os_error(e, path) from e
    if not stat.S_ISDIR(st.st_mode):
        raise HttpError(422, "not_a_directory", f"{path} is not a directory")
    if not req.flag("allow_network_mounts") and fs_type(path) in NETWORK_FS:
        raise HttpError(422, "validation_failed", f"{path} is on a network mount; pass allow_network_mounts")
    assert req.http is not None
    try:
        ino = Inotify(path, req.flag("recursive"))
    except OSError as e:
        raise HttpError(422, "watch_failed", f"cannot watch {path}: {e}") from e
    try:
        ws = req.http.upgrade()
    except BaseException:
        ino.close()
        raise
    run_watch(ws, ino, req.flag("include_entry"))
    return None


# --------------------------------------------------------------------------- /runtime/v1 processes


@router.add("GET", f"{RT}/process")
def list_processes(agent: Agent, req: Request) -> Result:
    return 200, {"processes": [p.record() for p in agent.procs.list() if not p.finished]}


@router.add("GET", f"{RT}/process/{{pid}}")
def process_status(agent: Agent, req: Request) -> Result:
    return 200, agent.procs.get(req.params["pid"]).record()


@router.add("GET", f"{RT}/process/{{pid}}/output")
def process_output(agent: Agent, req: Request) -> Result:
    proc = agent.procs.get(req.params["pid"])
    return 200, proc.output(max(0, req.int_q("since", 0) or 0), req.int_q("limit_bytes"))


@router.add("DELETE", f"{RT}/process/{{pid}}")
def kill_process(agent: Agent, req: Request) -> Result:
    """Signal (default TERM) the group; answer once it died, or with ``killing`` after a short wait."""
    proc = agent.procs.get(req.params["pid"])
    sig = parse_signal(req.q("signal"), signal.SIGTERM)
    grace_ms = max(0, req.int_q("grace_ms", 0) or 0)
    proc.kill(sig, req.flag("kill_group", True), grace_ms)
    proc.wait_finished(2.0)
    return 200, proc.record()


@router.add("POST", f"{RT}/process/{{pid}}/signal")
def signal_process(agent: Agent, req: Request) -> Result:
    proc = agent.procs.get(req.params["pid"])
    proc.kill(parse_signal(req.body.get("signal"), signal.SIGKILL), bool(req.body.get("kill_group", True)), 0)
    proc.wait_finished(1.0)
    return 200, proc.record()


@router.add("GET", f"{RT}/process", websocket=True)
def start_process_ws(agent: Agent, req: Request) -> Result:
    """WS start: first client frame is ``start``; errors before ``started`` are ``error`` frames."""
    assert req.http is not None
    ws = req.http.upgrade()
    raw = ws.recv()
    if raw is None:
        return None
    try:
        msg = json.loads(raw)
        if not isinstance(msg, dict) or msg.get("type") != "start":
            raise HttpError(400, "bad_request", "first frame must be {\"type\": \"start\", ...}")
        proc = agent.procs.start(msg, agent.process_env(), agent.default_cwd())
    except (ValueError, HttpError) as e:
        err = e if isinstance(e, HttpError) else HttpError(400, "bad_request", f"invalid start frame: {e}")
        with contextlib.suppress(WsClosed):
            ws.send_json({"type": "error", "code": err.code, "message": err.message})
        ws.close(1000)
        return None
    stream_process(ws, proc, 0)
    return None


@router.add("GET", f"{RT}/process/{{pid}}/connect", websocket=True)
def connect_process_ws(agent: Agent, req: Request) -> Result:
    """Attach: unknown pid is a 404 *handshake*; then started, replay from ``since``, live."""
    proc = agent.procs.get(req.params["pid"])
    since = max(0, req.int_q("since", 0) or 0)
    assert req.http is not None
    stream_process(req.http.upgrade(), proc, since)
    return None


def stream_process(ws: WebSocket, proc: ManagedProcess, since: int) -> None:
    """Send ``started``, the replay and live events until ``exit`` (then close 1000).

    Client frames are handled by a second thread so acks flow while output streams;
    the socket closing never affects the process. ``control`` orders acks before the
    ``exit`` they may cause (close_stdin → EOF → exit), and after ``exit`` the socket
    lingers briefly so frames already in flight (a send_stdin racing the exit) still get
    their ack; SDK clients close as soon as they see ``exit``, so this costs them nothing.
    """
    replay, sub = proc.attach(since)
    try:
        ws.send_json(proc.started_frame())
    except WsClosed:
        proc.detach(sub)
        return
    control = threading.Lock()
    reader = threading.Thread(target=client_frames, args=(ws, proc, sub, control), daemon=True)
    reader.start()
    try:
        done = False
        for ev in replay:
            send_event(ws, ev, control)
            done = ev.kind == "exit"
        while not done:
            ev = sub.pop(1.0)
            if ev is not None:
                send_event(ws, ev, control)
                done = ev.kind == "exit"
            elif sub.lagged:
                ws.send_json({"type": "lagged", "dropped": sub.dropped})
                break
            elif sub.closed:
                break
        if done:
            reader.join(timeout=EXIT_LINGER)
    except WsClosed:
        pass
    finally:
        proc.detach(sub)
        ws.close(1000)
        reader.join(timeout=5)


def send_event(ws: WebSocket, ev: Event, control: threading.Lock) -> None:
    if ev.kind == "exit":
        with control:
            ws.send_json(ev.frame())
    else:
        ws.send_json(ev.frame())


def client_frames(ws: WebSocket, proc: ManagedProcess, sub: Subscriber, control: threading.Lock) -> None:
    """Handle stdin / close_stdin / signal / resize / ping frames in order, until the client closes."""
    try:
        while (raw := ws.recv()) is not None:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if isinstance(msg, dict):
                with control:
                    client_frame(ws, proc, msg)
    except WsClosed:
        pass
    finally:
        sub.close()


def client_frame(ws: WebSocket, proc: ManagedProcess, msg: dict[str, Any]) -> None:
    """One client → server frame (spec §5.3); stdin for a finished process is acked and dropped.

    Stdin for a process started without it (``stdin: false``: its stdin is /dev/null) is
    an ``error`` frame, not an ack: the bytes could never be read, and the SDK raises it.
    """
    kind = msg.get("type")
    if kind == "stdin" and not proc.stdin_enabled:
        ws.send_json({"type": "error", "code": "stdin_not_enabled", "pid": proc.id,
                      "message": f"process {proc.id} was started without stdin (its stdin is /dev/null), "
                                 "so input cannot reach it: start it with stdin=True to send input"})
    elif kind == "stdin":
        try:
            data = base64.b64decode(msg.get("data") or "")
        except ValueError:
            data = str(msg.get("data") or "").encode()
        proc.write_stdin(data)
        ws.send_json({"type": "stdin_ack", "pid": proc.id})
    elif kind == "close_stdin":
        proc.close_stdin()
        ws.send_json({"type": "close_stdin_ack", "pid": proc.id})
    elif kind == "signal":
        with contextlib.suppress(HttpError):
            proc.kill(parse_signal(msg.get("signal"), signal.SIGKILL), True, 0)
    elif kind == "resize":
        proc.resize(int(msg.get("cols") or 80), int(msg.get("rows") or 24))
        # the SDK closes right after a resize and never reads this; a client that waits on it
        # knows the window has its new size (a frame type clients ignore, like the other acks)
        ws.send_json({"type": "resize_ack", "pid": proc.id})
    elif kind == "ping":
        ws.send_json({"type": "pong"})


# --------------------------------------------------------------------------- /runtime/v1 git


@router.add("POST", f"{RT}/git/{{op}}")
def git_route(agent: Agent, req: Request) -> Result:
    fn = GIT_OPS.get(req.params["op"])
    if fn is None:
        raise HttpError(404, "not_found", f"unknown git operation {req.params['op']!r}")
    body = {k: v for k, v in req.body.items() if v is not None}
    extra = body.get("envs") or {}
    env = {**agent.process_env(), **{str(k): str(v) for k, v in extra.items()}, "GIT_TERMINAL_PROMPT": "0"}
    cwd = str(body.get("cwd") or agent.default_cwd())
    timeout = float(body.get("timeout_seconds") or 300)
    return 200, fn(GitCall(body, env, cwd, timeout, body.get("user")))


# --------------------------------------------------------------------------- preview proxy


def proxy(agent: Agent, req: Request) -> Result:
    """``/proxy/<port>/<rest>?<query>`` → ``http://127.0.0.1:<port>/<rest>?<query>``, streamed both ways.

    The agent secret is never forwarded; the edge may pass the client's own Authorization
    in ``X-Watasu-Forwarded-Authorization``.
    """
    m = re.fullmatch(r"/proxy/(\d{1,5})(/.*)?", req.path)
    if m is None or not 0 < int(m[1]) < 65536:
        raise HttpError(404, "not_found", "expected /proxy/<port>/<path>")
    port, h = int(m[1]), req.http
    assert h is not None
    target = (m[2] or "/") + (f"?{req.raw_query}" if req.raw_query else "")
    skip = HOP_BY_HOP | {"authorization", "content-length", "x-watasu-forwarded-authorization"}
    headers = [(k, v) for k, v in h.headers.items() if k.lower() not in skip]
    if h.headers.get("X-Watasu-Forwarded-Authorization"):
        headers.append(("Authorization", h.headers["X-Watasu-Forwarded-Authorization"]))
    if not h.headers.get("Host"):
        headers.append(("Host", f"127.0.0.1:{port}"))
    if h.is_upgrade():
        return proxy_tunnel(h, port, req.method, target, headers)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.putrequest(req.method, target, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if h.chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif h.remaining:
            conn.putheader("Content-Length", str(h.remaining))
        conn.endheaders()
        for chunk in h.body_chunks():
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if h.chunked else chunk)
        if h.chunked:
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
    except ConnectionRefusedError as e:
        conn.close()
        raise not_listening(port) from e
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise HttpError(502, "bad_gateway", f"upstream on port {port} failed: {e}") from e
    try:
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
        if req.method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            cl = resp.getheader("Content-Length")
            h.start_response(resp.status, out + ([("Content-Length", cl)] if cl else []), None,
                             body=False, reason=resp.reason)
            return None
        h.start_response(resp.status, out, resp.length, reason=resp.reason)
        while data := resp.read1(CHUNK):
            h.write_body(data)
        h.end_body()
    finally:
        conn.close()
    return None


def not_listening(port: int) -> HttpError:
    return HttpError(502, "port_not_listening", f"nothing is listening on port {port} in the sandbox")


def proxy_tunnel(h: AgentHandler, port: int, method: str, target: str,
                 headers: list[tuple[str, str]]) -> Result:
    """Upgrade requests (WebSocket dev servers): forward the head, then splice bytes both ways."""
    try:
        up = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        raise not_listening(port) from e
    up.settimeout(None)
    head = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers),
            "Connection: Upgrade", f"Upgrade: {h.headers.get('Upgrade', 'websocket')}"]
    up.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    h.response_started = True
    h.close_connection = True

    def client_to_upstream() -> None:
        try:
            while data := h.rfile.read1(65536):
                up.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=client_to_upstream, daemon=True)
    t.start()
    try:
        while data := up.recv(65536):
            h.connection.sendall(data)
    except OSError:
        pass
    finally:
        up.close()
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)
    return None


# --------------------------------------------------------------------------- HTTP plumbing


class AgentHandler(BaseHTTPRequestHandler):
    """Parses HTTP/1.1 (keep-alive, chunked bodies, upgrades) and delegates to ``Agent.dispatch``."""

    server_version = "watasu-agent/0.2"
    protocol_version = "HTTP/1.1"
    agent: Agent  # set on the subclass built by ``serve``
    chunked = False
    remaining = 0
    body_done = True
    response_started = False
    chunk_out = False

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self.chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            self.remaining = 0 if self.chunked else int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.remaining = 0
            self.close_connection = True
        self.body_done = not self.chunked and self.remaining == 0
        self.response_started = self.chunk_out = False
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request(method, url.path, self._token(), query=query, raw_query=url.query, http=self)
        result: Result
        extra_headers: list[tuple[str, str]] = []
        try:
            upgrade = self.is_upgrade() and not url.path.startswith("/proxy/")
            result = self.agent.dispatch(req, websocket=upgrade)
        except HttpError as e:
            result, extra_headers = (e.status, e.payload()), e.headers
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:
            log(f"{method} {url.path}: {traceback.format_exc()}")
            result = 500, {"error": "internal_error", "message": repr(e)}
        if result is not None:
            if self.response_started:  # failed mid-stream: the only honest signal left is to hang up
                self.close_connection = True
            else:
                self.send_json(*result, headers=extra_headers)
        if not self.body_done:
            self.close_connection = True  # unread request body would be parsed as the next request

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def is_upgrade(self) -> bool:
        return ("upgrade" in self.headers.get("Connection", "").lower()
                and bool(self.headers.get("Upgrade")))

    # -- request body

    def body_chunks(self) -> Iterator[bytes]:
        """The request body in pieces, honouring Content-Length or chunked transfer encoding."""
        if self.chunked:
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as e:
                    self.close_connection = True
                    raise HttpError(400, "bad_request", "malformed chunked body") from e
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self.body_done = True
                    return
                while size:
                    data = self.rfile.read(min(size, CHUNK))
                    if not data:
                        raise HttpError(400, "bad_request", "body ended early")
                    size -= len(data)
                    yield data
                self.rfile.readline()
        while self.remaining > 0:
            data = self.rfile.read(min(self.remaining, CHUNK))
            if not data:
                raise HttpError(400, "bad_request", "body shorter than Content-Length")
            self.remaining -= len(data)
            yield data
        self.body_done = True

    def read_json(self) -> dict[str, Any]:
        if not self.chunked and self.remaining > MAX_BODY:
            raise HttpError(413, "payload_too_large", "body too large")
        parts, size = [], 0
        for chunk in self.body_chunks():
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(413, "payload_too_large", "body too large")
            parts.append(chunk)
        if not size:
            return {}
        try:
            body = json.loads(b"".join(parts))
        except ValueError as e:
            raise HttpError(400, "bad_request", f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise HttpError(400, "bad_request", "body must be a JSON object")
        return body

    # -- responses

    def send_json(self, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        for name, value in headers or []:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_response(self, status: int, headers: list[tuple[str, str]], length: int | None,
                       body: bool = True, reason: str | None = None) -> None:
        """Send the status line and headers; ``length=None`` means chunked transfer encoding."""
        self.response_started = True
        self.send_response(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if body and length is None:
            self.chunk_out = True
            self.send_header("Transfer-Encoding", "chunked")
        elif body:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def write_body(self, data: bytes) -> None:
        if not data:
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunk_out else data)

    def end_body(self) -> None:
        if self.chunk_out:
            self.wfile.write(b"0\r\n\r\n")

    def upgrade(self) -> WebSocket:
        """Complete the RFC 6455 handshake (101) and hand back the framed connection."""
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or self.headers.get("Upgrade", "").lower() != "websocket":
            raise HttpError(400, "bad_request", "not a WebSocket upgrade")
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", WebSocket.accept_key(key))
        self.end_headers()
        self.response_started = True
        self.close_connection = True
        self.body_done = True
        return WebSocket(self.rfile, self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        """Status line and Date, without the ``Server`` header naming the agent and its Python."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve(host: str = "0.0.0.0", port: int = AGENT_PORT, secret: str | None = None) -> None:
    """Serve forever. ``secret`` overrides the boot token (for tests on the host)."""
    agent = Agent(secret or boot_token())
    handler = type("BoundHandler", (AgentHandler,), {"agent": agent})
    with AgentServer((host, port), handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    serve(port=int(os.environ.get("WATASU_AGENT_PORT", AGENT_PORT)),
          secret=os.environ.get("WATASU_AGENT_TOKEN"))

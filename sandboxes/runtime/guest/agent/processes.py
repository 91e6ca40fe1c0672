"""Data-plane processes (pipes or a PTY): their records, replayable event logs and control."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import grp
import os
import pwd
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections import deque
from typing import Any

from .core import HttpError, iso
from .events import Event, Subscriber, utf8_split
from .login import LoginCache, is_login_command

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RETAIN_BYTES = 16 * 1024 * 1024  # per-process output kept for replay
RETAIN_EVENTS = 100_000
FINISHED_KEEP = 1000  # finished process records kept (oldest purged first)
DROPPED_KEEP = 100_000  # ids of purged records remembered, to say so in their 404
FINISHED_RETAIN_BYTES = 64 * 1024 * 1024  # output kept across all finished processes
EXIT_LINGER = 0.5  # seconds a socket stays open after `exit` for in-flight client frames


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


class ManagedProcess:
    """A process started over the data plane: its record, event log and attached sockets."""

    def __init__(
        self,
        pid: str,
        argv: list[str],
        envs: dict[str, str],
        cwd: str,
        user: str | None,
        pty: bool,
        tag: str | None,
    ) -> None:
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
        """Process record: ``id`` = ``pid`` = stable id, ``os_pid`` = guest pid."""
        return {
            "id": self.id,
            "pid": self.id,
            "os_pid": self.os_pid,
            "tag": self.tag,
            "cmd": self.argv[0],
            "command": self.argv[0],
            "args": self.argv[1:],
            "envs": self.envs,
            "cwd": self.cwd,
            "user": self.user or "root",
            "pty": self.pty,
            "status": self.status,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "exit_code": self.exit_code,
            "error": self.error,
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
            while len(self.events) > 1 and (self.retained > RETAIN_BYTES or len(self.events) > RETAIN_EVENTS):
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
        """Non-blocking read of retained events."""
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
            "pid": self.id,
            "status": self.status,
            "exit_code": self.exit_code,
            "finished_at": iso(self.finished_at),
            "next_cursor": events[-1]["cursor"] + 1 if events else since,
            "truncated_before_cursor": since < first,
            "truncated_by_retention": since < first,
            "events": events,
            "first_retained_cursor": first if retained else None,
            "last_retained_cursor": retained[-1].cursor if retained else None,
            "retained_bytes": sum(len(e.data) for e in retained),
            "returned_bytes": used,
            "total_bytes_observed": sum(self.totals.values()),
            "stream_totals": dict(self.totals),
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
                        view = view[os.write(fd, view) :]
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
        self.append(
            "exit",
            exit={
                "pid": self.id,
                "exit_code": code,
                "status": status,
                "error": error,
                "finished_at": iso(self.finished_at),
            },
        )
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
        self.login = LoginCache()

    def get(self, pid: str) -> ManagedProcess:
        """The process, or a 404 that says which of the two things happened."""
        with self.lock:
            proc, finished_at = self.procs.get(pid), self.dropped.get(pid)
        if proc is not None:
            return proc
        if finished_at is not None:
            raise HttpError(
                404,
                "process_not_found",
                f"process {pid} finished at {iso(finished_at)} and its "
                f"record was dropped: the sandbox keeps the {FINISHED_KEEP} most recently "
                "finished processes",
            )
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
            for old in finished[: max(0, len(finished) - FINISHED_KEEP)]:
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
        """Start a process from a ``start`` frame; errors become ``error`` frames."""
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
        run_argv, env = self._login_fast_path(argv, env, kwargs, user, pty_size)
        fds = self._spawn(proc, run_argv, env, cwd, kwargs, pty_size, proc.stdin_enabled)
        with self.lock:
            self.procs[pid] = proc
        threading.Thread(target=proc.pump, args=(fds,), daemon=True, name=f"pump-{pid}").start()
        timeout_ms = msg.get("timeout_ms")
        if isinstance(timeout_ms, int | float) and timeout_ms > 0:
            proc.timer = threading.Timer(timeout_ms / 1000, proc.on_timeout)
            proc.timer.daemon = True
            proc.timer.start()
        return proc

    def _login_fast_path(
        self, argv: list[str], env: dict[str, str], kwargs: dict[str, Any], user: str | None, pty_size: Any
    ) -> tuple[list[str], dict[str, str]]:
        """``bash -l -c <cmd>`` without re-reading the profiles (see login.py); else as asked.

        A PTY keeps the real login shell: a terminal expects one, and pays its cost once.
        """
        if pty_size or not is_login_command(argv):
            return argv, env
        return self.login.fast_argv(argv, env, kwargs, user) or (argv, env)

    @staticmethod
    def _spawn(
        proc: ManagedProcess,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        kwargs: dict[str, Any],
        pty_size: Any,
        want_stdin: bool,
    ) -> dict[int, str]:
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
                        argv,
                        env=env,
                        cwd=cwd,
                        stdin=slave,
                        stdout=slave,
                        stderr=slave,
                        start_new_session=True,
                        preexec_fn=_make_controlling_tty,
                        **kwargs,
                    )
                finally:
                    os.close(slave)
                proc.os_pid, proc.master_fd, proc.stdin_fd = proc.popen.pid, master, master
                return {master: "pty"}
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
            try:
                proc.popen = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                    stdout=w_out,
                    stderr=w_err,
                    start_new_session=True,
                    **kwargs,
                )
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

"""The code interpreter inside a ``code-interpreter`` sandbox: ``/runtime/v1/code`` on 127.0.0.1:49999.

The guest agent forwards ``/runtime/v1/code/...`` here unchanged (``agent/code.py``); only loopback
listens, so every caller went through the agent's data-plane credential check first.

Contexts are persistent interpreters. Python contexts are Jupyter kernels (Debian's ipykernel and
jupyter_client); bash contexts are one long-lived ``bash`` process each. Each language gets a default
context on first use; the default Python one is started and warmed (numpy, pandas, matplotlib imported,
inline backend) before ``/health`` says ready, so a template's memory snapshot holds a warm kernel.

Routes (JSON in and out, errors as ``{"error": code, "message": text}``):

- ``POST /runtime/v1/code/run`` ``{code, language?, context_id?, envs?, timeout_seconds?}`` answers
  ``{"execution": {results, logs: {stdout, stderr}, error, execution_count}}``. With
  ``Accept: application/x-ndjson`` it streams one JSON object per line as things happen instead:
  ``{"type": "stdout"|"stderr", "line", "timestamp"}``, ``{"type": "result", ...result}``,
  ``{"type": "error", name, value, traceback}``, ``{"type": "timeout", "message"}`` and finally
  ``{"type": "end", "execution": {...}}``.
- ``POST /runtime/v1/code/contexts`` ``{cwd?, language?}``, ``GET /runtime/v1/code/contexts``,
  ``POST /runtime/v1/code/contexts/{id}/restart``, ``DELETE /runtime/v1/code/contexts/{id}``.
- ``GET /health``: 200 once the default Python kernel is warm, 503 before.

Each stdout/stderr entry is one line (with its ``\\n``, so joining them gives the output back) and the
time the kernel emitted it. A run that outlives ``timeout_seconds`` (default 300) interrupts the
kernel (SIGINT; the context keeps its state) and answers 408 ``execution_timeout``, which the SDK
raises as ``TimeoutException``. Stdlib plus jupyter_client only: it runs on Debian 12's python3.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import json
import math
import os
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PORT = int(os.environ.get("WATASU_CODE_PORT", "49999"))
HOST = "127.0.0.1"
PREFIX = "/runtime/v1/code"
MAX_BODY = 16 * 1024 * 1024  # the code and its envs
MAX_OUTPUT = 8 * 1024 * 1024  # captured per run: lines and results
MAX_CONTEXTS = 16
DEFAULT_TIMEOUT = 300.0
INTERRUPT_GRACE = 15.0  # after SIGINT, how long a kernel may take to stop before it is restarted
KERNEL_START_TIMEOUT = 120.0  # TCG is slow
CHART_MIME = "application/vnd.watasu.chart+json"
SANDBOX_ENV_HEADER = "X-Watasu-Sandbox-Env"
# The agent's secret, hashed: a new value means this interpreter was restored from a memory
# snapshot into another sandbox, whose random generators must not repeat the snapshot's.
GENERATION_HEADER = "X-Watasu-Sandbox-Generation"
STATE_DIR = os.environ.get("WATASU_CODE_STATE_DIR", "/var/lib/watasu-code")
# Runs in every Python kernel at start (an IPython startup file): plain tracebacks, chart data
# for matplotlib figures; shipped beside this file.
KERNEL_STARTUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_kernel_startup.py")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    CHART_MIME: "chart",
}
TIMEOUT_MESSAGE = "Execution timed out - the 'timeout' option can be used to increase this timeout"
# The default kernel's warm-up, step by step (each step's time goes to the log: under TCG
# these imports are most of a template's ready wait). Nothing is left in the user's namespace.
WARM_STEPS = (
    ("numpy", "import numpy"),
    ("pandas", "import pandas\npandas.DataFrame({'a': [1]})._repr_html_()"),
    ("matplotlib", "import matplotlib.pyplot"),
    (
        "a first figure",
        "def _watasu_warm():\n"
        "    import matplotlib.pyplot as plt\n"
        "    fig, ax = plt.subplots()\n"
        "    ax.plot([0, 1], [0, 1])\n"
        "    get_ipython().display_formatter.format(fig)\n"
        "    plt.close('all')\n"
        "_watasu_warm()\n"
        "del _watasu_warm",
    ),
)


def log(msg: str) -> None:
    """Diagnostics go to the start command's log (/var/log/watasu-start.log in the guest)."""
    print(f"code-server: {msg}", file=sys.stderr, flush=True)


class ApiError(Exception):
    """An answer in the error shape; ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- one run's output


class RunOutput:
    """What one run produced, in order, bounded: stream lines, results, the error.

    ``emit`` (the streamed mode) sees each event as it is recorded; ``gone`` says the client left.
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None] | None) -> None:
        self.emit = emit
        self.stdout: list[dict[str, Any]] = []
        self.stderr: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.error: dict[str, str] | None = None
        self.execution_count: int | None = None
        self.size = 0
        self.truncated = False
        self.partial: dict[str, tuple[str, float]] = {}
        self.timed_out = False

    def _room(self, size: int) -> bool:
        if self.size + size > MAX_OUTPUT:
            self.truncated = True
            return False
        self.size += size
        return True

    def text(self, stream: str, chunk: str, ts: float) -> None:
        """A piece of stdout/stderr: whole lines are recorded now, a trailing part waits for its end."""
        held, started = self.partial.pop(stream, ("", ts))
        *whole, rest = (held + chunk).split("\n")
        for piece in whole:
            self.line(stream, piece + "\n", started)
            started = ts
        if rest:
            self.partial[stream] = (rest, started)

    def flush(self) -> None:
        for stream, (piece, ts) in list(self.partial.items()):
            self.line(stream, piece, ts)
        self.partial.clear()

    def line(self, stream: str, text: str, ts: float) -> None:
        if not self._room(len(text)):
            return
        entry = {"line": text, "timestamp": ts, "error": stream == "stderr"}
        (self.stdout if stream == "stdout" else self.stderr).append(entry)
        if self.emit:
            self.emit({"type": stream, **entry})

    def result(self, bundle: dict[str, Any], main: bool) -> None:
        result = result_of(bundle, main)
        if not self._room(len(json.dumps(result))):
            return
        self.results.append(result)
        if self.emit:
            self.emit({"type": "result", **result})

    def fail(self, name: str, value: str, traceback: str) -> None:
        self.error = {"name": name, "value": value, "traceback": traceback}
        if self.emit:
            self.emit({"type": "error", **self.error})

    def execution(self) -> dict[str, Any]:
        self.flush()
        if self.truncated:
            note = f"[output over {MAX_OUTPUT // (1024 * 1024)} MiB was dropped]\n"
            self.stderr.append({"line": note, "timestamp": time.time(), "error": True})
        out: dict[str, Any] = {
            "results": self.results,
            "logs": {"stdout": self.stdout, "stderr": self.stderr},
            "error": self.error,
            "execution_count": self.execution_count,
        }
        if self.truncated:
            out["truncated"] = True
        return out


def result_of(bundle: dict[str, Any], main: bool) -> dict[str, Any]:
    """A Jupyter MIME bundle as the SDK's ``Result``: known types by name, the rest in ``extra``."""
    result: dict[str, Any] = {"is_main_result": main}
    extra: dict[str, Any] = {}
    for mime, value in bundle.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            result[field] = value
    if extra:
        result["extra"] = extra
    return result


def timestamp(msg: dict[str, Any]) -> float:
    """When the kernel sent ``msg`` (its header date), else now."""
    date = msg.get("header", {}).get("date")
    if isinstance(date, datetime):
        return date.timestamp()
    if isinstance(date, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(date.replace("Z", "+00:00")).timestamp()
    return time.time()


# -- contexts


class Context:
    """A persistent interpreter. ``lock`` makes runs one at a time (others wait their turn)."""

    language = ""

    def __init__(self, cwd: str, default: bool) -> None:
        self.id = uuid.uuid4().hex
        self.cwd = cwd
        self.default = default
        self.lock = threading.Lock()
        self.base_env: dict[str, str] = {}  # the sandbox's env vars, as last applied here
        self.generation: str | None = None  # the sandbox it last ran in (GENERATION_HEADER)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd, "default": self.default}

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.base_env = {}
        self.start()

    def sync_env(self, env: dict[str, str]) -> None:
        """Make the sandbox's env vars (sent by the agent) this interpreter's own, once per change."""
        if env == self.base_env:
            return
        removed = [k for k in self.base_env if k not in env]
        self.set_env(env, removed)
        self.base_env = dict(env)

    def set_env(self, env: dict[str, str], removed: list[str]) -> None:
        raise NotImplementedError

    def sync_generation(self, generation: str) -> None:
        """Reseed user-space random generators the first time this interpreter runs in a
        sandbox: a kernel warmed in the template's memory snapshot would otherwise give every
        sandbox the same `random` and `numpy.random` sequences."""
        if generation and generation != self.generation:
            self.reseed()
            self.generation = generation

    def reseed(self) -> None:
        pass

    def run(
        self, code: str, envs: dict[str, str], out: RunOutput, deadline: float, gone: Callable[[], bool]
    ) -> None:
        raise NotImplementedError


class PythonContext(Context):
    """An IPython kernel with a blocking client; the kernel-side startup file adds chart data."""

    language = "python"

    def __init__(self, cwd: str, default: bool) -> None:
        super().__init__(cwd, default)
        self.km: Any = None
        self.kc: Any = None

    def start(self) -> None:
        from jupyter_client.kernelspec import KernelSpec
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="python3")
        # The kernel spec given here, not looked up: the lookup imports ipykernel (and its
        # debugger) into this server, seconds under TCG for nothing.
        km._kernel_spec = KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3",
            language="python",
        )
        # The kernel's own output (debugger notices, crashes) goes to a log of its own.
        with open(os.path.join(STATE_DIR, "kernels.log"), "ab") as kernel_log:
            km.start_kernel(cwd=self.cwd, env=kernel_env(), stdout=kernel_log, stderr=kernel_log)
        log(f"python kernel {self.id[:8]} launched (pid {km.provisioner.pid if km.provisioner else '?'})")
        if km.provisioner is not None:
            oom_first(km.provisioner.pid)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        except RuntimeError:
            log(f"python kernel {self.id[:8]} did not answer within {KERNEL_START_TIMEOUT:g} s")
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        self.km, self.kc = km, kc

    def stop(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        if self.km is not None:
            with contextlib.suppress(Exception):
                self.km.shutdown_kernel(now=True)
        self.km = self.kc = None

    def interrupt(self) -> None:
        if self.km is not None:
            with contextlib.suppress(Exception):
                self.km.interrupt_kernel()

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def set_env(self, env: dict[str, str], removed: list[str]) -> None:
        self.silent(
            f"import os as _w\n_w.environ.update({env!r})\n"
            f"for _k in {removed!r}: _w.environ.pop(_k, None)\ndel _w"
        )

    def reseed(self) -> None:
        self.silent(
            "import random as _wr, sys as _ws\n_wr.seed()\n"
            "if 'numpy' in _ws.modules: _ws.modules['numpy'].random.seed()\n"
            "del _wr, _ws"
        )

    def silent(self, code: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run housekeeping code (warm-up, envs) without output or history; its reply content."""
        msg_id = self.kc.execute(code, silent=True, store_history=False)
        return self._reply(msg_id, time.monotonic() + timeout)

    def _reply(self, msg_id: str, deadline: float) -> dict[str, Any]:
        """The shell reply to ``msg_id``; ``{}`` past the deadline, or at once if the kernel died."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.kc.get_shell_msg(timeout=min(1.0, left))
            except queue.Empty:
                if not self.alive():
                    return {"status": "error", "ename": "KernelDied", "evalue": "the kernel process exited"}
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return msg.get("content", {})
        return {}

    def run(
        self, code: str, envs: dict[str, str], out: RunOutput, deadline: float, gone: Callable[[], bool]
    ) -> None:
        if not self.alive():
            self.restart()
            out.text(
                "stderr",
                "[the python kernel had died; it was restarted and its state is lost]\n",
                time.time(),
            )
        if envs:
            self.silent(
                f"import os as _w\n_watasu_env = {{k: _w.environ.get(k) for k in {list(envs)!r}}}\n"
                f"_w.environ.update({envs!r})\ndel _w"
            )
        try:
            self._execute(code, out, deadline, gone)
        finally:
            if envs and self.alive():
                self.silent(
                    "import os as _w\nfor _k, _v in _watasu_env.items():\n"
                    "    _w.environ.pop(_k, None) if _v is None else _w.environ.__setitem__(_k, _v)\n"
                    "del _w, _k, _v, _watasu_env"
                )

    def _execute(self, code: str, out: RunOutput, deadline: float, gone: Callable[[], bool]) -> None:
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        interrupted_at: float | None = None
        next_alive_check = time.monotonic() + 1
        while True:
            now = time.monotonic()
            if interrupted_at is None and (now > deadline or gone()):
                out.timed_out = now > deadline
                self.interrupt()
                interrupted_at = now
            if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                self.restart()
                out.text("stderr", "[the kernel did not stop on interrupt; it was restarted]\n", time.time())
                return
            if now > next_alive_check:
                next_alive_check = now + 1
                if not self.alive():
                    self.restart()
                    out.fail(
                        "KernelDied",
                        "the python kernel died while running this code (out of memory?);"
                        " it was restarted and its state is lost",
                        "",
                    )
                    return
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if self._handle(msg, out):
                break
        reply = self._reply(msg_id, time.monotonic() + 10)
        if reply.get("execution_count") is not None:
            out.execution_count = reply["execution_count"]

    def _handle(self, msg: dict[str, Any], out: RunOutput) -> bool:
        """Record one iopub message; True once the kernel went idle for this run."""
        kind, content = msg["header"]["msg_type"], msg.get("content", {})
        if kind == "stream":
            out.text(
                "stderr" if content.get("name") == "stderr" else "stdout",
                content.get("text", ""),
                timestamp(msg),
            )
        elif kind in ("execute_result", "display_data"):
            out.result(content.get("data", {}), kind == "execute_result")
        elif kind == "error":
            traceback = ANSI.sub("", "\n".join(content.get("traceback", [])))
            out.fail(content.get("ename", ""), content.get("evalue", ""), traceback)
        elif kind == "execute_input":
            out.execution_count = content.get("execution_count")
        elif kind == "status" and content.get("execution_state") == "idle":
            return True
        return False


def oom_first(pid: Any) -> None:
    """Out of memory, the kernel's OOM killer takes an interpreter (the run that killed it
    gets KernelDied or BashExited) before this server, which every context depends on."""
    path = f"/proc/{pid}/oom_score_adj"
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write("500")


def kernel_env() -> dict[str, str]:
    """The server's environment plus what makes kernels quiet and load our startup file."""
    return {
        **os.environ,
        "IPYTHONDIR": os.path.join(STATE_DIR, "ipython"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONUNBUFFERED": "1",
    }


class BashContext(Context):
    """A long-lived ``bash``: each run is its code sourced from a file, then an end marker per stream."""

    language = "bash"

    def __init__(self, cwd: str, default: bool) -> None:
        super().__init__(cwd, default)
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: queue.Queue[tuple[str, bytes, float]] = queue.Queue()
        self.dir = tempfile.mkdtemp(prefix="bash-", dir=os.path.join(STATE_DIR, "runs"))

    def start(self) -> None:
        self.events = queue.Queue()
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=dict(os.environ),
            start_new_session=True,
        )
        oom_first(self.proc.pid)
        for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, pipe, self.events), daemon=True).start()

    @staticmethod
    def _pump(name: str, pipe: Any, events: queue.Queue[tuple[str, bytes, float]]) -> None:
        fd = pipe.fileno()
        while data := os.read(fd, 65536):
            events.put((name, data, time.time()))
        events.put((name, b"", time.time()))

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)
        self.proc = None

    def interrupt(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)

    def set_env(self, env: dict[str, str], removed: list[str]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            return
        lines = [f"export {shlex.quote(k)}={shlex.quote(v)}" for k, v in env.items()]
        lines += [f"unset {shlex.quote(k)}" for k in removed]
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())
        self.proc.stdin.flush()

    def run(
        self, code: str, envs: dict[str, str], out: RunOutput, deadline: float, gone: Callable[[], bool]
    ) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.restart()
            out.text("stderr", "[the bash process had exited; it was restarted]\n", time.time())
        assert self.proc is not None and self.proc.stdin is not None
        mark = f"__WATASU_END_{uuid.uuid4().hex}__"
        path = os.path.join(self.dir, "run.sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code if code.endswith("\n") else code + "\n")
        self.proc.stdin.write(bash_wrapper(path, envs, mark).encode())
        self.proc.stdin.flush()
        self._collect(mark, out, deadline, gone)

    def _collect(self, mark: str, out: RunOutput, deadline: float, gone: Callable[[], bool]) -> None:
        pending = {"stdout": "", "stderr": ""}
        # one decoder per stream: a character split across two reads is decoded whole
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in pending}
        done: dict[str, str | None] = {"stdout": None, "stderr": None}
        interrupted_at: float | None = None
        while done["stdout"] is None or done["stderr"] is None:
            now = time.monotonic()
            if interrupted_at is None and (now > deadline or gone()):
                out.timed_out = now > deadline
                self.interrupt()
                interrupted_at = now
            if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                self.restart()
                out.text("stderr", "[bash did not stop on interrupt; it was restarted]\n", time.time())
                return
            try:
                name, data, ts = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if not data:
                self.restart()
                out.fail("BashExited", "bash exited while running this code; the context was restarted", "")
                return
            text = pending[name] + decoders[name].decode(data)
            at = text.find(mark)
            if at < 0:
                ready, pending[name] = held_back(text, mark)
                out.text(name, ready, ts)
                continue
            out.text(name, text[:at], ts)
            done[name] = text[at + len(mark) :].split("\n", 1)[0].strip()
            pending[name] = ""
        code = int(done["stdout"] or 0)
        if code != 0 and out.error is None:
            out.fail("ExitCodeError" if not out.timed_out else "KeyboardInterrupt", f"exit code {code}", "")


def held_back(text: str, mark: str) -> tuple[str, str]:
    """``text`` split into what can be recorded now and an end that may be the start of ``mark``
    (a marker split across two reads)."""
    for size in range(min(len(mark) - 1, len(text)), 0, -1):
        if mark.startswith(text[-size:]):
            return text[:-size], text[-size:]
    return text, ""


def bash_wrapper(path: str, envs: dict[str, str], mark: str) -> str:
    """Source the run's file with its envs (restored after), stdin closed, then print the markers.

    An interrupt (SIGINT to the group) makes ``return`` leave the sourced file, so the shell and
    its state survive it.
    """
    names = " ".join(shlex.quote(k) for k in envs)
    exports = " ".join(f"{shlex.quote(k)}={shlex.quote(v)}" for k, v in envs.items())
    lines = [
        "__watasu_saved=$(declare -p " + names + " 2>/dev/null)" if envs else ":",
        f"export {exports}" if envs else ":",
        "trap 'trap - INT; return 130 2>/dev/null' INT",
        f"source {shlex.quote(path)} </dev/null",
        "__watasu_rc=$?",
        "trap - INT",
        f'unset {names}; eval "$__watasu_saved"; unset __watasu_saved' if envs else ":",
        f"printf '%s %s\\n' {mark} \"$__watasu_rc\"; printf '%s 0\\n' {mark} >&2; unset __watasu_rc",
    ]
    return "\n".join(lines) + "\n"


LANGUAGES: dict[str, type[Context]] = {"python": PythonContext, "bash": BashContext}
ALIASES = {"python3": "python", "py": "python", "sh": "bash", "shell": "bash"}


class Registry:
    """All contexts, a default per language, and the start-up warm state of the default Python one."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}
        self.lock = threading.Lock()
        self.warm = False
        self.warm_error: str | None = None

    def language(self, name: Any) -> str:
        lang = ALIASES.get(str(name).lower(), str(name).lower()) if name else "python"
        if lang not in LANGUAGES:
            raise ApiError(
                422,
                "language_unavailable",
                f"language {name!r} is not available here; available: {', '.join(LANGUAGES)}",
            )
        return lang

    def create(self, language: str, cwd: str | None, default: bool = False) -> Context:
        cwd = cwd or self.cwd
        if not os.path.isdir(cwd):
            raise ApiError(422, "cwd_not_found", f"working directory {cwd} does not exist")
        with self.lock:
            if len(self.contexts) >= MAX_CONTEXTS:
                raise ApiError(
                    409,
                    "too_many_contexts",
                    f"a sandbox holds at most {MAX_CONTEXTS} code contexts; remove one first",
                )
            ctx = LANGUAGES[language](cwd, default)
            self.contexts[ctx.id] = ctx  # reserved before the slow start, so the cap holds
        try:
            ctx.start()
        except Exception as e:
            with self.lock:
                self.contexts.pop(ctx.id, None)
            raise ApiError(
                503, "context_start_failed", f"the {language} interpreter did not start: {e}"
            ) from e
        return ctx

    def default(self, language: str) -> Context:
        """The language's default context, started on first use."""
        with self.lock:
            ctx = self.contexts.get(self.defaults.get(language, ""))
        if ctx is not None:
            return ctx
        with self.lock:  # one starter per language; others wait for it
            starting = self.defaults.get(language)
            if starting is None:
                self.defaults[language] = "starting"
        if starting == "starting":
            while (current := self.defaults.get(language)) == "starting":
                time.sleep(0.05)
            if current in self.contexts:
                return self.contexts[current]
            raise ApiError(503, "context_start_failed", f"the default {language} context did not start")
        try:
            ctx = self.create(language, None, default=True)
        except BaseException:
            with self.lock:
                self.defaults.pop(language, None)
            raise
        with self.lock:
            self.defaults[language] = ctx.id
        return ctx

    def get(self, context_id: str) -> Context:
        with self.lock:
            ctx = self.contexts.get(context_id)
        if ctx is None:
            raise ApiError(404, "context_not_found", f"no code context {context_id!r}")
        return ctx

    def remove(self, context_id: str) -> None:
        ctx = self.get(context_id)
        ctx.interrupt()
        with ctx.lock:
            with self.lock:
                self.contexts.pop(context_id, None)
                if self.defaults.get(ctx.language) == context_id:
                    del self.defaults[ctx.language]
            ctx.stop()

    def restart(self, context_id: str) -> Context:
        ctx = self.get(context_id)
        ctx.interrupt()
        with ctx.lock:
            ctx.restart()
        return ctx

    def warm_up(self) -> None:
        """Start the default Python context and import the heavy libraries into it (start-up)."""
        started = time.monotonic()
        try:
            ctx = self.default("python")
            assert isinstance(ctx, PythonContext)
            log(f"default python kernel started in {time.monotonic() - started:.1f} s; importing libraries")
            with ctx.lock:
                for name, code in WARM_STEPS:
                    step = time.monotonic()
                    reply = ctx.silent(code, timeout=600)
                    if reply.get("status") != "ok":
                        failure = f"{reply.get('ename')}: {reply.get('evalue')}"
                        raise RuntimeError(f"warm-up ({name}) failed: {failure}")
                    log(f"warm-up: {name} in {time.monotonic() - step:.1f} s")
                ctx.silent("del numpy, pandas, matplotlib")
            self.warm = True
            log(f"default python kernel warm after {time.monotonic() - started:.1f} s")
        except Exception as e:
            self.warm_error = str(e)
            log(f"warm-up failed: {e}")


# -- HTTP


def body_envs(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ApiError(400, "bad_request", "envs must be an object of names to strings")
    if any("=" in k or "\0" in k for k in value):
        raise ApiError(400, "bad_request", "env names may not contain '=' or NUL")
    return {k: "" if v is None else str(v) for k, v in value.items()}


MAX_TIMEOUT = 24 * 3600.0


def body_timeout(value: Any) -> float:
    """Seconds a run may take: absent means the default; anything but a finite number in
    (0, one day] is refused (NaN, infinities and 0 included)."""
    if value is None:
        return DEFAULT_TIMEOUT
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= MAX_TIMEOUT
    ):
        raise ApiError(
            400, "bad_request", f"timeout_seconds must be seconds above 0, at most {MAX_TIMEOUT:g}"
        )
    return float(value)


class Handler(BaseHTTPRequestHandler):
    """The routes; one thread per connection (``ThreadingHTTPServer``)."""

    protocol_version = "HTTP/1.1"
    registry: Registry

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if method != "POST":
                self.read_json()  # a body nobody reads would be taken for the next request
            answer = self._route(method, path)
        except ApiError as e:
            answer = e.status, {"error": e.code, "message": e.message}
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:
            log(f"{method} {path}: {e!r}")
            answer = 500, {"error": "internal_error", "message": repr(e)}
        if answer is not None:
            self.send_json(*answer)

    def _route(self, method: str, path: str) -> tuple[int, Any] | None:
        reg = self.registry
        if path == "/health" and method == "GET":
            if reg.warm:
                return 200, {"status": "ok"}
            return 503, {"error": "starting", "message": reg.warm_error or "the python kernel is warming up"}
        if path == f"{PREFIX}/run" and method == "POST":
            return self.run_code(self.read_json())
        if path == f"{PREFIX}/contexts":
            if method == "GET":
                with reg.lock:
                    return 200, {"contexts": [c.describe() for c in reg.contexts.values()]}
            if method == "POST":
                body = self.read_json()
                cwd = body.get("cwd")
                if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
                    raise ApiError(400, "bad_request", "cwd must be an absolute path")
                return 200, reg.create(reg.language(body.get("language")), cwd).describe()
        m = re.fullmatch(re.escape(PREFIX) + r"/contexts/([^/]+)(/restart)?", path)
        if m and method == "DELETE" and not m[2]:
            reg.remove(unquote(m[1]))
            return 200, {}
        if m and method == "POST" and m[2]:
            self.read_json()
            return 200, reg.restart(unquote(m[1])).describe()
        if m or path in ("/health", f"{PREFIX}/run", f"{PREFIX}/contexts"):
            raise ApiError(405, "method_not_allowed", f"{path} does not answer {method}")
        raise ApiError(404, "not_found", f"no route {method} {path}")

    def run_code(self, body: dict[str, Any]) -> tuple[int, Any] | None:
        reg = self.registry
        code = body.get("code")
        if not isinstance(code, str):
            raise ApiError(400, "bad_request", "code must be a string")
        envs, timeout = body_envs(body.get("envs")), body_timeout(body.get("timeout_seconds"))
        if body.get("context_id") is not None:
            if body.get("language") is not None:
                raise ApiError(400, "bad_request", "language and context_id cannot both be set")
            ctx = reg.get(str(body["context_id"]))
        else:
            ctx = reg.default(reg.language(body.get("language")))
        sandbox_env = self.sandbox_env()
        stream = "application/x-ndjson" in self.headers.get("Accept", "")
        out = RunOutput(self.start_stream() if stream else None)
        while not ctx.lock.acquire(timeout=0.5):  # one run at a time per context
            if self.client_gone():
                self.close_connection = True
                return None
        try:
            if reg.contexts.get(ctx.id) is not ctx:
                raise ApiError(404, "context_not_found", f"code context {ctx.id!r} was removed")
            ctx.sync_env(sandbox_env)
            ctx.sync_generation(self.headers.get(GENERATION_HEADER, ""))
            ctx.run(code, envs, out, time.monotonic() + timeout, self.client_gone)
        finally:
            ctx.lock.release()
        execution = out.execution()
        message = f"{TIMEOUT_MESSAGE} (interrupted after {timeout:g} s; the context keeps its state)"
        if stream:
            if out.timed_out:
                out.emit and out.emit({"type": "timeout", "message": message})
            self.end_stream({"type": "end", "execution": execution})
            return None
        if out.timed_out:
            return 408, {"error": "execution_timeout", "message": message}
        return 200, {"execution": execution}

    # -- plumbing

    def sandbox_env(self) -> dict[str, str]:
        """The sandbox's env vars, which the agent sends base64-encoded JSON (absent: none)."""
        raw = self.headers.get(SANDBOX_ENV_HEADER)
        if not raw:
            return {}
        try:
            env = json.loads(base64.b64decode(raw))
        except ValueError as e:
            raise ApiError(400, "bad_request", f"bad {SANDBOX_ENV_HEADER} header") from e
        return body_envs(env)

    def client_gone(self) -> bool:
        """True once the caller hung up (its socket reads EOF), so a run nobody waits for stops."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = self._read_chunked()
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as e:
                raise ApiError(400, "bad_request", "bad Content-Length") from e
            if length > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "payload_too_large", f"body over {MAX_BODY} bytes")
            data = self.rfile.read(length) if length else b""
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, "bad_request", f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return body

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError as e:
                self.close_connection = True
                raise ApiError(400, "bad_request", "bad chunk size") from e
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(data)
            if len(data) + size > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "payload_too_large", f"body over {MAX_BODY} bytes")
            data += self.rfile.read(size)
            self.rfile.readline(1024)

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> Callable[[dict[str, Any]], None]:
        """Answer 200 with a chunked NDJSON body; the returned function writes one event."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()
        lock = threading.Lock()

        def emit(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            with lock, contextlib.suppress(OSError):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        self._emit = emit
        return emit

    def end_stream(self, last: dict[str, Any]) -> None:
        self._emit(last)
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


def unquote(text: str) -> str:
    from urllib.parse import unquote as _unquote

    return _unquote(text)


def install_startup() -> None:
    """Write the kernel startup file and the private run directory (0700: runs' code is private)."""
    startup = os.path.join(STATE_DIR, "ipython", "profile_default", "startup")
    os.makedirs(startup, exist_ok=True)
    os.makedirs(os.path.join(STATE_DIR, "runs"), mode=0o700, exist_ok=True)
    shutil.copyfile(KERNEL_STARTUP, os.path.join(startup, "00-watasu.py"))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # OpenBLAS (apt's libopenblas0, or the copy inside pip's numpy/scipy wheels) takes the TCG CPU
    # for an Opteron and dies of an illegal instruction in its first matrix product: pin a core
    # type that works there, for every kernel and shell this server starts.
    os.environ.setdefault("OPENBLAS_CORETYPE", "Nehalem")
    install_startup()
    cwd = os.environ.get("WATASU_CODE_CWD") or os.path.expanduser("~")
    registry = Registry(cwd if os.path.isdir(cwd) else "/")
    handler = type("BoundHandler", (Handler,), {"registry": registry})
    server = Server((HOST, PORT), handler)
    threading.Thread(target=registry.warm_up, daemon=True).start()
    log(f"listening on {HOST}:{PORT}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # A start command run in the background may inherit SIGINT ignored, and bash contexts would
    # inherit that in turn: interrupts must reach the code a context runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    finally:
        for ctx in list(registry.contexts.values()):
            ctx.stop()


if __name__ == "__main__":
    main()

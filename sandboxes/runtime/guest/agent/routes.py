"""Every route the agent serves: health, init, volumes, files, directories, watch, processes, git."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import stat
import threading
import time
import zlib
from typing import Any
from urllib.parse import quote

from . import volumes
from .core import CHUNK, HttpError, os_error
from .events import Event, Subscriber
from .files import file_entry, list_dir, make_dir, move_path, norm_path, remove_path, write_stream
from .git import GIT_OPS, GitCall
from .identity import add_entropy, refresh_machine_id, set_clock, set_hostname, trust_ca
from .patch import apply_patch_document, apply_unified_diff
from .processes import EXIT_LINGER, ManagedProcess, parse_signal
from .routing import RT, Agent, Request, Result, router
from .watch import NETWORK_FS, Inotify, fs_type, run_watch
from .websocket import WebSocket, WsClosed


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
    if b.get("new_machine_id") is True:
        refresh_machine_id()
    if isinstance(b.get("trust_ca"), str):
        trust_ca(b["trust_ca"])
    if "env_vars" in b:
        env = {str(k): str(v) for k, v in (b["env_vars"] or {}).items()}
        with agent.state.lock:
            agent.state.env = env
    if b.get("workdir"):
        agent.workdir = str(b["workdir"])
    # the first commands.run() then finds root's login environment captured (login.py)
    threading.Thread(target=agent.procs.login.warm, args=(agent.process_env(),), daemon=True).start()
    return 200, {"status": "ok", "time": time.time()}


# --- volumes (the host's, not the data plane's: outside /runtime/v1) -----------------------


@router.add("POST", "/volumes/mount")
def volumes_mount(agent: Agent, req: Request) -> Result:
    """Mount hot-plugged volume disks: ``{"mounts": [{"unit", "path"}], "timeout": s}``."""
    timeout = req.body.get("timeout", 20)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 120:
        raise HttpError(400, "bad_request", "timeout: seconds, at most 120")
    return 200, {"mounted": volumes.mount_volumes(req.body.get("mounts"), float(timeout))}


@router.add("POST", "/volumes/sync")
def volumes_sync(agent: Agent, req: Request) -> Result:
    os.sync()
    return 200, {"status": "ok"}


@router.add("POST", "/volumes/freeze")
def volumes_freeze(agent: Agent, req: Request) -> Result:
    """Before the VM is destroyed: ``{"paths": [...]}`` written out and frozen."""
    return 200, {"failed": volumes.freeze(req.body.get("paths"))}


@router.add("POST", "/checkpoint/freeze")
def checkpoint_freeze(agent: Agent, req: Request) -> Result:
    """Before a guest-mode checkpoint: ``/`` written out and frozen, thawed by
    ``/checkpoint/thaw`` or by itself after ``{"thaw_after": s}``."""
    return 200, volumes.freeze_root(req.body.get("thaw_after", 10))


@router.add("POST", "/checkpoint/thaw")
def checkpoint_thaw(agent: Agent, req: Request) -> Result:
    return 200, volumes.thaw_root()


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
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", content_disposition(os.path.basename(path))),
        ]
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
            raise HttpError(400, "bad_request", 'first frame must be {"type": "start", ...}')
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
    """One client → server frame; stdin for a finished process is acked and dropped.

    Stdin for a process started without it (``stdin: false``: its stdin is /dev/null) is
    an ``error`` frame, not an ack: the bytes could never be read, and the SDK raises it.
    """
    kind = msg.get("type")
    if kind == "stdin" and not proc.stdin_enabled:
        ws.send_json(
            {
                "type": "error",
                "code": "stdin_not_enabled",
                "pid": proc.id,
                "message": f"process {proc.id} was started without stdin (its stdin is /dev/null), "
                "so input cannot reach it: start it with stdin=True to send input",
            }
        )
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

"""The fast path for ``bash -l -c <cmd>``: a login shell's environment, captured once.

Every ``commands.run(cmd)`` of the SDKs starts ``/bin/bash -l -c <cmd>``. Under TCG the
profile scripts of a login shell (which fork ``id``, ``mesg`` ...) cost about twice the
command itself, and they produce the same environment each time. So the first such command
for a given user and input environment runs the real login shell once to capture what it
exports (``env -0``), its umask and the functions it defined; later ones run
``bash --noprofile -l -c <cmd>`` with that environment. ``--noprofile -l`` keeps it a login
shell (``shopt login_shell``, ``~/.bash_logout`` on exit) without reading the profiles.

The cache key holds the user, the whole input environment and (path, mtime_ns, size, inode)
of every file a login shell reads, so an edit to a profile is picked up by the next command.
A profile that writes output, sets ``BASH_ENV``, fails or hangs makes the command run the
real login shell, as before (a hung one is remembered like the others, until a watched file
changes: each command would otherwise wait for the capture's timeout first).

What the fast path does not carry over, because a login shell's profiles leave it in that
shell only: variables a profile sets without exporting, shell options (``set -o pipefail``,
``shopt``), aliases, a profile's ``cd``, values a profile computes afresh for each shell (a
timestamp), and files a profile sources from outside the watched list. A command that needs
them gets the real login shell with ``WATASU_FULL_LOGIN=1`` in its (or the sandbox's) env.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

CAPTURE_TIMEOUT = 10.0  # seconds; a slower profile keeps the real login shell
CACHE_SIZE = 64  # (user, environment, profile files) combinations kept
SYSTEM_FILES = ("/etc/profile", "/etc/bash.bashrc")
PROFILE_DIR = "/etc/profile.d"
HOME_FILES = (".bash_profile", ".bash_login", ".profile", ".bashrc")
# What the capture prints on an extra fd: the exported environment, an empty entry, the umask,
# then the functions. Profile scripts' own output goes to stdout/stderr, which must stay empty.
CAPTURE_SCRIPT = "{{ env -0; printf '\\0'; umask; declare -f; }} >&{fd}"


def _process_umask() -> int:
    """The umask the agent's children inherit (read by setting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_login_command(argv: list[str]) -> bool:
    """Exactly ``bash|/bin/bash -l -c <cmd>``: the form the SDKs send, and nothing else."""
    return len(argv) == 4 and argv[0] in ("bash", "/bin/bash") and argv[1:3] == ["-l", "-c"]


def per_shell_name(name: str) -> bool:
    """Variables each bash sets for itself: never frozen into the cache.

    Exported functions (``BASH_FUNC_f%%``) are real environment and stay.
    """
    if name.startswith("BASH_FUNC_"):
        return False
    return name in ("SHLVL", "PWD", "OLDPWD", "_", "BASHOPTS", "SHELLOPTS") or name.startswith("BASH_")


def files_key(home: str) -> tuple[tuple[str, int, int, int] | tuple[str], ...]:
    """(path, mtime_ns, size, inode) of each file a login shell reads; (path,) when absent.

    /etc/profile.d itself is in it too, so an added or removed script changes the key.
    """
    paths = [*SYSTEM_FILES, PROFILE_DIR]
    with contextlib.suppress(OSError):
        paths += sorted(os.path.join(PROFILE_DIR, n) for n in os.listdir(PROFILE_DIR))
    paths += [os.path.join(home, n) for n in HOME_FILES]
    key: list[tuple[str, int, int, int] | tuple[str]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            key.append((path,))
            continue
        key.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(key)


@dataclass
class LoginEnv:
    """What a login shell left for the command: its exports and, if any, a BASH_ENV state file."""

    env: dict[str, str]
    state_file: str | None  # functions and umask the profiles set; None when there are none


def parse_capture(raw: bytes, umask: int) -> tuple[dict[str, str], str] | None:
    """The capture's fd-3 bytes → (exported env, shell state to replay), or None if unusable."""
    env_part, sep, rest = raw.partition(b"\0\0")
    if not sep:
        return None
    env: dict[str, str] = {}
    for entry in env_part.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            return None
        env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    mask_line, _, functions = rest.partition(b"\n")
    try:
        mask = int(mask_line.strip(), 8)
    except ValueError:
        return None
    state = f"umask {mask:04o}\n" if mask != umask else ""
    state += functions.decode("utf-8", "surrogateescape")
    return env, state


class LoginCache:
    """Captured login environments by (user, input environment, profile files)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[Any, ...], LoginEnv | None] = OrderedDict()
        self.lock = threading.Lock()  # the dict
        self.capture_lock = threading.Lock()  # one capture at a time: two would do the same work
        self.umask = _process_umask()
        self.state_dir: str | None = None

    def fast_argv(
        self, argv: list[str], env: dict[str, str], kwargs: dict[str, Any], user: str | None
    ) -> tuple[list[str], dict[str, str]] | None:
        """The argv and env that replace a real login shell for ``argv``, or None to keep it."""
        if env.get("WATASU_FULL_LOGIN") == "1":
            return None
        login = self.lookup(argv[0], env, kwargs, user)
        if login is None:
            return None
        fast_env = {k: v for k, v in login.env.items() if not per_shell_name(k)}
        fast_env.update((k, v) for k, v in env.items() if per_shell_name(k))
        if login.state_file:
            fast_env["BASH_ENV"] = login.state_file
        return [argv[0], "--noprofile", "-l", "-c", argv[3]], fast_env

    def warm(self, env: dict[str, str]) -> None:
        """Capture root's login environment ahead of the first command (after init)."""
        self.lookup("/bin/bash", env, {}, None)

    def lookup(
        self, shell: str, env: dict[str, str], kwargs: dict[str, Any], user: str | None
    ) -> LoginEnv | None:
        """The cached login environment for this user, input env and profile files, captured if new."""
        # the host name too: a profile may read it, and a warm pool VM gets its own at claim
        home = env.get("HOME") or "/"
        key = (user or "root", socket.gethostname(), frozenset(env.items()), files_key(home))
        found, login = self._cached(key)
        if found:
            return login
        with self.capture_lock:  # a hit never waits for another key's capture
            found, login = self._cached(key)  # captured by the thread that held the lock?
            if found:
                return login
            login, lasting = self._capture(shell, env, kwargs, env.get("HOME") or "/")
            if lasting:
                self._store(key, login)
        return login

    def _cached(self, key: tuple[Any, ...]) -> tuple[bool, LoginEnv | None]:
        """(usable record found, the record); a record whose BASH_ENV file vanished is not usable."""
        with self.lock:
            if key not in self.entries:
                return False, None
            self.entries.move_to_end(key)
            login = self.entries[key]
        return login is None or not login.state_file or os.path.exists(login.state_file), login

    def _store(self, key: tuple[Any, ...], login: LoginEnv | None) -> None:
        with self.lock:
            old = self.entries.pop(key, None)
            self.entries[key] = login
            evicted = [old] if old is not None and old is not login else []
            while len(self.entries) > CACHE_SIZE:
                evicted.append(self.entries.popitem(last=False)[1])
        for gone in evicted:
            if gone is not None and gone.state_file:
                with contextlib.suppress(OSError):
                    os.unlink(gone.state_file)

    def _capture(
        self, shell: str, env: dict[str, str], kwargs: dict[str, Any], home: str
    ) -> tuple[LoginEnv | None, bool]:
        """Run the real login shell once: (its result or None if it cannot stand in, cacheable).

        A failure that the same files would repeat (a failing, talking or hanging profile) is
        cached as None; a spawn error may be passing (memory pressure) and is not.
        """
        with tempfile.TemporaryFile() as out:
            try:
                script = CAPTURE_SCRIPT.format(fd=out.fileno())
                rc, talked = _run_capture(shell, script, env, home, out, kwargs)
            except subprocess.TimeoutExpired:
                return None, True  # the real shell each time, not a timeout and then the real shell
            except (OSError, subprocess.SubprocessError):
                return None, False
            if rc != 0 or talked:
                return None, True  # the real shell must show that failure or output each time
            out.seek(0)
            parsed = parse_capture(out.read(), self.umask)
        if parsed is None or "BASH_ENV" in parsed[0]:
            return None, True  # a profile's own BASH_ENV would fight ours: keep the real shell
        env_out, state = parsed
        return LoginEnv(env_out, self._write_state(state, kwargs) if state else None), True

    def _write_state(self, state: str, kwargs: dict[str, Any]) -> str:
        """A BASH_ENV file that restores the profiles' functions and umask, then unsets itself.

        It belongs to the command's user (0600): a profile's functions are that user's business.
        """
        if self.state_dir is None:
            self.state_dir = tempfile.mkdtemp(prefix="watasu-login-")
            os.chmod(self.state_dir, 0o711)
        fd, path = tempfile.mkstemp(dir=self.state_dir, suffix=".sh")
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("unset BASH_ENV\n" + state)
        if "user" in kwargs:
            os.chown(path, kwargs["user"], kwargs["group"])
        return path


def _run_capture(
    shell: str, script: str, env: dict[str, str], home: str, out: Any, kwargs: dict[str, Any]
) -> tuple[int, bool]:
    """Run the capture login shell: (exit code, whether it wrote to stdout or stderr).

    On a timeout its whole session is killed, so a profile's background child cannot hold it.
    """
    proc = subprocess.Popen(
        [shell, "-l", "-c", script],
        env=env,
        cwd=home if os.path.isdir(home) else "/",
        stdin=subprocess.DEVNULL,  # a profile that reads stdin gets EOF, never hangs
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(out.fileno(),),
        start_new_session=True,  # no controlling terminal to block on
        **kwargs,
    )
    try:
        stdout, stderr = proc.communicate(timeout=CAPTURE_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        raise
    return proc.returncode, bool(stdout or stderr)

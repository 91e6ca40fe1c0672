"""Who the agent is: its secret and the role credentials derived from it, the boot token,
and the system effects of ``/init`` (clock, entropy, hostname)."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import hmac
import os
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

from .core import HttpError

CONTROL, DATAPLANE, PREVIEW = "control", "dataplane", "preview"
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
CLOCK_REALTIME = 0


@dataclass
class AgentState:
    """Mutable agent identity; one lock guards it because handlers run in threads."""

    secret: str
    fresh: bool = True
    env: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(
        self, token: str | None, *, roles: tuple[str, ...] = (CONTROL,), allow_fresh: bool = False
    ) -> None:
        """Raise 401 unless ``token`` is the credential of one of ``roles`` (``control`` is
        the secret itself) and the agent is initialised."""
        if token is None or not any(
            hmac.compare_digest(token.encode(), self.credential(role).encode()) for role in roles
        ):
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


def _write_later(path: str, text: str) -> None:
    """Write ``path`` in a thread of its own: the root filesystem may be frozen (a clone of a
    guest frozen when its memory was saved), and an init must not wait for a thaw.
    Best effort: errors are ignored."""

    def write() -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError:
            pass

    threading.Thread(target=write, name=f"write {path}", daemon=True).start()


def refresh_machine_id(path: str = "/etc/machine-id") -> None:
    """A clone (of a memory snapshot or of a checkpoint's disk) must not share its source's
    machine id: it gets a fresh random one, made if the image has none (Debian's bootstrap
    leaves it out, and no init system makes one here), so every sandbox has its own."""
    _write_later(path, os.urandom(16).hex() + "\n")


CA_FILE = "/usr/local/share/ca-certificates/watasu-egress.crt"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def trust_ca(pem: str) -> None:
    """Trust the platform's egress CA (header rules on HTTPS): its own file (what
    NODE_EXTRA_CA_CERTS names) and appended to the system bundle (what OpenSSL, curl, and
    Python through SSL_CERT_FILE / REQUESTS_CA_BUNDLE read). In the background, like every
    write of an init; a bundle already holding it is left alone."""
    if "BEGIN CERTIFICATE" not in pem:
        return

    def write() -> None:
        try:
            os.makedirs(os.path.dirname(CA_FILE), exist_ok=True)
            with open(CA_FILE, "w") as f:
                f.write(pem)
            with open(CA_BUNDLE) as f:
                present = pem.strip() in f.read()
            if not present:
                with open(CA_BUNDLE, "a") as f:
                    f.write("\n" + pem.strip() + "\n")
        except OSError:
            pass

    threading.Thread(target=write, name="trust ca", daemon=True).start()


def set_hostname(name: str) -> None:
    """Set the kernel hostname, and /etc/hostname in the background (best effort)."""
    socket.sethostname(name)
    _write_later("/etc/hostname", name + "\n")

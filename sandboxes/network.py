"""Sandbox network policies on this host: settings into the egress firewall's and proxy's
configuration, a sandbox row into the rules enforced for its QEMU uid.

The enforcement itself is in ``sandboxes/runtime/egress`` (nftables + the egress proxy);
this module is what the lifecycle services call: ``apply`` before a sandbox's VM starts
(or resumes) and after a ``PUT /network``, ``remove`` once its VM is gone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import F, Q

from sandboxes.hostcalls import host_step
from sandboxes.models import Host, Sandbox
from sandboxes.runtime.egress import firewall
from sandboxes.runtime.egress.policy import Egress, compile_policy
from watasu import crypto

logger = logging.getLogger(__name__)

PROXY_SCRIPT = Path(firewall.__file__).with_name("proxy.py")
_lock = threading.Lock()
_base_installed: str | None = None


QEMU_USER = "watasu-qemu"  # as scripts/setup-host and the libvirt driver name it


def _qemu_ids() -> tuple[int, int]:
    user = pwd.getpwnam(QEMU_USER)
    return user.pw_uid, user.pw_gid


def _resolvers() -> tuple[str, ...]:
    if settings.EGRESS_RESOLVERS:
        return tuple(settings.EGRESS_RESOLVERS)
    found = []
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and parts[1].count(".") == 3:
                found.append(parts[1])
    except OSError:
        pass
    return tuple(found) or ("1.1.1.1",)


def host_config() -> firewall.HostConfig:
    shared_uid, qemu_gid = _qemu_ids()
    return firewall.HostConfig(
        qemu_gid=qemu_gid,
        shared_uid=shared_uid,
        proxy_uid=pwd.getpwnam(settings.EGRESS_USER).pw_uid,
        proxy_port=settings.EGRESS_PROXY_PORT,
        dns_port=settings.EGRESS_DNS_PORT,
        deny_nets=tuple(settings.EGRESS_DENY_NETS),
        deny_ports=tuple(settings.EGRESS_DENY_PORTS),
        resolvers=_resolvers(),
        run_dir=Path(settings.EGRESS_RUN_DIR),
        uid_base=settings.RUNTIME_QEMU_UID_BASE,
        max_connections={
            name: int(c.get("max_connections", 0)) for name, c in settings.NETWORK_CLASSES.items()
        },
    )


def _proxy_gid() -> int:
    return pwd.getpwnam(settings.EGRESS_USER).pw_gid


def ca_paths() -> tuple[Path, Path]:
    directory = settings.EGRESS_CA_DIR
    return directory / "ca.pem", directory / "ca.key"


def ensure_ca() -> bytes:
    """The installation's CA for header rules on HTTPS (made once; guests trust it)."""
    cert_path, key_path = ca_paths()
    if cert_path.exists() and key_path.exists():
        return cert_path.read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Watasu sandbox egress CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_key = key_path.with_suffix(".tmp")
    tmp_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chown(tmp_key, 0, _proxy_gid())
    tmp_key.chmod(0o640)
    os.replace(tmp_key, key_path)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    cert_path.parent.chmod(0o755)
    return pem


def ensure_host() -> firewall.HostConfig:
    """The table's shared part and the proxy's configuration in place (once per process
    and whenever the configuration changed), and the proxy running."""
    global _base_installed
    cfg = host_config()
    cert, key = ca_paths()
    upstream = ""
    if settings.EGRESS_UPSTREAM_CA_FILE:  # a copy the proxy's user may read, wherever the original is
        upstream = str(cfg.run_dir / "upstream-ca.pem")
        text = Path(settings.EGRESS_UPSTREAM_CA_FILE).read_text()
        firewall.write_private(Path(upstream), text, _proxy_gid())
    extra = {
        "ca_cert": str(cert),
        "ca_key": str(key),
        "cert_dir": str(cfg.run_dir / "certs"),
        "upstream_ca_file": upstream,
    }
    stamp = json.dumps([repr(cfg), extra], sort_keys=True)
    with _lock:
        if _base_installed != stamp or not _table_present():
            ensure_ca()
            firewall.write_config(cfg, extra, _proxy_gid())
            firewall.nft(firewall.base_script(cfg))
            _base_installed = stamp
        ensure_proxy(cfg)
    return cfg


def _table_present() -> bool:
    result = subprocess.run(
        ["nft", "list", "chain", "inet", "watasu", "output"], capture_output=True, timeout=30
    )
    return result.returncode == 0


def _proxy_code() -> str:
    """What the running proxy must be: a proxy started from other code is replaced."""
    digest = hashlib.sha256()
    for path in (PROXY_SCRIPT, PROXY_SCRIPT.with_name("policy.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _proxy_pid(cfg: firewall.HostConfig) -> tuple[int, str] | None:
    """(pid, code) of the running proxy, None if there is none."""
    try:
        pid_text, _, code = (cfg.run_dir / "proxy.pid").read_text().partition(" ")
        pid = int(pid_text)
        os.kill(pid, 0)
        if "proxy.py" not in Path(f"/proc/{pid}/cmdline").read_text():
            return None  # a pid reused by another process
    except (OSError, ValueError):
        return None
    return pid, code.strip()


def _proxy_alive(cfg: firewall.HostConfig) -> bool:
    running = _proxy_pid(cfg)
    if running is None:
        return False
    if running[1] != _proxy_code():
        os.kill(running[0], signal.SIGTERM)  # an older version: replaced (open flows drop)
        for _ in range(50):
            if not Path(f"/proc/{running[0]}").exists():
                break
            time.sleep(0.05)
        return False
    return True


def ensure_proxy(cfg: firewall.HostConfig) -> None:
    """Start the egress proxy as its own user when it is not running (one per host)."""
    if _proxy_alive(cfg):
        return
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / "proxy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _proxy_alive(cfg):
            return
        user = pwd.getpwnam(settings.EGRESS_USER)
        log = open(cfg.run_dir / "proxy.log", "ab")  # noqa: SIM115 - handed to the child
        certs = cfg.run_dir / "certs"
        certs.mkdir(exist_ok=True)
        os.chown(certs, user.pw_uid, user.pw_gid)
        certs.chmod(0o700)
        # started as root (it may not read this Python otherwise), it drops to its user
        # once its ports are bound and its imports done
        process = subprocess.Popen(
            [sys.executable, "-I", str(PROXY_SCRIPT), str(cfg.run_dir / "config.json"), user.pw_name],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
        log.close()
        (cfg.run_dir / "proxy.pid").write_text(f"{process.pid} {_proxy_code()}")
        for _ in range(100):
            if process.poll() is not None:
                raise firewall.FirewallError(
                    f"the egress proxy exited ({process.returncode}); see {log.name}"
                )
            if _listening(cfg.proxy_port) and _listening(cfg.dns_port):
                return
            time.sleep(0.05)
        raise firewall.FirewallError("the egress proxy did not start listening")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------ per sandbox


def rule_headers(sandbox: Sandbox) -> dict[str, dict[str, str]]:
    if not sandbox.network_rules_encrypted:
        return {}
    data: dict[str, dict[str, str]] = crypto.decrypt_json(sandbox.network_rules_encrypted)
    return data


def egress_of(sandbox: Sandbox) -> Egress:
    return compile_policy(sandbox.network_policy, rule_headers(sandbox), settings.EGRESS_PROFILES)


def uid_of(sandbox: Sandbox) -> int:
    from sandboxes.runtime.vm import qemu_uid  # vm starts VMs through this module

    uid = qemu_uid(sandbox)
    if uid is None:
        raise firewall.FirewallError("network policies need WATASU_QEMU_UID_BASE (a uid per sandbox)")
    return uid


@host_step
def apply(sandbox: Sandbox) -> None:
    """Enforce the sandbox's stored policy for its QEMU uid (before its VM runs, and on
    every change) and record the revision in force. Under a per-sandbox lock, from the row
    as it is then: two changes racing never leave the older one in force."""
    if not settings.EGRESS_ENFORCE:  # service tests on the fake runtime
        Sandbox.objects.filter(pk=sandbox.pk).update(network_applied_revision=F("network_revision"))
        sandbox.refresh_from_db(fields=["network_applied_revision", "network_revision"])
        return
    cfg = ensure_host()
    uid = uid_of(sandbox)
    locks = cfg.run_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / str(uid), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        row = Sandbox.objects.filter(pk=sandbox.pk).first() or sandbox
        firewall.apply_sandbox(cfg, uid, egress_of(row), row.network_class, _proxy_gid())
        Sandbox.objects.filter(pk=row.pk, network_revision=row.network_revision).update(
            network_applied_revision=row.network_revision
        )
    sandbox.network_applied_revision = row.network_revision


@host_step
def remove(sandbox: Sandbox) -> None:
    """The sandbox's rules gone (its VM is gone; its uid is refused everything again)."""
    if not settings.RUNTIME_QEMU_UID_BASE or not settings.EGRESS_ENFORCE:
        return
    try:
        firewall.remove_sandbox(host_config(), uid_of(sandbox))
    except Exception:
        logger.warning("sandbox %s: could not remove its firewall rules", sandbox.pk, exc_info=True)


@host_step
def refused(sandbox: Sandbox) -> int:
    """Packets its policy refused at the firewall since the policy was last applied."""
    try:
        return firewall.refused_count(uid_of(sandbox))
    except Exception:
        return 0


# Clients that ignore the system store by default read these (the agent puts the CA in
# the system bundle and in its own file); a sandbox's own env vars win.
GUEST_CA_ENV = {
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "NODE_EXTRA_CA_CERTS": "/usr/local/share/ca-certificates/watasu-egress.crt",
}


def guest_ca() -> str | None:
    """The CA guests trust for header rules on HTTPS (None when policies are not enforced)."""
    if not settings.EGRESS_ENFORCE:
        return None
    return ensure_ca().decode()


@host_step
def reconcile(host: Host) -> dict[str, int]:
    """The host's firewall against the database: a recorded policy not in force on a
    running sandbox of the host is applied (a change the host could not take when it was
    made), and the rules of its sandboxes that are gone are removed. Rules of uids this
    database does not know are left alone (another installation on this host may own them)."""
    from sandboxes.models import SandboxState

    if not settings.EGRESS_ENFORCE or not settings.RUNTIME_QEMU_UID_BASE:
        return {"applied": 0, "removed": 0}
    running = Q(state__in=(SandboxState.READY, SandboxState.CHECKPOINTING))
    # a sandbox still starting is applied by its start (never applied yet: leave it to it)
    starting = Q(
        state__in=(SandboxState.CREATING, SandboxState.RESTORING), network_applied_revision__isnull=False
    )
    applied = 0
    pending = Sandbox.objects.filter(running | starting, host=host).exclude(
        network_applied_revision=F("network_revision")
    )
    for sandbox in pending:
        try:
            apply(sandbox)
            applied += 1
        except Exception:
            logger.warning("sandbox %s: its network policy is still not in force", sandbox.pk, exc_info=True)
    base = settings.RUNTIME_QEMU_UID_BASE
    installed = {uid - base for uid in firewall.installed_uids() if uid > base}
    gone = Sandbox.objects.filter(
        pk__in=installed, host=host, state__in=(SandboxState.DESTROYED, SandboxState.FAILED)
    )
    removed = 0
    for sandbox in gone.exclude(purged_at=None):
        remove(sandbox)
        removed += 1
    return {"applied": applied, "removed": removed}

"""The egress proxy: the host-side half of sandbox network policies that needs more than
addresses. It runs as its own unprivileged user (``watasu-egress``), started by the runtime
(``sandboxes.network.ensure_proxy``); the firewall redirects to it (``firewall.py``):

* every sandbox's DNS (UDP and TCP port 53): a name the policy refuses gets NXDOMAIN, an
  allowed one is resolved through the configured resolvers; a name no rule names is
  answered only when one of its addresses is one the policy allows;
* a sandbox's TCP 80/443 when its policy names hosts: the HTTP ``Host`` or TLS SNI is read
  from the first bytes, the policy decides, and an allowed name is resolved here and
  connected to at *that* address; a refusal is a TCP reset at once. For a host with
  header rules the request goes through with those headers added (HTTPS: terminated
  with a certificate of the installation's CA, re-encrypted to the real host, whose
  certificate is verified).

The sandbox a connection comes from is the owner (uid) of its source socket, read from
``/proc/net``: each sandbox's QEMU has a uid of its own. Stdlib only (and ``cryptography``
for certificates), no Django: ``python proxy.py CONFIG USER`` started as root binds its
ports, imports all it needs, then drops to ``USER`` for good before it reads a byte from a
guest.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401 - TLS server names; nothing is imported after privileges drop
import json
import logging
import os
import pwd
import random
import resource
import socket
import ssl
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if __package__ in (None, ""):  # run as a file (no Django): the policy module next to it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from policy import Egress  # type: ignore[import-not-found]
else:
    from sandboxes.runtime.egress.policy import Egress

log = logging.getLogger("watasu.egress")
SO_ORIGINAL_DST = 80
HEAD_LIMIT = 16384
FIRST_BYTES_SECONDS = 10  # in all, for the ClientHello or request head
CONNECT_SECONDS = 10
BUFFER = 256 * 1024
PER_SANDBOX = 256  # connections one sandbox may hold through the proxy at once
DNS_WORKERS = 32
DNS_BACKLOG = 512  # queries waiting beyond it are dropped (the guest's resolver retries)
CERT_LIFETIME = timedelta(days=30)
CERT_RENEW_AFTER = timedelta(days=1)


class Refused(Exception):
    pass


class Config:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = 0
        self.data: dict[str, Any] = {}
        self._policies: dict[int, tuple[int, Egress]] = {}
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Re-read the configuration when it changed (checked on every connection)."""
        stamp = self.path.stat().st_mtime_ns
        if stamp != self._stamp:
            self.data = json.loads(self.path.read_text())
            self.deny = [IPv4Network(n, strict=False) for n in self.data["deny_nets"]]
            self.deny_ports = set(self.data["deny_ports"])
            self.resolvers = [(str(a), int(p)) for a, p in self.data["resolvers"]]
            self._stamp = stamp

    def policy(self, uid: int) -> Egress | None:
        path = Path(self.data["policy_dir"]) / f"{uid}.json"
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        with self._lock:
            cached = self._policies.get(uid)
            if cached and cached[0] == stamp:
                return cached[1]
        egress = Egress.from_json(json.loads(path.read_text()))
        with self._lock:
            self._policies[uid] = (stamp, egress)
        return egress

    def platform_denied(self, address: str, port: int | None) -> bool:
        ip = IPv4Address(address)
        if ip.is_loopback or ip.is_unspecified or ip in LOCAL.addresses():
            return True
        return any(ip in net for net in self.deny) or (port is not None and port in self.deny_ports)


class _Local:
    """This host's own addresses (refused like the firewall's ``fib daddr type local``)."""

    def __init__(self) -> None:
        self._at = 0.0
        self._set: set[IPv4Address] = set()

    def addresses(self) -> set[IPv4Address]:
        if time.monotonic() - self._at > 5:
            found = set()
            with contextlib.suppress(OSError):
                text = Path("/proc/net/fib_trie").read_text().split("\n")
                for index, line in enumerate(text):
                    if "/32 host LOCAL" in line and index:
                        found.add(IPv4Address(text[index - 1].split()[-1]))
            self._set, self._at = found, time.monotonic()
        return self._set


LOCAL = _Local()


# ------------------------------------------------------------------ who is connecting


def _hex(address: str, port: int) -> str:
    return f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"


def owner_uid(proto: str, address: str, port: int, remote: tuple[str, int] | None = None) -> int | None:
    """The uid owning the socket bound to ``address:port`` (the sandbox's QEMU); for TCP
    also connected to ``remote`` (the connection's original destination)."""
    exact, wildcard = _hex(address, port), f"00000000:{port:04X}"
    far = _hex(*remote) if remote else None
    with open(f"/proc/net/{proto}") as table:
        next(table)
        for line in table:
            parts = line.split()
            if parts[1] == exact or (proto == "udp" and parts[1] == wildcard):
                if proto == "tcp" and (parts[3] == "06" or (far and parts[2] != far)):
                    continue  # TIME_WAIT (a previous owner), or another connection
                return int(parts[7])
    return None


# ------------------------------------------------------------------ DNS


def dns_question(packet: bytes) -> tuple[str, int, int]:
    """(name, qtype, offset after the question) of a query."""
    labels, offset = [], 12
    while True:
        length = packet[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0:
            raise ValueError("compressed question")
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype = struct.unpack("!H", packet[offset : offset + 2])[0]
    return ".".join(labels).lower(), qtype, offset + 4


def _skip_name(packet: bytes, offset: int) -> int:
    while True:
        length = packet[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length


def dns_addresses(packet: bytes) -> list[str]:
    """The A records of a response's answer section."""
    qd, an = struct.unpack("!HH", packet[4:8])
    offset = 12
    for _ in range(qd):
        offset = _skip_name(packet, offset) + 4
    out = []
    for _ in range(an):
        offset = _skip_name(packet, offset)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", packet[offset : offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            out.append(socket.inet_ntoa(packet[offset : offset + 4]))
        offset += length
    return out


def dns_reply(query: bytes, rcode: int) -> bytes:
    """An answerless response to ``query`` (3: NXDOMAIN, 0: no data)."""
    _name, _qtype, end = dns_question(query)
    flags = 0x8180 | rcode  # response, recursion desired + available
    return query[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + query[12:end]


def dns_query(name: str, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    body = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".") if p) + b"\0"
    return header + body + struct.pack("!HH", qtype, 1)


def forward(cfg: Config, query: bytes) -> bytes:
    """Ask the configured resolvers (UDP, then TCP when the answer was truncated)."""
    error: Exception = OSError("no resolver configured")
    for address, port in cfg.resolvers:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(3)
                udp.sendto(query, (address, port))
                while True:
                    answer, source = udp.recvfrom(65535)
                    if source[0] == address and answer[:2] == query[:2]:
                        break
            if not answer[2] & 0x02:
                return answer
            with socket.create_connection((address, port), timeout=3) as tcp:
                tcp.sendall(struct.pack("!H", len(query)) + query)
                return _read_framed(tcp)
        except (OSError, ValueError) as exc:
            error = exc
    raise error


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_framed(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", _read_exact(sock, 2))
    return _read_exact(sock, length)


def answer(cfg: Config, uid: int | None, query: bytes) -> bytes:
    """The response a sandbox gets to ``query``."""
    cfg.reload()
    egress = cfg.policy(uid) if uid is not None else None
    name = dns_question(query)[0]
    if egress is None:
        return dns_reply(query, 5)  # REFUSED: not a sandbox we know
    if not egress.dns_verdict(name):
        # never forwarded: a query is data leaving the sandbox (DNS tunnelling)
        return dns_reply(query, 3)
    return forward(cfg, query)


def resolve(cfg: Config, name: str) -> list[str]:
    return dns_addresses(forward(cfg, dns_query(name)))


def serve_dns_udp(cfg: Config, sock: socket.socket) -> None:
    """A bounded pool answers; past its backlog, queries are dropped (never a thread each)."""
    pool = ThreadPoolExecutor(max_workers=DNS_WORKERS, thread_name_prefix="dns")
    waiting = threading.BoundedSemaphore(DNS_BACKLOG)
    while True:
        try:
            query, peer = sock.recvfrom(4096)
        except OSError:
            time.sleep(0.01)
            continue
        if not waiting.acquire(blocking=False):
            continue

        def one(query: bytes = query, peer: tuple[str, int] = peer) -> None:
            try:
                _dns_udp_one(cfg, sock, query, peer)
            finally:
                waiting.release()

        pool.submit(one)


def _dns_udp_one(cfg: Config, sock: socket.socket, query: bytes, peer: tuple[str, int]) -> None:
    try:
        uid = owner_uid("udp", peer[0], peer[1])
        sock.sendto(answer(cfg, uid, query), peer)
    except Exception:
        log.debug("dns query from %s failed", peer, exc_info=True)


def _dns_tcp_one(cfg: Config, conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.settimeout(10)
        uid = owner_uid("tcp", peer[0], peer[1])
        with contextlib.suppress(Exception):
            while True:
                query = _read_framed(conn)
                reply = answer(cfg, uid, query)
                conn.sendall(struct.pack("!H", len(reply)) + reply)


# ------------------------------------------------------------------ first bytes


class Incomplete(ValueError):
    """More bytes are needed to decide."""


def _handshake(data: bytes) -> bytes:
    """The first handshake message, reassembled from as many TLS records as it spans."""
    body, offset = b"", 0
    while True:
        if len(data) < offset + 5:
            raise Incomplete("short record")
        if data[offset] != 0x16:
            raise ValueError("not a handshake record")
        length = struct.unpack("!H", data[offset + 3 : offset + 5])[0]
        if len(data) < offset + 5 + length:
            raise Incomplete("short record")
        body += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(body) >= 4:
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > 4 * HEAD_LIMIT:
                raise ValueError("handshake too large")
            if len(body) >= needed:
                return body[:needed]


def sni_of(data: bytes) -> str | None:
    """The server name of a TLS ClientHello (None if it has none); Incomplete until the
    whole ClientHello is there, however many records it is split into."""
    if len(data) < 5:
        raise Incomplete("short")
    if data[0] != 0x16:
        return None
    hello = _handshake(data)
    if hello[0] != 1:
        raise ValueError("not a ClientHello")
    offset = 4 + 2 + 32
    offset += 1 + hello[offset]  # session id
    offset += 2 + struct.unpack("!H", hello[offset : offset + 2])[0]  # cipher suites
    offset += 1 + hello[offset]  # compression
    if offset + 2 > len(hello):
        return None  # no extensions
    end = offset + 2 + struct.unpack("!H", hello[offset : offset + 2])[0]
    offset += 2
    while offset + 4 <= end:
        kind, size = struct.unpack("!HH", hello[offset : offset + 4])
        offset += 4
        if kind == 0:
            names = hello[offset + 2 : offset + size]
            if not names or names[0] != 0:
                raise ValueError("unreadable server_name")
            name_len = struct.unpack("!H", names[1:3])[0]
            return names[3 : 3 + name_len].decode("ascii").lower().rstrip(".")
        offset += size
    return None


def host_of(head: bytes) -> str | None:
    """The Host of an HTTP request head (None if it has none); Incomplete until the head
    is whole. Ambiguous heads (bare LF line ends, two Host headers, folded lines, a Host
    with spaces or non-ASCII) are refused: a server may read them otherwise than we do."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        if len(head) >= HEAD_LIMIT:
            raise ValueError("request head over 16 KiB")
        if b"\n\n" in head or b"\n\r\n" in head:
            raise ValueError("bare LF line ends")
        raise Incomplete("short")
    lines = head[:end].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise ValueError("bare CR or LF in the head")
    hosts = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ValueError("folded header line")
        key, _, value = line.partition(b":")
        if key.lower() == b"host":
            hosts.append(value.strip())
        elif key.strip().lower() == b"host":
            raise ValueError("space in a Host header's name")
    if len(hosts) > 1:
        raise ValueError("more than one Host header")
    if not hosts:
        return None
    host = hosts[0].decode("ascii").lower()
    if not host or host.startswith("[") or any(c.isspace() for c in host):
        raise ValueError("unreadable Host")
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def read_first(conn: socket.socket, port: int) -> tuple[bytes, str | None]:
    """The first bytes and the name they carry (None: no name, the address decides).
    Within FIRST_BYTES_SECONDS in all; what cannot be parsed for sure is Refused."""
    data = b""
    deadline = time.monotonic() + FIRST_BYTES_SECONDS
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("no complete ClientHello or request head in time")
        conn.settimeout(left)
        try:
            chunk = conn.recv(HEAD_LIMIT)
        except TimeoutError as exc:
            raise Refused("no complete ClientHello or request head in time") from exc
        if not chunk:
            raise Refused("closed before a request")
        data += chunk
        try:
            if data[:1] == b"\x16":
                return data, sni_of(data)
            if port == 443:
                return data, None  # not TLS: the address decides
            return data, host_of(data)
        except Incomplete:
            if len(data) >= 4 * HEAD_LIMIT:
                raise Refused("ClientHello or request head too large") from None
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
            raise Refused(f"unreadable first bytes: {exc}") from None


def with_headers(head: bytes, headers: dict[str, str]) -> bytes:
    """The request head with ``headers`` set (replacing the guest's) and the connection
    closed after this request (the next one on it would not be seen)."""
    text, _, rest = head.partition(b"\r\n\r\n")
    lines = text.split(b"\r\n")
    drop = {k.lower().encode() for k in headers} | {b"connection", b"proxy-connection", b"keep-alive"}
    kept = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in drop]
    added = [f"{k}: {v}".encode() for k, v in headers.items()] + [b"Connection: close"]
    return b"\r\n".join(kept + added) + b"\r\n\r\n" + rest


# ------------------------------------------------------------------ TCP


def _reset(conn: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the guest sees a refused connection at once."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _pipe(src: Any, dst: Any, done: threading.Event) -> None:
    try:
        while True:
            data = src.recv(BUFFER)
            if not data:
                break
            dst.sendall(data)
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        done.set()


def splice(a: Any, b: Any) -> None:
    done = threading.Event()
    other = threading.Thread(target=_pipe, args=(b, a, done), daemon=True)
    other.start()
    _pipe(a, b, threading.Event())
    other.join()


def _is_address(name: str) -> bool:
    try:
        IPv4Address(name)
    except ValueError:
        return False
    return True


class _Slots:
    """Connections each sandbox holds through the proxy (a guest cannot take them all)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[int, int] = {}

    def take(self, uid: int) -> bool:
        with self.lock:
            if self.held.get(uid, 0) >= PER_SANDBOX:
                return False
            self.held[uid] = self.held.get(uid, 0) + 1
            return True

    def give(self, uid: int) -> None:
        with self.lock:
            self.held[uid] -= 1
            if not self.held[uid]:
                del self.held[uid]


SLOTS = _Slots()


def decide(cfg: Config, egress: Egress, name: str | None, dst: str, port: int) -> str:
    """The address to connect to, or Refused. A Host/SNI that is an address literal names
    nothing: the connection's own address decides."""
    if name and not _is_address(name):
        verdict = egress.name_verdict(name, port)
        if verdict is False:
            raise Refused(f"{name}:{port} denied")
        if verdict is True:  # resolved here: a forged name never picks the address
            addresses = [a for a in resolve(cfg, name) if not cfg.platform_denied(a, port)]
            if not addresses:
                raise Refused(f"{name} resolves to no allowed address")
            address = addresses[0]
            if any(rule.matches(IPv4Address(address), port) for rule in egress.deny):
                raise Refused(f"{address}:{port} denied")
            return address
        # no rule names it: the connection's own address decides (nothing is resolved, so a
        # name the policy does not allow never leaves the host)
    if cfg.platform_denied(dst, port) or not egress.address_allowed(IPv4Address(dst), port):
        raise Refused(f"{dst}:{port} not allowed")
    return dst


def _turn_away(conn: socket.socket, peer: tuple[str, int], exc: Exception) -> None:
    """Log why (a refusal, or a failure on the way) and reset the guest's connection."""
    log.info("%s %s: %s", "refused" if isinstance(exc, Refused) else "failed", peer, exc)
    _reset(conn)


def handle_tcp(cfg: Config, tls: TlsFactory, conn: socket.socket, peer: tuple[str, int]) -> None:
    try:
        cfg.reload()
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        dst = socket.inet_ntoa(raw[4:8])
        uid = owner_uid("tcp", peer[0], peer[1], (dst, port))
        egress = cfg.policy(uid) if uid is not None else None
        if uid is None or egress is None:
            raise Refused(f"no policy for uid {uid}")
        if not SLOTS.take(uid):
            raise Refused(f"uid {uid} holds {PER_SANDBOX} connections through the proxy")
    except Exception as exc:
        _turn_away(conn, peer, exc)
        return
    try:
        _handle_tcp(cfg, tls, conn, peer, egress, dst, port)
    finally:
        SLOTS.give(uid)


def _handle_tcp(
    cfg: Config,
    tls: TlsFactory,
    conn: socket.socket,
    peer: tuple[str, int],
    egress: Egress,
    dst: str,
    port: int,
) -> None:
    try:
        first, name = read_first(conn, port)
        address = decide(cfg, egress, name, dst, port)
        upstream = socket.create_connection((address, port), timeout=CONNECT_SECONDS)
    except Exception as exc:
        _turn_away(conn, peer, exc)
        return
    conn.settimeout(None)
    upstream.settimeout(None)
    headers = egress.headers.get(name or "")
    try:
        if headers and port == 443 and name:
            _intercept_tls(tls, conn, upstream, first, name, headers)
        else:
            if headers:  # `first` is a whole head: read_first returned its Host
                first = with_headers(first, headers)
            upstream.sendall(first)
            splice(conn, upstream)
    except Exception as exc:
        log.info("connection %s ended: %s", peer, exc)
    finally:
        upstream.close()
        conn.close()


def _complete_head(conn: Any, data: bytes) -> bytes:
    while b"\r\n\r\n" not in data and len(data) < 4 * HEAD_LIMIT:
        chunk = conn.recv(HEAD_LIMIT)
        if not chunk:
            break
        data += chunk
    return data


class _BioSocket:
    """A TLS server session over a socket whose first bytes were already read. The two
    directions run in two threads: the TLS object is used under a lock, never while a
    thread waits on the socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, first: bytes) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.incoming.write(first)
        self._run(self.tls.do_handshake)

    def _run(self, op: Any, *args: Any) -> Any:
        while True:
            with self.lock:
                try:
                    result = op(*args)
                    want_read = False
                except ssl.SSLWantReadError:
                    want_read = True
                pending = self.outgoing.read()
            if pending:
                self.sock.sendall(pending)
            if not want_read:
                return result
            data = self.sock.recv(BUFFER)
            with self.lock:
                if not data:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(data)
            if not data:
                raise ConnectionError("closed during TLS")

    def recv(self, size: int) -> bytes:
        try:
            return bytes(self._run(self.tls.read, size))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
            return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._run(self.tls.write, view)
            view = view[written:]

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(Exception):
            self._run(self.tls.unwrap)
        self.sock.shutdown(how)


def _intercept_tls(
    tls: TlsFactory,
    conn: socket.socket,
    upstream: socket.socket,
    first: bytes,
    name: str,
    headers: dict[str, str],
) -> None:
    client = _BioSocket(conn, tls.server_context(name), first)
    head = _complete_head(client, b"")
    if host_of(head) not in (name, None):  # the secret goes to the host the rule names only
        raise Refused(f"Host {host_of(head)!r} inside TLS for {name!r}")
    server = tls.client_context().wrap_socket(upstream, server_hostname=name)
    server.sendall(with_headers(head, headers))
    splice(client, server)


class TlsFactory:
    """Certificates of the installation's CA for intercepted hosts (cached per name)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._contexts: dict[str, tuple[ssl.SSLContext, datetime]] = {}
        self._lock = threading.Lock()

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        extra = self.cfg.data.get("upstream_ca_file")
        if extra:
            context.load_verify_locations(cafile=extra)
        return context

    def server_context(self, name: str) -> ssl.SSLContext:
        with self._lock:
            cached = self._contexts.get(name)
            if cached and datetime.now(UTC) - cached[1] < CERT_RENEW_AFTER:
                return cached[0]
        ca_cert = x509.load_pem_x509_certificate(Path(self.cfg.data["ca_cert"]).read_bytes())
        ca_key = serialization.load_pem_private_key(Path(self.cfg.data["ca_key"]).read_bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        directory = Path(self.cfg.data["cert_dir"])
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = directory / f"{name}.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pem.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        context.set_alpn_protocols(["http/1.1"])
        with self._lock:
            self._contexts[name] = (context, now)
        return context


# ------------------------------------------------------------------ main


def _accept_loop(server: socket.socket, target: Any, *args: Any) -> None:
    """Never ends: out of descriptors or threads, it waits a moment and goes on."""
    while True:
        try:
            conn, peer = server.accept()
        except OSError:
            log.warning("accept failed", exc_info=True)
            time.sleep(0.1)
            continue
        try:
            threading.Thread(target=target, args=(*args, conn, peer), daemon=True).start()
        except RuntimeError:  # no thread to be had
            _reset(conn)
            time.sleep(0.1)


def drop_privileges(user: str) -> None:
    """Become ``user`` (no supplementary groups), irreversibly."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("the egress proxy must not run as root")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s egress %(levelname)s %(message)s")
    cfg = Config(Path(argv[1]))
    tls = TlsFactory(cfg)

    def listen(kind: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        return sock

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(512 * 1024)
    tcp = listen(socket.SOCK_STREAM, cfg.data["proxy_port"])
    dns_tcp = listen(socket.SOCK_STREAM, cfg.data["dns_port"])
    dns_udp = listen(socket.SOCK_DGRAM, cfg.data["dns_port"])
    if len(argv) > 2:
        drop_privileges(argv[2])
    threading.Thread(target=_accept_loop, args=(tcp, handle_tcp, cfg, tls), daemon=True).start()
    threading.Thread(target=_accept_loop, args=(dns_tcp, _dns_tcp_one, cfg), daemon=True).start()
    threading.Thread(target=serve_dns_udp, args=(cfg, dns_udp), daemon=True).start()
    log.info(
        "listening on 127.0.0.1:%s (tcp) and :%s (dns), pid %s",
        cfg.data["proxy_port"],
        cfg.data["dns_port"],
        os.getpid(),
    )
    threading.Event().wait()  # the configuration is re-read on each connection and query
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The servers of the network lab (`tests/netlab.py`), run inside its network namespace.

Usage: `python netlab_server.py CONFIG.json`, where the config is
`{"names": {"alpha.test": "198.18.0.2", "*.wild.test": "198.18.0.5"}, "dns": "198.18.0.53"}`.
Stdlib plus `cryptography`; it serves

- DNS on the `dns` address, port 53, UDP and TCP: A records from `names` (exact names and
  `*.suffix` wildcards, which match any name below the suffix), an empty NOERROR answer for
  other types of a known name, NXDOMAIN for unknown names;
- HTTP on port 80 and HTTPS on port 443 of every address (a leaf certificate for all the
  names, signed by a CA made at start and written to `ca.pem` next to the config):
  `GET /echo` answers what the server saw as JSON, `GET /bytes?n=N&rate=R` N bytes (at R
  bytes per second when given), anything else 404;
- a TCP echo on port 7000 and a UDP echo on port 7001 of every address.

It writes `ready` next to the config when every listener is up, and runs until SIGTERM.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DNS_PORT = 53
HTTP_PORT = 80
HTTPS_PORT = 443
TCP_ECHO_PORT = 7000
UDP_ECHO_PORT = 7001

STOP = threading.Event()  # set at SIGTERM: ends throttled downloads at once


# --- DNS ---------------------------------------------------------------------------------

NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
TYPE_A, CLASS_IN = 1, 1


def lookup(names: Mapping[str, str], name: str) -> str | None:
    """The address of `name` (lower case, no trailing dot): exact names first, then the
    longest matching `*.suffix` wildcard."""
    if name in names:
        return names[name]
    wildcards = [key for key in names if key.startswith("*.") and name.endswith(key[1:])]
    return names[max(wildcards, key=len)] if wildcards else None


def dns_answer(names: Mapping[str, str], query: bytes) -> bytes | None:
    """The response to one DNS message (None: too short to answer, dropped)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    opcode, recursion_desired = (flags >> 11) & 0xF, flags & 0x0100

    def response(rcode: int, question: bytes = b"", answers: bytes = b"", ancount: int = 0) -> bytes:
        reply_flags = 0x8000 | (opcode << 11) | 0x0400 | recursion_desired | 0x0080 | rcode  # QR AA RA
        header = struct.pack("!HHHHHH", ident, reply_flags, 1 if question else 0, ancount, 0, 0)
        return header + question + answers

    if opcode != 0:
        return response(NOTIMP)
    if qdcount != 1:
        return response(FORMERR)
    labels: list[str] = []
    offset = 12
    try:
        while (length := query[offset]) != 0:
            if length > 63:  # a compression pointer: not in a question we accept
                return response(FORMERR)
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii").lower())
            offset += 1 + length
        qtype, qclass = struct.unpack("!HH", query[offset + 1 : offset + 5])
    except (IndexError, UnicodeDecodeError, struct.error):
        return response(FORMERR)
    question = query[12 : offset + 5]  # echoed as asked (keeps the client's 0x20 case)
    address = lookup(names, ".".join(labels))
    if address is None:
        return response(NXDOMAIN, question)
    if qtype != TYPE_A or qclass != CLASS_IN:
        return response(NOERROR, question)
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 60, 4) + socket.inet_aton(address)
    return response(NOERROR, question, record, 1)


def serve_dns_udp(sock: socket.socket, names: Mapping[str, str]) -> None:
    while True:
        query, client = sock.recvfrom(65535)
        answer = dns_answer(names, query)
        if answer is not None:
            sock.sendto(answer, client)


class DnsTcpHandler(socketserver.BaseRequestHandler):
    """Length-prefixed DNS messages over one connection, until the client closes it."""

    names: Mapping[str, str] = {}

    def handle(self) -> None:
        stream = self.request.makefile("rb")
        while len(prefix := stream.read(2)) == 2:
            answer = dns_answer(self.names, stream.read(struct.unpack("!H", prefix)[0]))
            if answer is None:
                return
            self.request.sendall(struct.pack("!H", len(answer)) + answer)


# --- HTTP and HTTPS ----------------------------------------------------------------------


def make_certificates(names: list[str], directory: Path) -> Path:
    """A CA (written to `ca.pem`) and a leaf for `names` signed by it; the path of a PEM
    file with the leaf's key and certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netlab test CA")])

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )

    ca = (
        builder(ca_name, ca_key, ca=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netlab")]), leaf_key, ca=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + leaf.public_bytes(serialization.Encoding.PEM)
    )
    return chain


class LabHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/echo":
            body = json.dumps(
                {
                    "host": self.headers.get("Host"),
                    "sni": getattr(self.connection, "netlab_sni", None),
                    "local_addr": self.connection.getsockname()[0],
                    "headers": dict(self.headers.items()),
                    "path": self.path,
                }
            ).encode()
            self.respond(200, "application/json", body)
        elif url.path == "/bytes":
            query = parse_qs(url.query)
            try:
                count = int(query.get("n", ["0"])[0])
                rate = float(query["rate"][0]) if "rate" in query else None
            except ValueError:
                self.respond(400, "text/plain", b"n and rate must be numbers\n")
                return
            if count < 0 or (rate is not None and rate <= 0):
                self.respond(400, "text/plain", b"n must be >= 0 and rate > 0\n")
                return
            self.send_bytes(count, rate)
        else:
            self.respond(404, "text/plain", b"not found\n")

    def respond(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_bytes(self, count: int, rate: float | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(count))
        self.end_headers()
        chunk = 65536 if rate is None else max(1, min(65536, int(rate / 10)))
        started, sent = time.monotonic(), 0
        while sent < count and not STOP.is_set():
            size = min(chunk, count - sent)
            if rate is not None:  # pace: the first `sent + size` bytes leave after (sent + size) / rate s
                STOP.wait(max(0.0, started + (sent + size) / rate - time.monotonic()))
            self.wfile.write(b"x" * size)
            sent += size


class LabHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake runs here, in the connection's thread, not in the accept loop."""
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # a client that gave up or did not trust the CA
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError | TimeoutError):
            super().handle_error(request, client_address)


def tls_context(chain: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)

    def record_sni(connection: Any, name: str | None, _context: ssl.SSLContext) -> None:
        connection.netlab_sni = name  # read by /echo; the certificate stays the same

    context.sni_callback = record_sni
    return context


# --- echo --------------------------------------------------------------------------------


class TcpEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def serve_udp_echo(sock: socket.socket) -> None:
    """Echoes each datagram from the address it was sent to (the socket is bound to 0.0.0.0)."""
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_PKTINFO, 1)
    while True:
        data, ancillary, _, client = sock.recvmsg(65535, socket.CMSG_SPACE(12))
        replies_from = [  # struct in_pktinfo: ifindex, local address, header destination
            (socket.IPPROTO_IP, socket.IP_PKTINFO, bytes(4) + info[8:12] + bytes(4))
            for level, kind, info in ancillary
            if (level, kind) == (socket.IPPROTO_IP, socket.IP_PKTINFO)
        ]
        sock.sendmsg([data], replies_from, 0, client)


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    config_path = Path(sys.argv[1])
    config = json.loads(config_path.read_text())
    names = {
        key.lower().rstrip("."): str(ipaddress.IPv4Address(value)) for key, value in config["names"].items()
    }
    directory = config_path.parent
    # Block the stop signals before any thread starts (threads inherit the mask), then wait for one.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

    dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_udp.bind((config["dns"], DNS_PORT))
    DnsTcpHandler.names = names
    dns_tcp = ThreadingTCPServer((config["dns"], DNS_PORT), DnsTcpHandler)
    http = LabHTTPServer(("0.0.0.0", HTTP_PORT), LabHandler)
    https = LabHTTPServer(("0.0.0.0", HTTPS_PORT), LabHandler)
    https.tls = tls_context(make_certificates(sorted(names), directory))
    tcp_echo = ThreadingTCPServer(("0.0.0.0", TCP_ECHO_PORT), TcpEchoHandler)
    udp_echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_echo.bind(("0.0.0.0", UDP_ECHO_PORT))

    loops: list[Any] = [
        (serve_dns_udp, dns_udp, names),
        (serve_udp_echo, udp_echo),
        *((server.serve_forever,) for server in (dns_tcp, http, https, tcp_echo)),
    ]
    for target, *args in loops:
        threading.Thread(target=target, args=args, daemon=True).start()
    (directory / "ready.tmp").write_text("ready\n")
    (directory / "ready.tmp").rename(directory / "ready")  # all at once: never seen half-written
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    STOP.set()


if __name__ == "__main__":
    main()

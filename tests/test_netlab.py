"""The network lab (`tests/netlab.py`) seen from the host: its DNS, web servers and echoes."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.netlab import NetLab

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="the lab needs root and iproute2"
)

TYPE_A, TYPE_AAAA = 1, 28
NOERROR, NXDOMAIN = 0, 3


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    with NetLab() as running:
        server = running._server
        yield running
    # Torn down: no process, namespace, interface or files left behind.
    assert server is not None and server.poll() is not None
    assert (
        running.namespace
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert subprocess.run(["ip", "link", "show", running.host_interface], capture_output=True).returncode != 0
    assert not running.workdir.exists()


def dns_query(lab: NetLab, name: str, qtype: int = TYPE_A, *, tcp: bool = False) -> tuple[int, list[str]]:
    """The rcode and the A addresses of the lab resolver's answer."""
    ident = secrets.randbits(16)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)
    if tcp:
        with socket.create_connection((lab.resolver, 53), timeout=5) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            stream = sock.makefile("rb")
            reply = stream.read(struct.unpack("!H", stream.read(2))[0])
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(query, (lab.resolver, 53))
            reply = sock.recv(65535)
    reply_id, flags, _, count = struct.unpack("!HHHH", reply[:8])
    assert reply_id == ident and flags & 0x8000, reply
    assert reply[12 : len(query)] == query[12:]  # the question, echoed
    addresses, offset = [], len(query)
    for _ in range(count):
        assert reply[offset] & 0xC0 == 0xC0  # the name: a pointer to the question
        rtype, _, _, length = struct.unpack("!HHIH", reply[offset + 2 : offset + 12])
        if rtype == TYPE_A:
            addresses.append(socket.inet_ntoa(reply[offset + 12 : offset + 12 + length]))
        offset += 12 + length
    return flags & 0xF, addresses


def https_connection(lab: NetLab, address: str, server_name: str) -> http.client.HTTPSConnection:
    """HTTPS to `address` with SNI `server_name`, verified against the lab's CA."""
    context = ssl.create_default_context(cadata=lab.ca_pem.decode())
    connection = http.client.HTTPSConnection(server_name, timeout=5, context=context)
    raw = socket.create_connection((address, 443), timeout=5)
    connection.sock = context.wrap_socket(raw, server_hostname=server_name)
    return connection


def get_json(connection: http.client.HTTPConnection, path: str, **headers: str) -> dict[str, object]:
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    echo: dict[str, object] = json.loads(response.read())
    return echo


def test_dns_answers_its_names_and_wildcards(lab: NetLab) -> None:
    assert dns_query(lab, "alpha.test") == (NOERROR, ["198.18.0.2"])
    assert dns_query(lab, "beta.test", tcp=True) == (NOERROR, ["198.18.0.3"])
    assert dns_query(lab, "Deep.Sub.WILD.test") == (NOERROR, ["198.18.0.5"])
    assert dns_query(lab, "alpha.test", TYPE_AAAA) == (NOERROR, [])
    assert dns_query(lab, "unknown.test") == (NXDOMAIN, [])
    assert dns_query(lab, "wild.test", tcp=True) == (NXDOMAIN, [])


def test_http_echo_reports_the_host_and_the_address(lab: NetLab) -> None:
    connection = http.client.HTTPConnection("198.18.0.2", 80, timeout=5)
    echo = get_json(connection, "/echo?x=1", Host="alpha.test", X_Probe="1")
    assert echo["host"] == "alpha.test"
    assert echo["local_addr"] == "198.18.0.2"
    assert echo["sni"] is None
    assert echo["path"] == "/echo?x=1"
    assert echo["headers"] == {"Host": "alpha.test", "Accept-Encoding": "identity", "X_Probe": "1"}
    connection.request("GET", "/nothing")
    assert connection.getresponse().status == 404  # on the same, kept-alive connection


def test_https_verifies_against_the_lab_ca_and_reports_the_sni(lab: NetLab) -> None:
    echo = get_json(https_connection(lab, "198.18.0.3", "beta.test"), "/echo")
    assert (echo["sni"], echo["host"], echo["local_addr"]) == ("beta.test", "beta.test", "198.18.0.3")

    echo = get_json(https_connection(lab, "198.18.0.5", "x.wild.test"), "/echo")
    assert echo["sni"] == "x.wild.test"

    with pytest.raises(ssl.SSLCertVerificationError):
        https_connection(lab, "198.18.0.3", "other.example")


def test_bytes_sends_n_bytes_at_the_rate_asked(lab: NetLab) -> None:
    connection = http.client.HTTPConnection("198.18.0.4", 80, timeout=5)
    connection.request("GET", "/bytes?n=300000")
    response = connection.getresponse()
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert len(response.read()) == 300000

    started = time.monotonic()
    connection.request("GET", "/bytes?n=3000&rate=10000")
    assert len(connection.getresponse().read()) == 3000
    assert time.monotonic() - started >= 0.25  # throttled: never faster than the rate


def test_tcp_and_udp_echo(lab: NetLab) -> None:
    with socket.create_connection(("198.18.0.6", 7000), timeout=5) as sock:
        sock.sendall(b"hello lab")
        sock.shutdown(socket.SHUT_WR)
        assert sock.makefile("rb").read() == b"hello lab"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"ping", ("198.18.0.7", 7001))
        assert sock.recvfrom(100) == (b"ping", ("198.18.0.7", 7001))


def test_a_second_lab_is_refused_while_one_runs(lab: NetLab) -> None:
    second = NetLab()
    with pytest.raises(RuntimeError, match=r"198\.18\.0\.1 is already assigned"):
        second.start()
    assert not second.workdir.exists()
    assert dns_query(lab, "alpha.test") == (NOERROR, ["198.18.0.2"])  # the running lab was spared

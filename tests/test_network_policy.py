"""Network policies without VMs: what each policy shape decides (sandboxes/runtime/egress/
policy.py), the nftables script it becomes, and the egress proxy's parsers of hostile
first bytes (DNS, TLS ClientHello, HTTP heads). The VM tests (test_network_vm.py) check
the same decisions end to end on real guests."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from sandboxes.runtime.egress import firewall, proxy
from sandboxes.runtime.egress.policy import (
    AddressRule,
    Egress,
    NameRule,
    PolicyError,
    compile_policy,
    parse_entry,
    parse_rules,
    redact_rules,
)

PROFILES = {"package-registries": ["pypi.org", "files.pythonhosted.org"], "corp": ["10.9.0.0/16"]}


def _egress(**policy: object) -> Egress:
    shown = {"allow_internet_access": True, "allow_package_registry_access": False, **policy}
    return compile_policy(shown, {}, PROFILES)


def allowed(egress: Egress, host: str | None, address: str, port: int) -> bool:
    """A connection's fate as the firewall and proxy decide it together."""
    if host is not None and egress.by_name and port in (80, 443):
        verdict = egress.name_verdict(host, port)
        if verdict is not None:
            return verdict and not any(r.matches(IPv4Address(address), port) for r in egress.deny)
    return egress.address_allowed(IPv4Address(address), port)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("203.0.113.7", AddressRule(IPv4Network("203.0.113.7/32"))),
        ("203.0.113.0/24:5432", AddressRule(IPv4Network("203.0.113.0/24"), 5432)),
        ("PyPI.org", NameRule("pypi.org")),
        ("pypi.org.", NameRule("pypi.org")),
        ("*.example.com", NameRule("*.example.com")),
        ("api.example.com:443", NameRule("api.example.com", 443)),
        ("0.0.0.0/0", None),
    ],
)
def test_entries_parse_to_rules(entry: str, expected: object) -> None:
    assert parse_entry(entry, "allow_out") == expected


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("pypi.org:5432", "ports 80 (HTTP Host) and 443 (TLS SNI) only"),
        ("::1", "IPv6"),
        ("2001:db8::/32", "IPv6"),
        ("[::1]:443", "IPv6"),
        ("not a host", "neither an IPv4 address/CIDR nor a host name"),
        ("1.2.3", "neither"),
        ("localhost", "neither"),
        ("a..b", "neither"),
        ("x.com:0", "port must be 1-65535"),
        ("x.com:99999", "port must be 1-65535"),
        ("0.0.0.0/0:443", "all traffic to one port"),
        ("", "non-empty strings"),
        ("198.18.0.2/0", "bits set past its prefix; write the network (0.0.0.0/0)"),
        ("10.0.0.1/8", "write the network (10.0.0.0/8)"),
        ("*", "neither"),
        ("*.*.com", "neither"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(entry: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_entry(entry, "allow_out")


def test_default_policy_allows_everything_but_the_platform_set() -> None:
    egress = _egress()
    assert egress.default_allow and not egress.by_name
    assert allowed(egress, None, "198.18.0.2", 7000)


def test_allow_internet_access_false_blocks_all() -> None:
    egress = _egress(allow_internet_access=False)
    assert not allowed(egress, None, "198.18.0.2", 443)
    assert not allowed(egress, "alpha.test", "198.18.0.2", 443)
    assert egress.dns_verdict("alpha.test") is False  # never asked of a resolver


def test_an_allowed_name_only_by_host_and_sni_and_deny_wins() -> None:
    egress = _egress(
        allow_internet_access=False, allow_out=["alpha.test", "*.wild.test"], deny_out=["x.wild.test"]
    )
    assert egress.by_name
    assert allowed(egress, "alpha.test", "198.18.0.2", 443)
    assert allowed(egress, "alpha.test", "198.18.0.2", 80)
    assert allowed(egress, "a.b.wild.test", "198.18.0.5", 443)
    assert not allowed(egress, "wild.test", "198.18.0.5", 443)  # the wildcard is below it only
    assert not allowed(egress, "x.wild.test", "198.18.0.5", 443)
    assert not allowed(egress, "beta.test", "198.18.0.3", 443)
    assert not allowed(egress, None, "198.18.0.2", 7000)  # raw ports: addresses decide
    assert egress.dns_verdict("alpha.test") is True
    assert egress.dns_verdict("x.wild.test") is False


def test_cidr_rules_on_every_port_and_deny_wins() -> None:
    egress = _egress(
        allow_internet_access=False, allow_out=["198.18.0.0/24"], deny_out=["198.18.0.3", "198.18.0.4:7000"]
    )
    assert allowed(egress, None, "198.18.0.2", 7000)
    assert not allowed(egress, None, "198.18.0.3", 7000)
    assert not allowed(egress, None, "198.18.0.4", 7000)
    assert allowed(egress, None, "198.18.0.4", 80)
    assert not allowed(egress, None, "203.0.113.1", 80)


def test_all_traffic_in_deny_out_is_default_deny_and_allow_out_adds_exceptions() -> None:
    egress = _egress(allow_out=["alpha.test"], deny_out=["0.0.0.0/0"])
    assert not egress.default_allow
    assert allowed(egress, "alpha.test", "198.18.0.2", 443)
    assert not allowed(egress, "beta.test", "198.18.0.3", 443)


def test_all_traffic_in_allow_out_reopens_a_closed_default() -> None:
    assert _egress(allow_internet_access=False, allow_out=["0.0.0.0/0"]).default_allow


def test_profiles_and_the_registry_flag_grant_their_hosts() -> None:
    registries = compile_policy(
        {"allow_internet_access": False, "allow_package_registry_access": True}, {}, PROFILES
    )
    assert registries.name_verdict("pypi.org", 443) is True
    corp = _egress(allow_internet_access=False, egress_profiles=["corp"])
    assert corp.address_allowed(IPv4Address("10.9.1.1"), 22)


def test_egress_round_trips_through_the_proxy_file() -> None:
    egress = compile_policy(
        {
            "allow_internet_access": False,
            "allow_out": ["alpha.test:443", "10.0.0.0/8:22"],
            "deny_out": ["b.test"],
        },
        {"api.test": {"Authorization": "Bearer s"}},
        PROFILES,
    )
    assert Egress.from_json(egress.to_json()) == egress


def test_rules_parse_merge_and_are_shown_without_values() -> None:
    headers = parse_rules(
        {"API.example.com": [{}, {"transform": {"headers": {"Authorization": "Bearer s3cret", "X-A": "1"}}}]}
    )
    assert headers == {"api.example.com": {"Authorization": "Bearer s3cret", "X-A": "1"}}
    shown = redact_rules(headers)
    assert "s3cret" not in repr(shown)
    assert shown == {
        "api.example.com": [{"transform": {"headers": {"Authorization": "[secret]", "X-A": "[secret]"}}}]
    }


@pytest.mark.parametrize(
    "rules",
    [
        [],
        {"*.example.com": []},
        {"x.com": {}},
        {"x.com": [{"drop": True}]},
        {"x.com": [{"transform": {"body": "x"}}]},
        {"x.com": [{"transform": {"headers": {"Host": "evil"}}}]},
        {"x.com": [{"transform": {"headers": {"Content-Length": "1"}}}]},
        {"x.com": [{"transform": {"headers": {"X-A": "a\r\nX-B: b"}}}]},
        {"x.com": [{"transform": {"headers": {"X A": "1"}}}]},
        {"x.com": [{"transform": {"headers": {"X-A": 1}}}]},
        {"x.com": [{"transform": {"headers": {"X-A": "\u2603"}}}]},
        {"x.com": [{"transform": {"headers": {"X-A": "a\x7f"}}}]},
        {"x.com": [{"transform": {"headers": {"X-A": "a\x0bb"}}}]},
    ],
)
def test_bad_rules_are_refused(rules: object) -> None:
    with pytest.raises(PolicyError):
        parse_rules(rules)


# ------------------------------------------------------------------ the nftables script

CFG = firewall.HostConfig(
    qemu_gid=900,
    shared_uid=901,
    proxy_uid=902,
    proxy_port=15380,
    dns_port=15353,
    deny_nets=("10.0.0.0/8", "169.254.0.0/16"),
    deny_ports=(25,),
    resolvers=("198.18.0.53",),
    run_dir=Path("/nonexistent"),
    uid_base=1_000_000_000,
    max_connections={"standard": 1024, "restricted": 64},
)


def test_base_script_refuses_the_host_and_unknown_qemu_uids() -> None:
    script = firewall.base_script(CFG)
    assert "add rule inet watasu platform fib daddr type local goto refuse" in script
    assert "add element inet watasu platform_deny { 10.0.0.0/8, 169.254.0.0/16 }" in script
    assert "th dport { 25 } goto refuse" in script
    lines = [line for line in script.splitlines() if " output " in line and line.startswith("add rule")]
    assert lines[-1] == "add rule inet watasu output goto refuse"  # a uid without a chain: nothing
    assert "add rule inet watasu output meta skgid != 900 accept" in script


def test_sandbox_script_orders_deny_before_allow_and_redirects_names_only_when_needed() -> None:
    closed = _egress(allow_internet_access=False, allow_out=["198.18.0.0/24"], deny_out=["198.18.0.3"])
    script = firewall.sandbox_script(CFG, 1_000_000_007, closed, "restricted")
    rules = [line for line in script.splitlines() if line.startswith("add rule inet watasu sb_1000000007")]
    assert "ct count over 64" in rules[0]
    assert "ct status dnat" in rules[1] and rules[2].endswith("jump platform")  # the limit comes first
    assert "198.18.0.3 counter goto refuse" in rules[3]
    assert "198.18.0.0/24 accept" in rules[4]
    assert rules[-1].endswith("counter goto refuse")
    assert "redirect to :15353" in script and "redirect to :15380" not in script
    named = firewall.sandbox_script(CFG, 1_000_000_007, _egress(deny_out=["evil.test"]), "standard")
    assert "tcp dport { 80, 443 } redirect to :15380" in named
    assert "udp dport 443 counter goto refuse" in named  # QUIC would skip the SNI check


# ------------------------------------------------------------------ the proxy's parsers


def _client_hello(name: str) -> bytes:
    """A real ClientHello, as Python's ssl module sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The ClientHello's handshake message re-sent as TLS records of ``size`` bytes each."""
    body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    return b"".join(
        b"\x16\x03\x01" + len(body[i : i + size]).to_bytes(2, "big") + body[i : i + size]
        for i in range(0, len(body), size)
    )


def test_sni_is_read_from_a_real_client_hello_and_partial_data_asks_for_more() -> None:
    hello = _client_hello("Alpha.Test")
    assert proxy.sni_of(hello) == "alpha.test"
    with pytest.raises(proxy.Incomplete):
        proxy.sni_of(hello[:40])
    assert proxy.sni_of(b"GET / HTTP/1.1\r\n") is None
    # a ClientHello split over many records is read whole (a name deny is not skipped)
    split = split_records(_client_hello("beta.test"), 40)
    assert proxy.sni_of(split) == "beta.test"
    with pytest.raises(proxy.Incomplete):
        proxy.sni_of(split[:-10])


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
        b"\x16\x03\x01\x00\x30" + b"\x01" + b"\xff" * 47,
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    ],
)
def test_hostile_client_hellos_never_crash_the_reader(data: bytes) -> None:
    # read_first refuses the connection on any of these errors
    with contextlib.suppress(ValueError, IndexError, struct.error, UnicodeDecodeError):
        assert proxy.sni_of(data) in (None, "")


def test_host_header_and_header_injection() -> None:
    head = (
        b"GET /x HTTP/1.1\r\nHost: Alpha.Test:8080\r\nAuthorization: guest\r\n"
        b"Connection: keep-alive\r\n\r\nBODY"
    )
    assert proxy.host_of(head) == "alpha.test"
    out = proxy.with_headers(head, {"Authorization": "Bearer s"})
    assert b"Authorization: guest" not in out and b"Authorization: Bearer s\r\n" in out
    assert b"Connection: close" in out and out.endswith(b"\r\n\r\nBODY")
    with pytest.raises(proxy.Incomplete):
        proxy.host_of(b"GET / HTTP/1.1\r\nHost: a")
    assert proxy.host_of(b"GET / HTTP/1.0\r\n\r\n") is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: 198.18.0.3\r\nHost: beta.test\r\n\r\n",
        b"GET / HTTP/1.1\nHost: beta.test\n\n",
        b"GET / HTTP/1.1\r\nX: y\nHost: beta.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : beta.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: y\r\n Host: beta.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: beta.test extra\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: b\xc3\xa9ta.test\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 17000,
    ],
)
def test_ambiguous_heads_are_refused_never_read_as_having_no_host(head: bytes) -> None:
    with pytest.raises((ValueError, UnicodeDecodeError)) as raised:
        proxy.host_of(head)
    assert not isinstance(raised.value, proxy.Incomplete)


def test_dns_never_forwards_a_name_the_policy_does_not_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    egress = _egress(allow_internet_access=False, allow_out=["alpha.test", "198.18.0.0/24"])
    asked: list[bytes] = []
    monkeypatch.setattr(proxy, "forward", lambda cfg, query: asked.append(query) or b"answer")

    class Cfg:
        def reload(self) -> None:
            pass

        def policy(self, uid: int) -> Egress:
            return egress

    tunnel = proxy.answer(Cfg(), 7, proxy.dns_query("exfil-s3cret.attacker.invalid"))  # type: ignore[arg-type]
    allowed = proxy.answer(Cfg(), 7, proxy.dns_query("alpha.test"))  # type: ignore[arg-type]

    assert tunnel[3] & 0x0F == 3 and allowed == b"answer"
    assert [proxy.dns_question(query)[0] for query in asked] == ["alpha.test"]


def test_dns_messages_round_trip() -> None:
    query = proxy.dns_query("alpha.test")
    assert proxy.dns_question(query)[:2] == ("alpha.test", 1)
    refused = proxy.dns_reply(query, 3)
    assert refused[:2] == query[:2] and refused[3] & 0x0F == 3
    answer = (
        query[:2]
        + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
        + query[12:]
        + b"\xc0\x0c"
        + struct.pack("!HHIH", 1, 1, 60, 4)
        + socket.inet_aton("198.18.0.2")
    )
    assert proxy.dns_addresses(answer) == ["198.18.0.2"]

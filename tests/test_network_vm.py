"""Network policies on real VMs against servers this test starts (tests/netlab.py: a
network namespace with its own DNS names in 198.18.0.0/24), never internet hosts.

Names, raw addresses, CIDR allow and deny, deny over allow, everything closed, live
changes while a download on another host runs on, a forged SNI, header injection whose
secret the guest never sees, and the host's own services out of reach under every
policy. Probes run in the guest (tests/guest_probe.py) as root: what they reach, nothing
set inside the guest could widen."""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from sandboxes.models import Sandbox
from sandboxes.runtime import vm
from tests.conftest import Actor
from tests.netlab import NetLab
from tests.sdk import run_scenario

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]
PROBE = base64.b64encode((Path(__file__).parent / "guest_probe.py").read_bytes()).decode()
SECRET = "Bearer sk-test-7f3a9c0d2e"
ALPHA, BETA, GAMMA, WILD = "198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    with NetLab() as running:
        yield running


@pytest.fixture(autouse=True)
def _lab_resolves(lab: NetLab, settings: Any) -> None:
    """The platform resolves names through the lab's DNS and trusts the lab's CA for the
    real hosts behind header rules."""
    settings.EGRESS_RESOLVERS = [lab.resolver]
    settings.EGRESS_UPSTREAM_CA_FILE = str(lab.ca_path)


def _exec(sandbox_id: int, command: str, timeout: float = 120) -> dict[str, Any]:
    result: dict[str, Any] = vm.agent_client(Sandbox.objects.get(pk=sandbox_id)).exec(
        command, timeout=timeout
    )
    return result


def _create(actor: Actor, **body: object) -> int:
    response = actor.client().post("/v1/sandboxes", {"timeout": 600, **body}, format="json")
    assert response.status_code == 201, response.content
    sandbox_id = int(response.json()["sandbox"]["id"])
    assert response.json()["sandbox"]["network_policy_in_force"] is True
    assert _exec(sandbox_id, f"echo {PROBE} | base64 -d > /root/probe.py")["exit_code"] == 0
    return sandbox_id


def probe(sandbox_id: int, *checks: dict[str, Any]) -> list[dict[str, Any]]:
    result = _exec(sandbox_id, f"python3 /root/probe.py '{json.dumps(list(checks))}'")
    assert result["exit_code"] == 0, result
    return json.loads(result["stdout"])  # type: ignore[no-any-return]


def _put(actor: Actor, sandbox_id: int, policy: dict[str, Any]) -> dict[str, Any]:
    response = actor.client().put(f"/v1/sandboxes/{sandbox_id}/network", policy, format="json")
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()["sandbox"]
    assert body["network_policy_in_force"] is True
    return body


def _host_address() -> str:
    out = subprocess.run(
        ["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True
    ).stdout.split()
    return out[out.index("src") + 1] if "src" in out else "127.0.0.1"


def _host_services(edge_port: int) -> list[dict[str, Any]]:
    """Every way toward the host's own services a guest could try (all must fail)."""
    host = _host_address()
    targets = [("10.0.2.2", port) for port in (5432, 6379, edge_port, 8000, 22, 16509)]
    targets += [
        ("10.0.2.2", django_settings.EGRESS_PROXY_PORT),
        ("10.0.2.2", django_settings.EGRESS_DNS_PORT),
    ]
    targets += [(host, 5432), (host, 6379), (host, edge_port), ("198.18.0.1", 5432), ("169.254.169.254", 80)]
    targets += [("127.0.0.1", 5432), (ALPHA, 25)]
    checks = [{"kind": "connect", "host": h, "port": p, "timeout": 3} for h, p in targets]
    checks.append({"kind": "udp", "host": "10.0.2.2", "port": django_settings.EGRESS_DNS_PORT})
    checks.append({"kind": "http", "host": "169.254.169.254", "path": "/latest/meta-data/"})
    return checks


def _refused_at_once(result: dict[str, Any]) -> bool:
    return not result["ok"] and result["ms"] < 1000


def _proxy_log_tail(lines: int = 30) -> str:
    """The egress proxy's last log lines: why it refused or failed a connection."""
    from sandboxes.network import host_config

    try:
        return "\n".join((host_config().run_dir / "proxy.log").read_text().splitlines()[-lines:])
    except OSError as exc:
        return f"(no proxy log: {exc})"


def test_names_addresses_deny_wins_and_the_host_out_of_reach(
    owner: Actor, base_version, edge, vm_cleanup
) -> None:  # type: ignore[no-untyped-def]
    # given: a sandbox allowed one name and one address, nothing else
    sid = _create(owner, allow_internet_access=False, allow_out=["alpha.test", f"{GAMMA}", "*.wild.test"])

    (dns_alpha, dns_beta, dns_gamma, http_alpha, https_alpha, https_beta, raw_beta, raw_gamma,
     host_beta, forged, wild) = probe(
        sid,
        {"kind": "dns", "host": "alpha.test"},
        {"kind": "dns", "host": "beta.test"},
        {"kind": "dns", "host": "gamma.test"},
        {"kind": "http", "host": "alpha.test"},
        {"kind": "https", "host": "alpha.test", "verify": False},
        {"kind": "https", "host": "beta.test", "ip": BETA, "verify": False},
        {"kind": "connect", "host": BETA, "port": 7000},
        {"kind": "connect", "host": GAMMA, "port": 7000},
        {"kind": "http", "host": BETA, "header_host": "beta.test"},
        # a forged SNI: an allowed name sent to a forbidden address
        {"kind": "https", "host": "alpha.test", "ip": BETA, "verify": False},
        {"kind": "https", "host": "x.wild.test", "verify": False},
    )  # fmt: skip

    # then: the allowed name resolves and answers on 80 and 443, by Host and SNI
    assert dns_alpha == {"ok": True, "addresses": [ALPHA], "ms": dns_alpha["ms"]}
    assert http_alpha["ok"] and http_alpha["body"]["host"] == "alpha.test", http_alpha
    assert https_alpha["ok"] and https_alpha["body"]["sni"] == "alpha.test", https_alpha
    assert wild["ok"] and wild["body"]["local_addr"] == WILD, (wild, _proxy_log_tail())
    # other names get no DNS answer and are reset right after their ClientHello / request
    assert dns_beta["error"] == "nxdomain", dns_beta
    assert _refused_at_once(https_beta) and _refused_at_once(host_beta), (https_beta, host_beta)
    # a raw address is refused at the SYN; the allowed address answers on any port
    assert raw_beta["error"] == "refused" and raw_beta["ms"] < 1000, raw_beta
    assert raw_gamma["ok"], raw_gamma
    # a name no rule names is not resolved, even when its address is allowed: a query is
    # data leaving the sandbox, and it is never forwarded
    assert dns_gamma["error"] == "nxdomain", dns_gamma
    # the forged SNI reached the allowed name's own address, never the one the guest picked
    assert forged["ok"] and forged["body"]["local_addr"] == ALPHA, forged

    # and: nothing on the host answers, under this policy and under an open one
    for _ in range(2):
        checks = _host_services(int(edge.url.rsplit(":", 1)[1]))
        results = probe(sid, *checks)
        assert not any(result["ok"] for result in results), results
        # TCP is refused at once (UDP has no refusal to wait for), also on port 80 when the
        # policy names hosts
        slow = [
            (check, result)
            for check, result in zip(checks, results, strict=True)
            if check["kind"] != "udp" and result["ms"] >= 1000
        ]
        assert slow == []
        _put(owner, sid, {"allow_internet_access": True})
    assert probe(sid, {"kind": "connect", "host": BETA, "port": 7000})[0]["ok"]


def test_cidrs_deny_over_allow_and_everything_closed(owner: Actor, base_version, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    sid = _create(
        owner, allow_internet_access=False, allow_out=["198.18.0.0/29"], deny_out=[BETA, f"{GAMMA}:7000"]
    )

    alpha, beta, gamma_echo, gamma_http, udp_alpha, dns_beta = probe(
        sid,
        {"kind": "connect", "host": ALPHA, "port": 7000},
        {"kind": "connect", "host": BETA, "port": 7000},
        {"kind": "connect", "host": GAMMA, "port": 7000},
        {"kind": "http", "host": GAMMA},
        {"kind": "udp", "host": ALPHA, "port": 7001},
        {"kind": "dns", "host": "beta.test"},
    )
    assert alpha["ok"] and udp_alpha["ok"] and gamma_http["ok"], (alpha, udp_alpha, gamma_http)
    assert beta["error"] == "refused" and gamma_echo["error"] == "refused", (beta, gamma_echo)
    assert dns_beta["error"] == "nxdomain"  # its only address is denied

    # deny_out 0.0.0.0/0 closes the default even with internet access on; allow_out reopens one name
    _put(owner, sid, {"deny_out": ["0.0.0.0/0"], "allow_out": ["alpha.test"]})
    alpha_https, beta_raw = probe(
        sid,
        {"kind": "https", "host": "alpha.test", "verify": False},
        {"kind": "connect", "host": BETA, "port": 7000},
    )
    assert alpha_https["ok"] and beta_raw["error"] == "refused", (alpha_https, beta_raw)

    # allow_internet_access false alone: nothing at all
    _put(owner, sid, {"allow_internet_access": False})
    results = probe(
        sid,
        {"kind": "https", "host": "alpha.test", "ip": ALPHA, "verify": False},
        {"kind": "connect", "host": ALPHA, "port": 7000},
        {"kind": "udp", "host": ALPHA, "port": 7001},
        {"kind": "dns", "host": "alpha.test"},
    )
    assert not any(result["ok"] for result in results), results


def test_a_live_change_applies_within_a_second_and_open_downloads_carry_on(
    owner: Actor, base_version, vm_cleanup
) -> None:  # type: ignore[no-untyped-def]
    sid = _create(owner, allow_internet_access=True)
    size = 12 * 1024 * 1024
    # a download throttled to last ~4 s from gamma, in the background
    started = _exec(
        sid,
        'nohup python3 -c "import urllib.request,sys; '
        f"d=urllib.request.urlopen('http://gamma.test/bytes?n={size}&rate=3000000', timeout=60).read(); "
        "open('/root/got','w').write(str(len(d)))\" > /root/dl.log 2>&1 &",
    )
    assert started["exit_code"] == 0
    assert probe(sid, {"kind": "connect", "host": ALPHA, "port": 7000})[0]["ok"]

    # when: alpha is denied while the download runs
    before = time.monotonic()
    _put(owner, sid, {"deny_out": [ALPHA]})
    put_seconds = time.monotonic() - before
    (after,) = probe(sid, {"kind": "connect", "host": ALPHA, "port": 7000})

    # then: refused at once (the PUT returns with the rule in force), the download is whole
    assert put_seconds < 5 and after["error"] == "refused", (put_seconds, after)
    done = _exec(
        sid, "for i in $(seq 150); do test -s /root/got && break; sleep 0.2; done; cat /root/got /root/dl.log"
    )
    assert done["stdout"].startswith(str(size)), done

    # and back: the change the other way is as immediate
    _put(owner, sid, {"allow_internet_access": True})
    assert probe(sid, {"kind": "connect", "host": ALPHA, "port": 7000})[0]["ok"]


def test_header_rules_inject_a_secret_the_guest_never_sees(owner: Actor, base_version, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    rules = {"alpha.test": [{"transform": {"headers": {"Authorization": SECRET, "X-Team": "lab"}}}]}
    sid = _create(owner, rules=rules)

    http, https, beta = probe(
        sid,
        {"kind": "http", "host": "alpha.test"},
        {"kind": "https", "host": "alpha.test"},  # verified: the guest trusts the platform's CA
        {"kind": "https", "host": "beta.test", "verify": False},
    )

    assert http["ok"] and http["body"]["headers"]["Authorization"] == SECRET, http
    assert https["ok"] and https["body"]["headers"]["Authorization"] == SECRET, https
    assert https["body"]["headers"]["X-Team"] == "lab"
    assert beta["ok"] and "Authorization" not in beta["body"]["headers"], beta  # other hosts untouched
    # the needle is put together in a file, so that no command line of the search holds it
    needle = SECRET.split()[1]
    half = len(needle) // 2
    search = _exec(
        sid,
        f"printf '%s%s' '{needle[:half]}' '{needle[half:]}' > /run/.needle; "
        "env | grep -c -f /run/.needle; "
        "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | grep -ac -f /run/.needle; "
        "grep -rlas -f /run/.needle /etc /root /tmp /var /usr/local /opt /home 2>/dev/null | wc -l",
    )
    assert search["stdout"].split() == ["0", "0", "0"], search


def test_sdk_creates_with_a_policy_and_updates_it(owner: Actor, base_version, edge, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    output = run_scenario("network", api_url=f"{edge.url}/v1", api_key=owner.write_key)

    assert output == "ok\n"


def _split_client_hello(name: str, size: int) -> str:
    """A real ClientHello for ``name``, re-sent as TLS records of ``size`` bytes (hex)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    return "".join(
        (b"\x16\x03\x01" + len(body[i : i + size]).to_bytes(2, "big") + body[i : i + size]).hex()
        for i in range(0, len(body), size)
    )


def test_name_denies_hold_against_parser_tricks_and_the_proxy_is_bounded(
    owner: Actor, base_version, vm_cleanup
) -> None:  # type: ignore[no-untyped-def]
    sid = _create(owner, deny_out=["beta.test"], network_class="restricted")
    twice = b"GET /echo HTTP/1.1\r\nHost: 198.18.0.3\r\nHost: beta.test\r\n\r\n".hex()
    bare_lf = b"GET /echo HTTP/1.1\nHost: beta.test\n\n".hex()

    split, double_host, lf_only, plain, alpha = probe(
        sid,
        {"kind": "raw", "host": BETA, "port": 443, "chunks": [_split_client_hello("beta.test", 40)]},
        {"kind": "raw", "host": BETA, "port": 80, "chunks": [twice]},
        {"kind": "raw", "host": BETA, "port": 80, "chunks": [bare_lf]},
        {"kind": "http", "host": "beta.test"},
        {"kind": "http", "host": "alpha.test"},
    )

    assert not split["ok"] and not double_host["ok"] and not lf_only["ok"], (split, double_host, lf_only)
    assert not plain["ok"] and alpha["ok"], (plain, alpha)
    # the restricted class holds 64 connections at once, also those handed to the proxy
    (held,) = probe(sid, {"kind": "hold", "host": ALPHA, "port": 80, "count": 100})
    assert held["held"] <= 64 and held["refused"] >= 36, held
    assert probe(sid, {"kind": "http", "host": "alpha.test"})[0]["ok"]  # released again

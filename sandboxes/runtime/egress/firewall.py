"""The host firewall that enforces sandbox network policies (nftables, one table).

Every sandbox's QEMU runs as a uid of its own in the QEMU group, and with user-mode
networking every packet a guest sends leaves the host as a socket of that QEMU process.
So the host's ``output`` hook sees each sandbox's traffic under its uid, outside the
guest's reach: root in the guest can set any proxy variable or route, its packets still
become connections of that uid. The table ``inet watasu``:

* ``output`` (filter): traffic of processes outside the QEMU group (and the egress
  proxy's) is not ours; established flows pass; then the sandbox's chain ``sb_<uid>``
  through the ``sandboxes`` verdict map: its class's connection limit, what the NAT hook
  handed to the egress proxy, the platform deny set (every local address of the host, the
  operator's ranges and ports), its deny and allow rules, its default. A QEMU uid without
  a chain gets nothing: a sandbox is never open before its policy is in place.
* ``nat_output``: each sandbox's DNS goes to the egress proxy's resolver, and, when its
  policy names hosts, its TCP 80/443 to the egress proxy (``sbnat_<uid>``).
* ``proxy_out``: the egress proxy's own connections get the platform deny set too (and
  DNS to the configured resolvers only).

A policy change replaces the sandbox's two chains in one ``nft`` transaction: there is
no moment with the chain empty, and flows already established are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

from sandboxes.runtime.egress.policy import AddressRule, Egress

TABLE = "inet watasu"


class FirewallError(RuntimeError):
    pass


@dataclass(frozen=True)
class HostConfig:
    """What the host firewall and the egress proxy are configured with."""

    qemu_gid: int
    shared_uid: int  # the QEMU user itself: template builds (no sandbox of their own)
    proxy_uid: int
    proxy_port: int
    dns_port: int
    deny_nets: tuple[str, ...]
    deny_ports: tuple[int, ...]
    resolvers: tuple[str, ...]  # "a.b.c.d" or "a.b.c.d:port"
    run_dir: Path
    uid_base: int
    max_connections: dict[str, int]  # network class -> concurrent connections (0: no limit)

    @property
    def policy_dir(self) -> Path:
        return self.run_dir / "policies"

    def resolver_addresses(self) -> list[tuple[str, int]]:
        out = []
        for item in self.resolvers:
            host, _, port = item.partition(":")
            out.append((str(IPv4Address(host)), int(port or 53)))
        return out


def nft(script: str) -> None:
    """Run one nft transaction (all or nothing)."""
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise FirewallError(f"nft failed: {result.stderr.strip()[:2000]}")


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def base_script(cfg: HostConfig) -> str:
    """The table's shared part. ``add`` keeps the sandboxes' chains and map elements; the
    base chains and the deny set are flushed and refilled in the same transaction."""
    deny = sorted({str(ip_network(net, strict=False)) for net in cfg.deny_nets})
    ports = ", ".join(str(port) for port in sorted(set(cfg.deny_ports)))
    deny_ports = f"meta l4proto {{ tcp, udp }} th dport {{ {ports} }}"
    resolvers = cfg.resolver_addresses()
    lines = [
        f"add table {TABLE}",
        f"add set {TABLE} platform_deny {{ type ipv4_addr; flags interval; auto-merge; }}",
        f"flush set {TABLE} platform_deny",
        f"add map {TABLE} sandboxes {{ type uid : verdict; }}",
        f"add map {TABLE} sandboxes_nat {{ type uid : verdict; }}",
        f"add chain {TABLE} refuse",
        f"flush chain {TABLE} refuse",
        f"add rule {TABLE} refuse counter meta l4proto tcp reject with tcp reset",
        f"add rule {TABLE} refuse counter reject with icmpx type admin-prohibited",
        f"add chain {TABLE} platform",
        f"flush chain {TABLE} platform",
        f"add rule {TABLE} platform meta nfproto ipv6 goto refuse",
        f"add rule {TABLE} platform fib daddr type local goto refuse",
        f"add rule {TABLE} platform ip daddr @platform_deny goto refuse",
        f"add chain {TABLE} proxy_out",
        f"flush chain {TABLE} proxy_out",
        f"add chain {TABLE} shared",
        f"flush chain {TABLE} shared",
        f"add chain {TABLE} output {{ type filter hook output priority filter; policy accept; }}",
        f"flush chain {TABLE} output",
        f"add chain {TABLE} nat_output {{ type nat hook output priority -100; policy accept; }}",
        f"flush chain {TABLE} nat_output",
    ]
    if deny:
        lines.append(f"add element {TABLE} platform_deny {_set(deny)}")
    if ports:
        lines.append(f"add rule {TABLE} platform {deny_ports} goto refuse")
    for address, port in resolvers:
        dns = f"ip daddr {address} meta l4proto {{ tcp, udp }} th dport {port} accept"
        lines.append(f"add rule {TABLE} proxy_out {dns}")
        lines.append(f"add rule {TABLE} shared {dns}")  # template builds use the resolvers directly
    lines += [
        f"add rule {TABLE} proxy_out jump platform",
        f"add rule {TABLE} shared jump platform",
        f"add rule {TABLE} shared accept",
        f"add rule {TABLE} output meta skuid {cfg.proxy_uid} ct state new jump proxy_out",
        f"add rule {TABLE} output meta skgid != {cfg.qemu_gid} accept",
        f"add rule {TABLE} output ct state established,related accept",
        f"add rule {TABLE} output meta skuid {cfg.shared_uid} goto shared",
        f"add rule {TABLE} output meta skuid vmap @sandboxes",
        f"add rule {TABLE} output goto refuse",
        f"add rule {TABLE} nat_output meta skgid != {cfg.qemu_gid} return",
        f"add rule {TABLE} nat_output meta skuid vmap @sandboxes_nat",
    ]
    return "\n".join(lines) + "\n"


def _address_match(rule: AddressRule) -> str:
    match = f"ip daddr {rule.net}" if rule.net.prefixlen < 32 else f"ip daddr {rule.net.network_address}"
    if rule.port is not None:
        match = f"meta l4proto {{ tcp, udp }} {match} th dport {rule.port}"
    return match


def sandbox_script(cfg: HostConfig, uid: int, egress: Egress, network_class: str) -> str:
    chain, nat = f"sb_{uid}", f"sbnat_{uid}"
    lines = [
        f"add chain {TABLE} {chain}",
        f"flush chain {TABLE} {chain}",
        f"add chain {TABLE} {nat}",
        f"flush chain {TABLE} {nat}",
    ]
    limit = cfg.max_connections.get(network_class, 0)
    if limit:  # first: connections handed to the egress proxy count too
        lines.append(f"add rule {TABLE} {chain} ct state new ct count over {limit} counter goto refuse")
    lines.append(
        f"add rule {TABLE} {chain} ct status dnat ip daddr 127.0.0.1 th dport "
        f"{{ {cfg.proxy_port}, {cfg.dns_port} }} accept"
    )
    lines.append(f"add rule {TABLE} {chain} jump platform")
    if egress.by_name:
        # QUIC would carry a name past the SNI check: refused, clients fall back to TCP
        lines.append(f"add rule {TABLE} {chain} udp dport 443 counter goto refuse")
    for rule in egress.deny:
        lines.append(f"add rule {TABLE} {chain} {_address_match(rule)} counter goto refuse")
    for rule in egress.allow:
        lines.append(f"add rule {TABLE} {chain} {_address_match(rule)} accept")
    lines.append(f"add rule {TABLE} {chain} {'accept' if egress.default_allow else 'counter goto refuse'}")
    lines.append(
        f"add rule {TABLE} {nat} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{cfg.dns_port}"
    )
    if egress.by_name:
        # what the address alone refuses stays here, to be reset at its SYN by the filter
        lines.append(f"add rule {TABLE} {nat} fib daddr type local return")
        lines.append(f"add rule {TABLE} {nat} ip daddr @platform_deny return")
        for rule in egress.deny:
            if rule.port in (None, 80, 443):
                lines.append(f"add rule {TABLE} {nat} {_address_match(rule)} return")
        lines.append(f"add rule {TABLE} {nat} tcp dport {{ 80, 443 }} redirect to :{cfg.proxy_port}")
    lines += [
        f"add element {TABLE} sandboxes {{ {uid} : jump {chain} }}",
        f"add element {TABLE} sandboxes_nat {{ {uid} : jump {nat} }}",
    ]
    return "\n".join(lines) + "\n"


def write_private(path: Path, data: str, gid: int | None) -> None:
    """Atomically, 0640 root:<proxy group> (the proxy reads it, guests never can)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(data)
        if gid is not None:
            os.chown(tmp, 0, gid)
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_config(cfg: HostConfig, extra: Mapping[str, object], gid: int | None) -> None:
    cfg.policy_dir.mkdir(parents=True, exist_ok=True)
    for directory in (cfg.run_dir, cfg.policy_dir):
        if gid is not None:
            os.chown(directory, 0, gid)
        directory.chmod(0o750)
    body = {
        "proxy_port": cfg.proxy_port,
        "dns_port": cfg.dns_port,
        "deny_nets": list(cfg.deny_nets),
        "deny_ports": list(cfg.deny_ports),
        "resolvers": cfg.resolver_addresses(),
        "policy_dir": str(cfg.policy_dir),
        "uid_base": cfg.uid_base,
        **extra,
    }
    write_private(cfg.run_dir / "config.json", json.dumps(body, indent=1), gid)


def apply_sandbox(cfg: HostConfig, uid: int, egress: Egress, network_class: str, gid: int | None) -> None:
    """The proxy's copy first, then the firewall (which starts sending traffic to it)."""
    write_private(cfg.policy_dir / f"{uid}.json", json.dumps(egress.to_json()), gid)
    nft(sandbox_script(cfg, uid, egress, network_class))


def remove_sandbox(cfg: HostConfig, uid: int) -> None:
    """Its chains and map entries gone (idempotent); the uid is then refused everything."""
    script = (
        f"delete element {TABLE} sandboxes {{ {uid} }}\n"
        f"delete element {TABLE} sandboxes_nat {{ {uid} }}\n"
        f"delete chain {TABLE} sb_{uid}\n"
        f"delete chain {TABLE} sbnat_{uid}\n"
    )
    try:
        nft(script)
    except FirewallError:
        for line in script.splitlines():  # some were never there
            with contextlib.suppress(FirewallError):
                nft(line + "\n")
    (cfg.policy_dir / f"{uid}.json").unlink(missing_ok=True)


def _listed(kind: str, name: str) -> list[dict[str, Any]]:
    """One object of the table as nft's JSON items ([] when it does not exist)."""
    result = subprocess.run(
        ["nft", "-j", "list", kind, *TABLE.split(), name], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        return []
    items: list[dict[str, Any]] = json.loads(result.stdout).get("nftables", [])
    return items


def installed_uids() -> set[int]:
    """The uids the firewall holds a chain for."""
    uids = set()
    for item in _listed("map", "sandboxes"):
        for element in item.get("map", {}).get("elem", []) or []:
            key = element[0] if isinstance(element, list) else element
            if isinstance(key, int):
                uids.add(key)
    return uids


def refused_count(uid: int) -> int:
    """Connections this sandbox was refused by the firewall (since its policy was applied)."""
    total = 0
    for item in _listed("chain", f"sb_{uid}"):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += int(expr["counter"].get("packets", 0))
    return total

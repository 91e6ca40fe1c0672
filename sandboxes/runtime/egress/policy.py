"""A sandbox's network policy: parsed from what the API receives, compiled into the
decisions the host enforces. Pure Python, no Django: the egress proxy imports it too.

What a policy means (the same for every shape):

* The **platform deny set** (operator settings: private, loopback, link-local, CGNAT and
  metadata ranges, every address of the host itself, port 25) is refused first, whatever
  the policy says.
* A connection the policy names in ``deny_out`` is refused; deny wins over allow.
* A connection named in ``allow_out`` (or by a granted egress profile: the package
  registries, ...) is allowed.
* Anything else gets the default: allowed when ``allow_internet_access`` is on (the
  default) and ``deny_out`` does not hold ``0.0.0.0/0``; refused otherwise. ``0.0.0.0/0``
  in ``allow_out`` is the same as ``allow_internet_access: true``.

Entries are CIDRs or addresses (optionally ``:port``), decided on every protocol and port
by the connection's address; or host names (``*.`` wildcards, optionally ``:80``/``:443``),
decided on TCP ports 80 and 443 by the HTTP ``Host`` header or the TLS SNI, the platform
resolving an allowed name itself and connecting to that address (a forged SNI reaches the
name's address, never the one the guest picked); a name no rule names leaves the decision
to the connection's address. DNS is answered for a name the policy allows (a name rule, or
everything by default) and NXDOMAIN otherwise, without asking any resolver.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

ALL_TRAFFIC = "0.0.0.0/0"
NAME_PORTS = (80, 443)
MAX_ENTRIES = 256
MAX_RULE_HOSTS = 64
MAX_HEADERS = 32
MAX_HEADER_VALUE = 8192
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
# headers the proxy owns: injecting them would break the request's framing or routing
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
REDACTED = "[secret]"


class PolicyError(ValueError):
    """A policy the platform refuses; the message names the offending entry."""


@dataclass(frozen=True)
class AddressRule:
    net: IPv4Network
    port: int | None = None

    def matches(self, address: IPv4Address, port: int | None) -> bool:
        return address in self.net and (self.port is None or port is None or self.port == port)


@dataclass(frozen=True)
class NameRule:
    name: str  # lower case; "*.example.com" matches every name below example.com
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        return (self.port is None or self.port == port) and self.matches_any_port(host)

    def matches_any_port(self, host: str) -> bool:
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name


@dataclass(frozen=True)
class Egress:
    """The compiled decisions of one policy (what the firewall and the proxy enforce)."""

    default_allow: bool
    allow: tuple[AddressRule, ...] = ()
    deny: tuple[AddressRule, ...] = ()
    allow_names: tuple[NameRule, ...] = ()
    deny_names: tuple[NameRule, ...] = ()
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> injected headers

    @property
    def by_name(self) -> bool:
        """Whether TCP 80/443 go through the name-matching proxy (else the firewall alone)."""
        return bool(self.allow_names or self.deny_names or self.headers)

    def address_allowed(self, address: IPv4Address, port: int | None) -> bool:
        if any(rule.matches(address, port) for rule in self.deny):
            return False
        if any(rule.matches(address, port) for rule in self.allow):
            return True
        return self.default_allow

    def name_verdict(self, host: str, port: int) -> bool | None:
        """True/False when a name rule decides, None when the address must."""
        if any(rule.matches(host, port) for rule in self.deny_names):
            return False
        if any(rule.matches(host, port) for rule in self.allow_names):
            return True
        return None

    def dns_verdict(self, host: str) -> bool:
        """Whether the platform resolves ``host`` for the guest: not when a deny names it,
        else when an allow names it or everything is allowed by default. A name refused is
        never sent to a resolver (a query is data leaving the sandbox)."""
        if any(rule.matches_any_port(host) for rule in self.deny_names if rule.port is None):
            return False
        return self.default_allow or any(rule.matches_any_port(host) for rule in self.allow_names)

    def to_json(self) -> dict[str, Any]:
        return {
            "default_allow": self.default_allow,
            "allow": [[str(r.net), r.port] for r in self.allow],
            "deny": [[str(r.net), r.port] for r in self.deny],
            "allow_names": [[r.name, r.port] for r in self.allow_names],
            "deny_names": [[r.name, r.port] for r in self.deny_names],
            "headers": self.headers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Egress:
        return cls(
            default_allow=bool(data["default_allow"]),
            allow=tuple(AddressRule(IPv4Network(n), p) for n, p in data["allow"]),
            deny=tuple(AddressRule(IPv4Network(n), p) for n, p in data["deny"]),
            allow_names=tuple(NameRule(n, p) for n, p in data["allow_names"]),
            deny_names=tuple(NameRule(n, p) for n, p in data["deny_names"]),
            headers={h: dict(v) for h, v in data.get("headers", {}).items()},
        )


# ---------------------------------------------------------------------------- parsing


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PolicyError(f"{entry!r}: the port must be 1-65535.")
    return int(text)


def parse_hostname(text: str) -> str | None:
    """The lower-case name (``*.`` allowed in front), or None if it is not a host name."""
    name = text.lower().rstrip(".")
    body = name[2:] if name.startswith("*.") else name
    labels = body.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None  # "1.2.3" is a malformed address, not a name
    return name


def parse_entry(entry: Any, where: str) -> AddressRule | NameRule | None:
    """One ``allow_out``/``deny_out`` entry; None for ``0.0.0.0/0`` (handled by the caller)."""
    if not isinstance(entry, str) or not entry.strip():
        raise PolicyError(f"{where} entries must be non-empty strings.")
    text = entry.strip()
    if text == ALL_TRAFFIC:
        return None
    if text.count(":") > 1 or text.startswith("["):
        raise PolicyError(f"{where}: {text!r} is IPv6; sandboxes have no IPv6, so only IPv4 rules apply.")
    host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    port = _port(port_text, text) if port_text or text.endswith(":") else None
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        net = None
    if net is not None and str(net.network_address) != host.partition("/")[0]:
        raise PolicyError(
            f"{where}: {text!r} has bits set past its prefix; write the network ({net}) you mean."
        )
    if net is not None:
        if not isinstance(net, IPv4Network):
            raise PolicyError(f"{where}: {text!r} is IPv6; only IPv4 rules apply.")
        if net.prefixlen == 0:
            if port is None:
                return None
            raise PolicyError(f"{where}: {text!r}: all traffic to one port is not a rule; name the networks.")
        return AddressRule(net, port)
    name = parse_hostname(host)
    if name is None:
        raise PolicyError(
            f"{where}: {text!r} is neither an IPv4 address/CIDR nor a host name (e.g. 'pypi.org', "
            "'*.example.com', 'api.example.com:443', '203.0.113.0/24')."
        )
    if port is not None and port not in NAME_PORTS:
        raise PolicyError(
            f"{where}: {text!r}: host names are matched on ports 80 (HTTP Host) and 443 (TLS SNI) only; "
            f"for port {port} use the service's addresses (CIDR)."
        )
    return NameRule(name, port)


def parse_entries(value: Any, where: str) -> tuple[list[str], bool, list[AddressRule | NameRule]]:
    """(the entries as given, whether ``0.0.0.0/0`` is among them, the parsed rules)."""
    if value is None:
        return [], False, []
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list of strings.")
    if len(value) > MAX_ENTRIES:
        raise PolicyError(f"{where} may hold at most {MAX_ENTRIES} entries.")
    rules, everything, shown = [], False, []
    for entry in value:
        rule = parse_entry(entry, where)
        shown.append(entry.strip())
        if rule is None:
            everything = True
        else:
            rules.append(rule)
    return shown, everything, rules


def parse_rules(value: Any) -> dict[str, dict[str, str]]:
    """``rules``: host -> ``[{"transform": {"headers": {...}}}]`` as host -> merged headers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError("rules must be an object mapping host names to lists of rules.")
    if len(value) > MAX_RULE_HOSTS:
        raise PolicyError(f"rules may name at most {MAX_RULE_HOSTS} hosts.")
    headers: dict[str, dict[str, str]] = {}
    for host, items in value.items():
        name = parse_hostname(host) if isinstance(host, str) else None
        if name is None or name.startswith("*."):
            raise PolicyError(f"rules: {str(host)[:100]!r} must be an exact host name.")
        if not isinstance(items, list):
            raise PolicyError(f"rules.{name} must be a list of rules.")
        merged: dict[str, str] = {}
        for item in items:
            if not isinstance(item, dict) or set(item) - {"transform"}:
                raise PolicyError(f'rules.{name}: each rule is {{}} or {{"transform": {{...}}}}.')
            transform = item.get("transform") or {}
            if not isinstance(transform, dict) or set(transform) - {"headers"}:
                raise PolicyError(f"rules.{name}: a transform holds only 'headers'.")
            given = transform.get("headers") or {}
            if not isinstance(given, dict):
                raise PolicyError(f"rules.{name}: headers must be an object of strings.")
            for key, val in given.items():
                if (
                    not isinstance(key, str)
                    or not _HEADER_NAME.match(key)
                    or key.lower() in _RESERVED_HEADERS
                ):
                    raise PolicyError(
                        f"rules.{name}: {str(key)[:64]!r} is not a header that can be injected."
                    )
                if not isinstance(val, str) or len(val) > MAX_HEADER_VALUE or not _HEADER_VALUE.match(val):
                    raise PolicyError(
                        f"rules.{name}.{key}: values are at most {MAX_HEADER_VALUE} printable ASCII "
                        "characters (spaces and tabs allowed)."
                    )
                if val == REDACTED:
                    raise PolicyError(
                        f"rules.{name}.{key}: {REDACTED!r} is how a secret is shown, not a value; "
                        "send the value."
                    )
                merged[key] = val
        if len(merged) > MAX_HEADERS:
            raise PolicyError(f"rules.{name}: at most {MAX_HEADERS} headers.")
        if merged:
            headers[name] = merged
    return headers


def redact_rules(headers: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """How a policy's rules are shown: the header names, never their values."""
    return {
        host: [{"transform": {"headers": dict.fromkeys(values, REDACTED)}}]
        for host, values in headers.items()
    }


@dataclass(frozen=True)
class Policy:
    """A whole policy as stored (the shown part; the header values live encrypted apart)."""

    allow_internet_access: bool = True
    allow_package_registry_access: bool = True
    allow_public_traffic: bool = True
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    egress_profiles: tuple[str, ...] = ()
    network_class: str = "standard"
    mask_request_host: str | None = None

    def shown(self, headers: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
        return {
            "allow_internet_access": self.allow_internet_access,
            "allow_package_registry_access": self.allow_package_registry_access,
            "allow_public_traffic": self.allow_public_traffic,
            "allow_out": list(self.allow_out),
            "deny_out": list(self.deny_out),
            "egress_profiles": list(self.egress_profiles),
            "network_class": self.network_class,
            "mask_request_host": self.mask_request_host,
            "rules": redact_rules(headers or {}),
        }


def compile_policy(
    shown: dict[str, Any], headers: dict[str, dict[str, str]], profiles: dict[str, list[str]]
) -> Egress:
    """The decisions of a stored policy (``Policy.shown`` form) with its header rules."""
    _, allow_all, allow = parse_entries(shown.get("allow_out") or [], "allow_out")
    _, deny_all, deny = parse_entries(shown.get("deny_out") or [], "deny_out")
    granted = list(shown.get("egress_profiles") or [])
    if shown.get("allow_package_registry_access") and "package-registries" in profiles:
        granted.append("package-registries")
    for profile in granted:
        for entry in profiles.get(profile, []):
            rule = parse_entry(entry, f"egress profile {profile}")
            if rule is not None:
                allow.append(rule)
    internet = shown.get("allow_internet_access", True) or allow_all
    return Egress(
        default_allow=bool(internet) and not deny_all,
        allow=tuple(r for r in allow if isinstance(r, AddressRule)),
        deny=tuple(r for r in deny if isinstance(r, AddressRule)),
        allow_names=tuple(r for r in allow if isinstance(r, NameRule)),
        deny_names=tuple(r for r in deny if isinstance(r, NameRule)),
        headers=headers,
    )

"""A fake internet on this machine, for tests of the sandbox egress firewall.

`NetLab` stands in for hosts on the internet: a network namespace joined to the host by a
veth pair, with addresses in 198.18.0.0/15 (the benchmarking range, RFC 2544, never routed
on the internet) and DNS names of its own (`alpha.test`, `*.wild.test`, ...) served by a
resolver inside the lab. `tests/netlab_server.py` runs there and answers on every lab
address: HTTP (80), HTTPS (443, certificate from a test CA), a TCP echo (7000) and a UDP
echo (7001); DNS (53, UDP and TCP) on the resolver address. Tests on the host reach the lab
directly (198.18.0.0/24 is on the host's veth); a sandbox reaches it through the host, the
way it would reach the internet, so the firewall decides.

Needs root. One lab at a time: a lab's interfaces are `wnl<6 hex>h` (host) and
`wnl<6 hex>n` (lab), its namespace `wnl<6 hex>`; a leftover of a crashed run is removed
before a new lab starts.

    with NetLab() as lab:
        urllib.request.urlopen("http://198.18.0.2/echo")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.waiting import wait_until

SERVER = Path(__file__).with_name("netlab_server.py")
HOST_ADDRESS = "198.18.0.1"
ADDRESSES = tuple(f"198.18.0.{host}" for host in range(2, 10))  # the lab's hosts
RESOLVER = "198.18.0.53"
DEFAULT_NAMES = {
    "alpha.test": "198.18.0.2",
    "beta.test": "198.18.0.3",
    "gamma.test": "198.18.0.4",
    "*.wild.test": "198.18.0.5",
}
DNS_PORT, HTTP_PORT, HTTPS_PORT, TCP_ECHO_PORT, UDP_ECHO_PORT = 53, 80, 443, 7000, 7001
READY_TIMEOUT = 20.0

_LAB_NAME = re.compile(r"wnl[0-9a-f]{6}")
_OWNER = re.compile(r"netlab pid (\d+)")  # the alias of a lab's host interface


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    output = _ip("-json", *args)
    return json.loads(output) if output.strip() else []  # `ip -json netns list` prints nothing when empty


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove(namespace: str) -> None:
    """Kill what runs in the lab `namespace`, delete it and its veth pair (what exists of them)."""
    if namespace in {entry["name"] for entry in _ip_json("netns", "list")}:
        for pid in _ip("netns", "pids", namespace, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "delete", namespace, check=False)
    _ip("link", "delete", namespace + "h", check=False)  # takes the lab's end with it, wherever it is


def _remove_leftovers() -> None:
    """Remove the labs whose owner process is gone (a crashed run); a live lab stays."""
    owners = {link["ifname"]: link.get("ifalias", "") for link in _ip_json("link", "show")}
    labs = {entry["name"] for entry in _ip_json("netns", "list")} | {name[:-1] for name in owners}
    for lab in filter(_LAB_NAME.fullmatch, labs):
        owner = _OWNER.fullmatch(owners.get(lab + "h", ""))
        if owner is None or not _alive(int(owner[1])):
            _remove(lab)


class NetLab:
    """The lab, set up on `__enter__` (or `start()`), torn down on `__exit__` (or `close()`).

    `names` maps DNS names (exact, or `*.suffix`) to IPv4 addresses, usually among
    `addresses`; a name may point elsewhere (a private address, to test that the firewall
    blocks it).
    """

    host_address = HOST_ADDRESS
    addresses = ADDRESSES
    resolver = RESOLVER

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self.names = dict(DEFAULT_NAMES if names is None else names)
        self.namespace = "wnl" + secrets.token_hex(3)
        self.host_interface = self.namespace + "h"
        self.lab_interface = self.namespace + "n"
        self.workdir = Path(tempfile.mkdtemp(prefix="netlab-"))  # config, CA, server log
        self.ca_path = self.workdir / "ca.pem"
        self.ca_pem = b""  # the CA's certificate, once started
        self._server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> NetLab:
        if os.geteuid() != 0:
            raise PermissionError("NetLab needs root (network namespaces and veth interfaces)")
        if self._server is not None:
            raise RuntimeError(f"the lab {self.namespace} is already running")
        try:
            _remove_leftovers()
            holders = [
                link["ifname"]
                for link in _ip_json("-4", "address", "show")
                if any(address["local"] == HOST_ADDRESS for address in link.get("addr_info", []))
            ]
            if holders:
                raise RuntimeError(
                    f"{HOST_ADDRESS} is already assigned on this host (on {', '.join(holders)}): "
                    "another NetLab is running, or something else uses the address; one lab at a time"
                )
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def _set_up(self) -> None:
        self.workdir.mkdir(mode=0o700, exist_ok=True)  # again, when restarted after close()
        host, lab, namespace = self.host_interface, self.lab_interface, self.namespace
        _ip("link", "add", host, "type", "veth", "peer", "name", lab)
        _ip("link", "set", host, "alias", f"netlab pid {os.getpid()}")  # marks the lab live
        _ip("netns", "add", namespace)
        _ip("link", "set", lab, "netns", namespace)
        _ip("address", "add", f"{HOST_ADDRESS}/24", "dev", host)
        _ip("link", "set", host, "up")
        for address in (*ADDRESSES, RESOLVER):
            _ip("-n", namespace, "address", "add", f"{address}/24", "dev", lab)
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "set", lab, "up")
        _ip("-n", namespace, "route", "add", "default", "via", HOST_ADDRESS)

        config = self.workdir / "config.json"
        config.write_text(json.dumps({"names": self.names, "dns": RESOLVER}))
        log_path, ready = self.workdir / "server.log", self.workdir / "ready"
        with log_path.open("wb") as log:
            self._server = server = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, str(SERVER), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        with contextlib.suppress(AssertionError):  # a timeout is reported below, with the output
            wait_until(
                lambda: ready.exists() or server.poll() is not None, READY_TIMEOUT, "the netlab server"
            )
        if not ready.exists():
            state = "did not get ready in time" if server.poll() is None else f"exited ({server.returncode})"
            raise RuntimeError(f"the netlab server {state}; its output:\n{log_path.read_text()}")
        self.ca_pem = self.ca_path.read_bytes()

    def close(self) -> None:
        """Stop the server, delete the namespace and the veth pair, remove the workdir (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        _remove(self.namespace)
        shutil.rmtree(self.workdir, ignore_errors=True)

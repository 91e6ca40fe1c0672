"""Host hygiene around a real sandbox: its disk is private to QEMU's user, the guest has
no IPv6 to bypass the IPv4 firewall with, and the firewall chain is in place."""

from __future__ import annotations

import pwd
import stat
import subprocess

import pytest

from sandboxes.models import Sandbox
from sandboxes.runtime import vm
from tests.conftest import Actor

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]


def test_a_sandbox_disk_is_private_and_its_guest_has_no_ipv6(owner: Actor, base_version,
                                                             vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    # given a running sandbox
    response = owner.client().post("/v1/sandboxes", {"template": "base", "timeout": 300}, format="json")
    assert response.status_code == 201, response.content
    sandbox = Sandbox.objects.get(pk=response.json()["sandbox"]["id"])

    # then its disk is readable and writable by QEMU's user only
    disk = vm_cleanup.state_dir / f"{sandbox.vm_name}.qcow2"
    info = disk.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert pwd.getpwuid(info.st_uid).pw_name == "watasu-qemu"
    # and the guest has no IPv6 route out (QEMU user networking with ipv6=off)
    routes = vm.agent_client(sandbox).exec("ip -6 route show default; cat /proc/net/if_inet6")
    assert "default" not in routes["stdout"]
    assert all(line.split()[0].startswith("fe80") or line.split()[0] == "0" * 31 + "1"
               for line in routes["stdout"].splitlines() if line.strip())
    # and the host's guest firewall chain refuses loopback
    rules = subprocess.run(["iptables", "-w", "-S", "WATASU-GUEST"], capture_output=True, text=True,
                           check=True).stdout
    assert "-A WATASU-GUEST -o lo -j REJECT" in rules

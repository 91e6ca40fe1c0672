"""Host hygiene around a real sandbox: its disk is private to QEMU's user, the guest has
no IPv6 to bypass the IPv4 firewall with, and the host firewall (nftables) is in place."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from sandboxes.models import Sandbox
from sandboxes.runtime import vm
from tests.conftest import Actor

pytestmark = [pytest.mark.vm, pytest.mark.django_db(transaction=True)]


def _process_ids(vm_name: str) -> tuple[int, int]:
    """Real uid and gid of the domain's QEMU process."""
    pid = int(Path(f"/run/libvirt/qemu/{vm_name}.pid").read_text().strip())
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0])


def _can_open_as(uid: int, gid: int, path: Path) -> bool:
    """Whether a process with `uid`/`gid` (an escaped QEMU, say) may open `path` for reading."""
    child = os.fork()
    if child == 0:  # pragma: no cover (the child only reports through its exit code)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDONLY))
            os._exit(0)
        except PermissionError:
            os._exit(13)
        except BaseException:
            os._exit(1)
    _, code = os.waitpid(child, 0)
    assert os.WEXITSTATUS(code) in (0, 13), code
    return os.WEXITSTATUS(code) == 0


def test_a_sandbox_disk_is_private_and_its_guest_has_no_ipv6(owner: Actor, base_version, vm_cleanup) -> None:  # type: ignore[no-untyped-def]
    # given a running sandbox
    response = owner.client().post("/v1/sandboxes", {"template": "base", "timeout": 300}, format="json")
    assert response.status_code == 201, response.content
    sandbox = Sandbox.objects.get(pk=response.json()["sandbox"]["id"])

    # then its QEMU runs as a uid of its own, in the QEMU group, and its disk is that uid's only
    uid, gid = vm.qemu_uid(sandbox), pwd.getpwnam("watasu-qemu").pw_gid
    disk = vm_cleanup.state_dir / f"{sandbox.vm_name}.qcow2"
    info = disk.stat()
    assert uid is not None and uid != pwd.getpwnam("watasu-qemu").pw_uid
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, uid, gid)
    assert _process_ids(sandbox.vm_name) == (uid, gid)
    # and the guest has no IPv6 route out (QEMU user networking with ipv6=off)
    routes = vm.agent_client(sandbox).exec("ip -6 route show default; cat /proc/net/if_inet6")
    assert "default" not in routes["stdout"]
    assert all(
        line.split()[0].startswith("fe80") or line.split()[0] == "0" * 31 + "1"
        for line in routes["stdout"].splitlines()
        if line.strip()
    )
    # and the host firewall refuses every guest the host's own addresses, holds this
    # sandbox's chain, and refuses a QEMU uid without one
    platform = subprocess.run(
        ["nft", "list", "chain", "inet", "watasu", "platform"], capture_output=True, text=True, check=True
    ).stdout
    output = subprocess.run(
        ["nft", "list", "chain", "inet", "watasu", "output"], capture_output=True, text=True, check=True
    ).stdout
    chain = subprocess.run(
        ["nft", "list", "chain", "inet", "watasu", f"sb_{uid}"], capture_output=True, text=True, check=True
    ).stdout
    assert "fib daddr type local goto refuse" in platform and "@platform_deny goto refuse" in platform
    assert [line.strip() for line in output.splitlines() if line.strip() and line.strip() != "}"][-1] == (
        "goto refuse"
    )
    assert "jump platform" in chain


def test_one_sandboxs_qemu_cannot_open_anothers_disk(
    owner: Actor, outsider: Actor, base_version, vm_cleanup
) -> None:  # type: ignore[no-untyped-def]
    # given two teams' sandboxes
    ids = []
    for actor in (owner, outsider):
        response = actor.client().post("/v1/sandboxes", {"template": "base", "timeout": 300}, format="json")
        assert response.status_code == 201, response.content
        ids.append(response.json()["sandbox"]["id"])
    ours, theirs = (Sandbox.objects.get(pk=pk) for pk in ids)
    gid = pwd.getpwnam("watasu-qemu").pw_gid
    our_disk = vm_cleanup.state_dir / f"{ours.vm_name}.qcow2"
    their_disk = vm_cleanup.state_dir / f"{theirs.vm_name}.qcow2"

    # when our QEMU's identity tries to open each disk, then only ours opens
    assert _can_open_as(vm.qemu_uid(ours), gid, our_disk)
    assert not _can_open_as(vm.qemu_uid(ours), gid, their_disk)
    # and a guest running under its own uid is still kept off the host by the firewall: a
    # server on the host's loopback (the guest's 10.0.2.2) is out of its reach
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = vm.agent_client(ours).exec(
            'python3 -c "import socket; s=socket.socket(); s.settimeout(5); '
            f"print(s.connect_ex(('10.0.2.2', {port})))\""
        )
    assert probe["stdout"].strip() not in ("", "0"), probe

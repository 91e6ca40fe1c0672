"""Network policies through the public SDK: create with `allow_internet_access` and
`network=`, then `sbx.update_network(...)` and `Sandbox.update_network(id, ...)`, each
change seen from inside the guest at once. Needs the test's lab (tests/netlab.py)."""

from watasu import CommandExitException, Sandbox

BETA = "198.18.0.3"


def reaches(sbx: Sandbox, address: str) -> bool:
    script = f"import socket; socket.create_connection(('{address}', 7000), timeout=3).close()"
    try:
        sbx.commands.run(f'python3 -c "{script}"', timeout=30)
    except CommandExitException:
        return False
    return True


sbx = Sandbox.create(allow_internet_access=False, network={"allowOut": ["alpha.test"]}, timeout=300)
policy = sbx.get_info().raw["network_policy"]
assert (policy["allow_internet_access"], policy["allow_out"]) == (False, ["alpha.test"]), policy
assert not reaches(sbx, BETA)

sbx.update_network({"allow_internet_access": False, "allow_out": [f"{BETA}/32"]})
assert reaches(sbx, BETA)
assert sbx.get_info().raw["network_policy"]["allow_out"] == [f"{BETA}/32"]

Sandbox.update_network(sbx.sandbox_id, {"allow_internet_access": False})
assert not reaches(sbx, BETA)

open_sbx = Sandbox.create(allow_internet_access=True, timeout=300)
assert reaches(open_sbx, BETA)
open_sbx.kill()
sbx.kill()
print("ok")

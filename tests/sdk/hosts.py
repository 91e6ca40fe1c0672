"""Sandboxes on a deployment of several hosts, through the SDK alone (its web process
drives no VM). `create N`: N sandboxes, each running a command, their ids printed one a
line. `run ID`: a command in sandbox ID (prints its output). `unreachable ID`: the data
plane of sandbox ID answers an error naming its host. `kill ID...`: destroy them."""

import sys

from watasu import Sandbox

verb, args = sys.argv[1], sys.argv[2:]
if verb == "create":
    for _ in range(int(args[0])):
        sandbox = Sandbox.create(timeout=600)
        result = sandbox.commands.run("echo ready-$(hostname)")
        assert result.exit_code == 0 and result.stdout.startswith("ready-"), result
        print(sandbox.sandbox_id)
elif verb == "run":
    sandbox = Sandbox.connect(args[0])
    print(sandbox.commands.run("cat /etc/machine-id; echo alive").stdout.strip().splitlines()[-1])
elif verb == "unreachable":
    try:
        Sandbox.connect(args[0]).commands.run("true", timeout=30)
    except Exception as exc:  # the SDK raises its own error for the edge's 503
        assert "not answering" in str(exc) or "503" in str(exc), repr(exc)
        print("unreachable")
    else:
        raise AssertionError("a sandbox on a down host answered")
elif verb == "kill":
    for sandbox_id in args:
        Sandbox.kill(sandbox_id)

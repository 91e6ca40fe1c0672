"""The SDK side of the dashboard's browser test: a sandbox started with a key the browser
minted. `start` prints its id (the sandbox keeps running for the page to find)."""

import sys

from watasu import Sandbox

if sys.argv[1] == "start":
    sandbox = Sandbox.create(timeout=900, metadata={"via": "sdk"})
    assert sandbox.commands.run("echo ready").stdout.strip() == "ready"
    print(sandbox.sandbox_id)
else:
    raise SystemExit(f"unknown step {sys.argv[1]!r}")

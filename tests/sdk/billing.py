"""Suspension as the public SDK sees it, in stages the test runs between its own steps:
`start`, `suspended <id>`, `paused <id>`, `lifted <id>`."""

import sys

from watasu import Sandbox
from watasu.exceptions import SandboxException

stage = sys.argv[1]

if stage == "start":
    sandbox = Sandbox.create()
    sandbox.files.write("/root/kept.txt", "kept\n")
    assert sandbox.commands.run("echo hi").stdout == "hi\n"
    print(sandbox.sandbox_id)

elif stage == "suspended":  # still running, but the team is suspended: no new session
    info = Sandbox.get_info(sys.argv[2])
    assert info.state == "ready", info.state
    try:
        Sandbox.connect(sys.argv[2])
    except SandboxException as refused:
        assert "suspended" in str(refused), refused
    else:
        raise AssertionError("a suspended team connected to a sandbox")
    print("refused")

elif stage == "paused":  # paused by the sweep: create and resume refused, reads answered
    try:
        Sandbox.create()
    except SandboxException as refused:
        assert "suspended" in str(refused), refused
    else:
        raise AssertionError("a suspended team created a sandbox")
    try:
        Sandbox.connect(sys.argv[2])
    except SandboxException as refused:
        assert "suspended" in str(refused), refused
    else:
        raise AssertionError("a suspended team resumed a sandbox")
    print(Sandbox.get_info(sys.argv[2]).state)

elif stage == "lifted":  # topped up: resume keeps the file, creates work
    again = Sandbox.connect(sys.argv[2])
    assert again.files.read("/root/kept.txt") == "kept\n"
    fresh = Sandbox.create()
    assert fresh.commands.run("echo ok").stdout == "ok\n"
    fresh.kill()
    again.kill()
    print("ok")

"""The agent's fast path for ``bash -l -c <cmd>`` (what ``commands.run`` sends): the login
environment is captured once per user, input environment and profile files, and a command
sees exactly what a real login shell gives it.

The agent is the real one (the zipapp the image holds, run on the host as root): no VM needed.
Each test gives root a HOME of its own (a login shell reads ``$HOME/.profile``), whose
``.profile`` appends a line to ``$HOME/ran`` each time a login shell reads it: that is how a
test sees whether the profiles ran. The reference is ``bash -lc <cmd>``, a real login shell
that the fast path leaves alone.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.edge_support import RealAgent

SECRET = "login-agent-secret-" + "s" * 20
COUNT = 'echo x >> "$HOME/ran"\n'


@pytest.fixture(scope="module")
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Root's HOME for one test: a .profile that counts its readings and reads $WHO."""
    (tmp_path / ".profile").write_text(COUNT + 'export GREETING="hello ${WHO:-nobody}"\n')
    return tmp_path


def run(agent: RealAgent, args: list[str], cmd: str = "/bin/bash", **start: Any) -> tuple[int, str]:
    """Start a process over the WebSocket as the SDK does; (exit code, stdout + stderr)."""
    sock = websocket.create_connection(
        f"ws://127.0.0.1:{agent.port}/runtime/v1/process",
        timeout=60,
        header=[f"Authorization: Bearer {SECRET}"],
    )
    sock.send(json.dumps({"type": "start", "cmd": cmd, "args": args, "stdin": False, **start}))
    out = b""
    try:
        while True:
            frame = json.loads(sock.recv())
            assert frame["type"] != "error", frame
            if frame["type"] in ("stdout", "stderr", "pty"):
                out += base64.b64decode(frame["data"])
            if frame["type"] == "exit":
                return frame["exit_code"], out.decode()
    finally:
        sock.close()


def sdk(agent: RealAgent, cmd: str, **start: Any) -> tuple[int, str]:
    """``commands.run(cmd)``: exactly the argv the SDK sends."""
    return run(agent, ["-l", "-c", cmd], **start)


def login_shell(agent: RealAgent, cmd: str, **start: Any) -> tuple[int, str]:
    """The same command in a real login shell (an argv the fast path does not touch)."""
    return run(agent, ["-lc", cmd], **start)


def readings(home: Path) -> int:
    ran = home / "ran"
    return len(ran.read_text().splitlines()) if ran.exists() else 0


ENV_REPORT = "env -0 | sort -z | tr '\\0' '\\n'; umask; shopt -q login_shell && echo login; declare -F"


def test_the_sdk_form_reads_the_profiles_once(real_agent, home) -> None:
    # given a HOME whose profile counts its readings
    envs = {"HOME": str(home)}

    # when the SDK's form runs three times
    results = [sdk(real_agent, "echo $GREETING", envs=envs) for _ in range(3)]

    # then each saw the profile's variable, and the profile ran once (the capture)
    assert results == [(0, "hello nobody\n")] * 3
    assert readings(home) == 1


def test_a_real_login_shell_reads_the_profiles_every_time(real_agent, home) -> None:
    envs = {"HOME": str(home)}

    results = [login_shell(real_agent, "echo $GREETING", envs=envs) for _ in range(3)]

    assert results == [(0, "hello nobody\n")] * 3
    assert readings(home) == 3


def test_the_environment_equals_a_real_login_shells_for_root(real_agent, home) -> None:
    # given a profile that sets a function, a umask and a variable from the request's env
    with (home / ".profile").open("a") as f:
        f.write("greet() { echo hi; }\numask 0027\nexport SHLVL_SEEN=$SHLVL\n")
    envs = {"HOME": str(home), "WHO": "ada", "SHLVL": "4"}

    # when the same report runs through the SDK form (twice: capture, then cache) and a real login shell
    first, cached, real = (f(real_agent, ENV_REPORT, envs=envs) for f in (sdk, sdk, login_shell))

    # then all three are the same, variable for variable
    assert first == cached == real
    assert "GREETING=hello ada\n" in real[1]
    assert "SHLVL=5\n" in real[1]
    assert "\n0027\nlogin\n" in real[1]
    assert "declare -f greet\n" in real[1]
    assert readings(home) == 2  # the capture and the real login shell


def test_the_environment_equals_a_real_login_shells_for_another_user(real_agent) -> None:
    # `nobody` has no home: /etc/profile alone, run as that user
    fast = [sdk(real_agent, ENV_REPORT + "; id -un", user="nobody") for _ in range(2)]

    real = login_shell(real_agent, ENV_REPORT + "; id -un", user="nobody")

    assert fast == [real, real]
    assert real[1].endswith("nobody\n")
    assert "HOME=/nonexistent\n" in real[1]


def test_a_profile_function_is_the_commands_own_not_its_childrens(real_agent, home) -> None:
    (home / ".profile").write_text("greet() { echo hi from the profile; }\n")
    envs = {"HOME": str(home)}
    script = "greet; bash -c 'type greet' >/dev/null 2>&1 || echo child has none; echo ${BASH_ENV:-unset}"

    fast = [sdk(real_agent, script, envs=envs) for _ in range(2)]

    assert fast == [login_shell(real_agent, script, envs=envs)] * 2
    assert fast[0] == (0, "hi from the profile\nchild has none\nunset\n")


def test_an_edited_profile_is_picked_up_by_the_next_command(real_agent, home) -> None:
    envs = {"HOME": str(home)}
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "hello nobody\n")

    # when the profile changes
    (home / ".profile").write_text(COUNT + 'export GREETING="changed"\n')

    # then the next command sees it, and that capture is cached in turn
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "changed\n")
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "changed\n")
    assert readings(home) == 2


def test_a_new_file_a_login_shell_reads_is_picked_up(real_agent, home) -> None:
    envs = {"HOME": str(home)}
    assert sdk(real_agent, "echo ${FROM_BASH_PROFILE:-none}", envs=envs) == (0, "none\n")

    # ~/.bash_profile, once it exists, is read instead of ~/.profile
    (home / ".bash_profile").write_text("export FROM_BASH_PROFILE=yes\n")

    assert sdk(real_agent, "echo ${FROM_BASH_PROFILE:-none}", envs=envs) == (0, "yes\n")


def test_the_requests_environment_is_part_of_the_key(real_agent, home) -> None:
    envs = {"HOME": str(home)}

    ada = sdk(real_agent, "echo $GREETING", envs={**envs, "WHO": "ada"})
    bob = sdk(real_agent, "echo $GREETING", envs={**envs, "WHO": "bob"})
    ada_again = sdk(real_agent, "echo $GREETING", envs={**envs, "WHO": "ada"})

    assert (ada, bob, ada_again) == ((0, "hello ada\n"), (0, "hello bob\n"), (0, "hello ada\n"))
    assert readings(home) == 2


@pytest.mark.parametrize(
    "cmd,args",
    [
        ("/bin/bash", ["-l", "-c", "echo $GREETING", "name"]),  # a $0 of its own
        ("/bin/bash", ["-lc", "echo $GREETING"]),
        ("/bin/bash", ["-c", "-l", "echo $GREETING"]),
        ("/usr/bin/bash", ["-l", "-c", "echo $GREETING"]),
        ("sh", ["-l", "-c", "echo $GREETING"]),
    ],
)
def test_any_other_argv_runs_as_asked(real_agent, home, cmd, args) -> None:
    envs = {"HOME": str(home)}

    results = [run(real_agent, args, cmd=cmd, envs=envs) for _ in range(2)]

    assert results[0] == results[1]
    assert readings(home) == 2  # each one read the profile itself


def test_a_pty_keeps_the_real_login_shell(real_agent, home) -> None:
    envs = {"HOME": str(home)}

    results = [sdk(real_agent, "echo $GREETING", envs=envs, pty={"cols": 80, "rows": 24}) for _ in range(2)]

    assert results == [(0, "hello nobody\r\n")] * 2
    assert readings(home) == 2


@pytest.mark.parametrize("says", ["echo welcome", "echo welcome >&2"])
def test_a_profile_that_writes_output_keeps_the_real_login_shell(real_agent, home, says) -> None:
    # given a profile whose output is part of what a login shell prints
    (home / ".profile").write_text(COUNT + says + "\n")
    envs = {"HOME": str(home)}

    results = [sdk(real_agent, "echo done", envs=envs) for _ in range(2)]

    # then every command still prints it: the capture refused, the real shell ran each time
    assert [(code, sorted(out.splitlines())) for code, out in results] == [(0, ["done", "welcome"])] * 2
    assert readings(home) == 3  # the capture, then two real login shells


def test_a_failing_profile_fails_the_command_as_before(real_agent, home) -> None:
    (home / ".profile").write_text(COUNT + "exit 3\n")
    envs = {"HOME": str(home)}

    results = [sdk(real_agent, "echo never", envs=envs) for _ in range(2)]

    assert results == [(3, "")] * 2
    assert results[0] == login_shell(real_agent, "echo never", envs=envs)


def test_a_profile_setting_bash_env_keeps_the_real_login_shell(real_agent, home) -> None:
    (home / "env.sh").write_text("echo from-bash-env\n")
    (home / ".profile").write_text(COUNT + f"export BASH_ENV={home / 'env.sh'}\n")
    envs = {"HOME": str(home)}

    results = [sdk(real_agent, "echo done", envs=envs) for _ in range(2)]

    assert results == [login_shell(real_agent, "echo done", envs=envs)] * 2
    assert results[0] == (0, "from-bash-env\ndone\n")


def test_a_capture_that_times_out_keeps_the_real_login_shell_until_a_profile_changes(
    real_agent, home
) -> None:
    # given a profile that is slower than the capture's limit the first time it is read only
    slow_once = '[ -e "$HOME/slow-once" ] || { touch "$HOME/slow-once"; sleep 30; }\n'
    profile = COUNT + slow_once + "export GREETING=hi\n"
    (home / ".profile").write_text(profile)
    envs = {"HOME": str(home)}

    # when commands run: the capture is killed at its limit, the real login shell runs
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "hi\n")
    assert readings(home) == 2  # the timed-out capture and the real login shell

    # then the next command runs the real login shell at once (the timeout is remembered)
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "hi\n")
    assert readings(home) == 3

    # and once the profile changes, it is captured again and the fast path is back
    (home / ".profile").write_text(profile + "export OTHER=1\n")
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "hi\n")
    assert sdk(real_agent, "echo $GREETING", envs=envs) == (0, "hi\n")
    assert readings(home) == 4


def test_full_login_in_the_env_keeps_the_real_login_shell(real_agent, home) -> None:
    # given a profile setting a variable it does not export (the fast path cannot carry it)
    (home / ".profile").write_text(COUNT + "MYVAR=fromprofile\n")
    envs = {"HOME": str(home)}
    sdk(real_agent, "true", envs=envs)  # captured

    # when a command asks for the full login shell, and another does not
    full = sdk(real_agent, "echo $MYVAR", envs={**envs, "WATASU_FULL_LOGIN": "1"})
    fast = sdk(real_agent, "echo $MYVAR", envs=envs)

    # then the first read the profile and sees it, the second did not (as documented)
    assert full == (0, "fromprofile\n")
    assert fast == (0, "\n")

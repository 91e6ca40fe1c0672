"""Client scenarios run with the real `watasu` SDK in a separate process.

Our Django project package is also called `watasu`, so the SDK cannot be
imported inside the test process; each scenario runs as its own program
(the way agent builders use the SDK) against a live server, and fails with
a non-zero exit and a message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scenario_env(*, api_url: str, api_key: str, **extra: str) -> dict[str, str]:
    """The environment of a scenario: the SDK pointed at the server, none of our settings,
    and `tests/` importable for `waiting` (never the repository root, whose `watasu` is ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATASU_", "DJANGO_", "PYTHON"))}
    env.update(WATASU_API_URL=api_url, WATASU_API_KEY=api_key, PYTHONPATH=str(HERE.parent), **extra)
    if "WATASU_TEST_TIMEOUT_SCALE" in os.environ:
        env["WATASU_TEST_TIMEOUT_SCALE"] = os.environ["WATASU_TEST_TIMEOUT_SCALE"]
    return env


def run_scenario(
    name: str, *, api_url: str, api_key: str, timeout: float = 600, args: tuple[str, ...] = ()
) -> str:
    """Run tests/sdk/<name>.py (with `args`) with the SDK pointed at the server; returns its stdout."""
    env = scenario_env(api_url=api_url, api_key=api_key)
    result = subprocess.run(
        [sys.executable, "-P", str(HERE / f"{name}.py"), *args],
        cwd=HERE.parent.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"SDK scenario {name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout

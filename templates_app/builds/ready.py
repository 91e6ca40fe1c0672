"""A template's start command and ready check, run in the VM whose memory becomes the snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from django.conf import settings

from sandboxes.runtime.agent_client import AgentError
from sandboxes.runtime.buildvm import BuildVm

# While a ready check waits, the build log gets a progress line at least this often.
READY_REPORT_SECONDS = 10.0
# Where the start command's output goes in the guest (read back while the ready check
# waits; sandboxes started from the template keep appending to it).
START_LOG = "/var/log/watasu-start.log"


class ReadyLog(Protocol):
    """Where the ready check reports: a build's log, or a shape snapshot's (templates_app.shapes)."""

    def add(self, message: str, level: str = "info") -> None: ...

    def flush(self) -> None: ...


def start_and_wait_ready(
    spec: dict[str, Any], env: dict[str, str], log: ReadyLog
) -> Callable[[BuildVm], None]:
    """What runs in the template's VM before its memory is saved: the start command, in
    the background, then the ready check until it passes."""

    def prepare(vm: BuildVm) -> None:
        if spec.get("start_cmd"):
            # The agent discards a background command's output; the log keeps it for the
            # ready check's progress lines (and for the sandboxes, which keep writing it).
            vm.exec(
                ["/bin/sh", "-c", f"exec >>{START_LOG} 2>&1\n{spec['start_cmd']}"], background=True, env=env
            )
        if spec.get("ready_cmd"):
            wait_ready(vm, spec["ready_cmd"], env, log)

    return prepare


def wait_ready(vm: BuildVm, ready_cmd: str, env: dict[str, str], log: ReadyLog) -> None:
    """Run the ready check until it exits 0, within WATASU_TEMPLATE_READY_TIMEOUT_SECONDS.

    A check may itself take long (`sleep 20`), so each attempt runs in a thread while this
    one logs, at least every READY_REPORT_SECONDS, how long it has waited, the limit and the
    start command's recent output: a build stuck here says why instead of going quiet.
    """
    limit = settings.TEMPLATE_READY_TIMEOUT_SECONDS
    started = time.monotonic()
    reported = started
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ready-check") as pool:
        while (remaining := limit - (time.monotonic() - started)) > 0:
            attempt = pool.submit(vm.exec, ["/bin/sh", "-c", ready_cmd], timeout=remaining, env=env)
            while True:
                try:
                    result = attempt.result(
                        timeout=max(0.0, reported + READY_REPORT_SECONDS - time.monotonic())
                    )
                    break
                except FutureTimeout:
                    reported = time.monotonic()
                    log.add(
                        f"ready check: not ready after {reported - started:.0f} s "
                        f"(limit {limit} s); start command output: {_start_output(vm)}"
                    )
                    log.flush()
            if result.get("exit_code") == 0:
                log.add(f"ready check passed after {time.monotonic() - started:.0f} s")
                return
            time.sleep(min(0.5, max(0.0, limit - (time.monotonic() - started))))
    raise RuntimeError(
        f"ready command did not succeed within {limit} s "
        f"(WATASU_TEMPLATE_READY_TIMEOUT_SECONDS): {ready_cmd}; "
        f"start command output: {_start_output(vm)}"
    )


def _start_output(vm: BuildVm, lines: int = 5) -> str:
    """The last lines the start command wrote, on one line, or why there are none."""
    try:
        result = vm.exec(["tail", "-n", str(lines), START_LOG], timeout=10)
    except (OSError, AgentError) as exc:
        return f"(unreadable: {exc})"
    text = " | ".join(line for line in str(result.get("stdout", "")).splitlines() if line.strip())
    return text[-1000:] if text else "(none yet)"

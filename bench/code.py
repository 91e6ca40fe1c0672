"""Code-interpreter benchmark: the `code-interpreter` template against plain `base`, in one run.

    .venv/bin/python bench/code.py [--creates 3] [--runs 30] [--data-dir /tmp/watasu-bench]

On this machine, through the edge, with the real SDKs (bench/sdk_code.py):
  1. cold start: `watasu_code_interpreter.Sandbox.create()` + the first `run_code("1+1")` to its
     result, against `watasu.Sandbox.create(template="base")` + `commands.run("true")`; p50 of
     <creates> each. Target: the ratio is <= 2.
  2. round trip on one warm code sandbox: `run_code("1+1")` p50 against `commands.run("true")`
     p50 through the edge, and against the same exec straight at the agent's forwarded port.
     Target: run_code adds <= 50 ms to the agent-direct exec (added time, not the total).
The `code-interpreter` template is built first when missing (minutes under TCG; adopted from
disk afterwards). Uses PostgreSQL database `watasu_bench`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys

from common import (  # bench/ on sys.path
    percentile,
    prepare_database,
    start_uvicorn,
    use_bench_environment,
)

PORT = 18000 + secrets.randbelow(1000)
ROOT = use_bench_environment(WATASU_PUBLIC_URL=f"http://127.0.0.1:{PORT}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--data-dir", default=os.environ["WATASU_DATA_DIR"])
    args = parser.parse_args()
    os.environ["WATASU_DATA_DIR"] = args.data_dir  # e.g. a data dir where the template is built
    prepare_database(ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm
    from sandboxes.services import host_register_local
    from templates_app.models import VersionStatus
    from templates_app.provider import provider_template_ensure
    from templates_app.services import base_template_ensure

    host = host_register_local()
    base_template_ensure(host=host)
    version = provider_template_ensure("code-interpreter", host=host)
    assert version.status == VersionStatus.READY, version.last_error_message
    team = f"bench-{secrets.token_hex(3)}"
    out = io.StringIO()
    call_command("create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=out)
    key = out.getvalue().strip()
    server = start_uvicorn(ROOT, PORT, "--ws", "websockets-sansio")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WATASU_", "DJANGO_"))}
        env.update(WATASU_API_URL=f"http://127.0.0.1:{PORT}/v1", WATASU_API_KEY=key)
        sdk = subprocess.Popen(
            [sys.executable, "-P", str(ROOT / "bench" / "sdk_code.py"), str(args.creates), str(args.runs)],
            cwd="/",
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sdk.stdin is not None and sdk.stdout is not None
        sandbox_id = sdk.stdout.readline().split()[1]  # "sandbox <id>": the agent-direct part comes next
        agent = vm.agent_client(Sandbox.objects.get(pk=sandbox_id))
        sdk.stdin.write(f"http://127.0.0.1:{agent.port} {agent.secret}\n")
        sdk.stdin.flush()
        output, _ = sdk.communicate(timeout=3600)
        assert sdk.returncode == 0, output
        result = json.loads(output.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(result)


def report(result: dict[str, list[float]]) -> None:
    base, code = percentile(result["base_start"], 0.5), percentile(result["code_start"], 0.5)
    print(f"cold start, p50 of {len(result['code_start'])}:")
    print(f"  base create + commands.run('true')  {base:6.2f} s")
    print(f"  code create + first run_code('1+1') {code:6.2f} s   ratio {code / base:.2f}x (target <= 2x)")
    print(f"  of which the first run_code           {percentile(result['first_run'], 0.5) * 1000:6.0f} ms")
    run, edge, direct = (percentile(result[k], 0.5) * 1000 for k in ("run_code", "exec_edge", "exec_direct"))
    print(f"round trip, p50 of {len(result['run_code'])}:")
    print(f"  run_code('1+1') through the edge     {run:7.1f} ms")
    print(f"  commands.run('true') through the edge {edge:7.1f} ms")
    print(f"  commands.run('true') agent-direct     {direct:7.1f} ms")
    print(f"  run_code added over agent-direct exec {run - direct:7.1f} ms (target <= 50 ms added)")


if __name__ == "__main__":
    main()

"""The code interpreter on real VMs: the `code-interpreter` provider template built by the template
pipeline, and one sandbox driven through the edge by the real `watasu-code-interpreter` SDK (sync
and async, tests/sdk/code_interpreter.py), including a streamed run read with httpx.

One build and two sandboxes in all: the scenario runs every check on the sandbox it creates,
and draws random numbers in a second one to compare.
"""

from __future__ import annotations

import json
import time

import pytest

from sandboxes.models import Sandbox, SandboxState
from templates_app.models import VersionStatus
from templates_app.provider import provider_template_ensure
from tests.conftest import VM_TEST_PREFIX, Actor
from tests.sdk import run_scenario

pytestmark = [pytest.mark.vm, pytest.mark.postgres]


@pytest.mark.django_db(transaction=True)
def test_the_code_interpreter_sdk_runs_code_in_a_warm_kernel(
    edge, owner: Actor, base_version, vm_cleanup, require_postgres
) -> None:  # type: ignore[no-untyped-def]
    # given the code-interpreter provider template, built by the template pipeline (or adopted)
    started = time.monotonic()
    version = provider_template_ensure("code-interpreter")
    provider_seconds = round(time.monotonic() - started, 1)
    assert version.status == VersionStatus.READY, version.last_error_message

    # when the SDK creates a sandbox from the default template and runs the scenario in it
    output = run_scenario("code_interpreter", api_url=f"{edge.url}/v1", api_key=owner.write_key, timeout=1800)

    # then every check passed, and both sandboxes are gone
    timings = json.loads(output.strip().splitlines()[-1])
    print(json.dumps({"provider_template_s": provider_seconds, **timings}))
    sandboxes = Sandbox.objects.order_by("pk")  # the one driven, and one to compare random draws with
    gone = [("code-interpreter", SandboxState.DESTROYED)] * 2
    assert [(s.template.slug, s.state) for s in sandboxes] == gone
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []

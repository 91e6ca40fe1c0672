"""`mcp` on create on real VMs: the `mcp-gateway` provider template built by the pipeline (with
the `time` server from PyPI), a sandbox serving it through the edge to the real MCP client
(tests/sdk/mcp.py), a customer template made with the SDK's `add_mcp_server`, and a copy
from a disk-only checkpoint. CI time goes to the provider's pip install under TCG (once per
machine: the artifact is adopted from disk afterwards)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from django.conf import settings as django_settings

from sandboxes.models import Sandbox, SandboxState
from templates_app.models import VersionStatus
from templates_app.provider import provider_template_ensure
from tests.conftest import VM_TEST_PREFIX, Actor, celery_worker, helper_process_env
from tests.sdk import run_scenario

pytestmark = [pytest.mark.vm, pytest.mark.postgres]


@pytest.fixture
def build_worker(require_postgres) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    """A real Celery worker on the test database and broker (the SDK's template build)."""
    assert django_settings.REDIS_URL, "builds need the Redis broker in tests"
    with celery_worker(helper_process_env()) as worker:
        yield worker


@pytest.mark.django_db(transaction=True)
def test_mcp_servers_run_behind_the_gateway_for_the_token_only(
    edge, owner: Actor, outsider: Actor, base_version, vm_cleanup, build_worker
) -> None:  # type: ignore[no-untyped-def]
    # given the mcp-gateway provider template, built by the template pipeline
    started = time.monotonic()
    gateway = provider_template_ensure("mcp-gateway")
    provider_seconds = round(time.monotonic() - started, 1)
    assert gateway.status == VersionStatus.READY, gateway.last_error_message

    # when the SDK creates with mcp (refused without the server), builds a template with
    # a PyPI server, creates with it and talks MCP to it through the edge
    output = run_scenario(
        "mcp", api_url=f"{edge.url}/v1", api_key=owner.write_key, timeout=2400, args=(outsider.write_key,)
    )

    # then the refused create left no VM and said why; the served sandbox had the gateway
    timings = json.loads(output.strip().splitlines()[-1])
    print(json.dumps({"provider_template_s": provider_seconds, **timings}))
    assert vm_cleanup.list_domains(VM_TEST_PREFIX) == []
    refused, default = Sandbox.objects.filter(template__slug="mcp-gateway").order_by("pk")
    assert refused.state == SandboxState.FAILED and not refused.mcp_enabled
    assert "MCP server 'git' failed to start" in refused.last_error
    assert (default.mcp_enabled, default.state) == (True, SandboxState.DESTROYED)
    served = Sandbox.objects.filter(template__slug="mcp-time").order_by("pk")  # the sandbox and its copy
    assert [(s.mcp_enabled, s.state) for s in served] == [(True, SandboxState.DESTROYED)] * 2

"""`mcp` on create without a VM: what the API refuses, and which template it picks.

The gateway itself runs in tests/test_mcp_gateway.py (on the host) and tests/test_mcp_vm.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandboxes.mcp import GATEWAY_PORT, token_digest
from sandboxes.models import Sandbox, SandboxState
from templates_app.models import Template, TemplateVersion, VersionStatus
from tests.conftest import Actor
from tests.edge_support import RealAgent
from tests.factories import SandboxFactory
from tests.test_mcp_gateway import TOKEN, Gateway, _session, gateway_started
from watasu import crypto


def create(actor: Actor, body: dict[str, Any]) -> Any:
    return actor.client().post("/v1/sandboxes", body, format="json")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("mcp", "says"),
    [
        ([], "mcp must be an object of server name"),
        ({}, "mcp names no server"),
        ({"Time": {}}, "'Time' is not a server name"),
        ({"a__b": {}}, "'a__b' is not a server name"),
        ({"a--b": {}}, "'a--b' is not a server name"),
        ({"x" * 100: {}}, "'" + "x" * 40 + "...' is not a server name"),
        ({"time": "yes"}, "mcp.time must be an object"),
        ({"time": {"apiKey": "x"}}, "mcp.time: unknown key(s) apiKey"),
        ({"time": {"env": {"1X": "v"}}}, "mcp.time.env: '1X' is not a valid variable name"),
        ({"time": {"env": {"TOKEN": 5}}}, "mcp.time.env: the value of 'TOKEN' must be a string"),
        ({"time": {"command": ""}}, "mcp.time.command must be a non-empty string"),
        ({"time": {"args": "--x"}}, "mcp.time.args must be a list of strings"),
        ({f"s{i}": {} for i in range(17)}, "mcp names 17 servers; at most 16"),
        ({"time": {"env": {"BIG": "x" * 70000}}}, "mcp is larger than 64 KiB"),
    ],
)
def test_a_bad_mcp_object_is_a_422_that_says_what_is_wrong(
    owner: Actor, base_version_row: TemplateVersion, mcp: Any, says: str
) -> None:
    # given a team; when it creates with a malformed `mcp`
    response = create(owner, {"mcp": mcp})

    # then nothing is created and the message names the problem
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_mcp"
    assert says in response.json()["message"]
    assert not Sandbox.objects.exists()


@pytest.mark.django_db
def test_mcp_without_a_template_selects_mcp_gateway(owner: Actor, base_version_row: TemplateVersion) -> None:
    # given no mcp-gateway version on this installation yet
    response = create(owner, {"mcp": {"time": {}}})

    # then the create names mcp-gateway, not base, as the template being built
    assert response.status_code == 422
    assert response.json()["error"] == "template_not_ready"
    assert "Template 'mcp-gateway'" in response.json()["message"]


@pytest.mark.django_db
@pytest.mark.parametrize("slug", ["base", "code-interpreter"])
def test_mcp_on_a_platform_template_without_the_gateway_is_refused_before_any_vm(
    owner: Actor, base_version_row: TemplateVersion, local_host: Any, slug: str
) -> None:
    # given a ready platform template that has no gateway
    if slug != "base":
        template = Template.objects.create(slug=slug, name=slug)
        TemplateVersion.objects.create(
            template=template,
            version="p-1",
            status=VersionStatus.READY,
            cpu=1,
            memory_mb=512,
            host=local_host,
            artifact_dir="/nonexistent",
        )

    response = create(owner, {"template": slug, "mcp": {"time": {}}})

    # then 422 mcp_unavailable says how to get one, and no sandbox row was reserved
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "mcp_unavailable"
    assert f"Template '{slug}' has no MCP gateway" in body["message"]
    assert "from_template('mcp-gateway')" in body["message"]
    assert not Sandbox.objects.exists()


@pytest.mark.django_db
def test_the_schema_describes_mcp(owner: Actor) -> None:
    schema = owner.client().get("/v1/schema", {"format": "json"}).json()

    create_body = schema["components"]["schemas"]["SandboxCreateRequest"]["properties"]["mcp"]

    assert create_body["type"] == "object"
    assert set(create_body["additionalProperties"]["properties"]) == {"env", "command", "args"}


# --- through the edge: the real agent and the real gateway on the host ----------------------

SECRET = "real-agent-secret-" + "m" * 20


@pytest.fixture
def real_agent() -> Iterator[RealAgent]:
    with RealAgent(SECRET) as agent:
        yield agent


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """The gateway program on the MCP port of this host, where the agent's /proxy reaches it."""
    with gateway_started(tmp_path, {"echo": {}}, port=GATEWAY_PORT) as started:
        assert started.health()[0] == 0
        yield started


def _private(team: Any, agent: RealAgent, *, mcp_enabled: bool) -> Sandbox:
    return SandboxFactory(
        team=team,
        state=SandboxState.READY,
        agent_port=agent.port,
        agent_secret_encrypted=crypto.encrypt_text(SECRET),
        network_policy={"allow_public_traffic": False},
        mcp_enabled=mcp_enabled,
        mcp_token_sha256=token_digest(TOKEN) if mcp_enabled else "",
    )


@pytest.mark.django_db(transaction=True)
def test_a_private_mcp_sandbox_serves_its_gateway_to_the_token_only(
    edge: Any, real_agent: RealAgent, gateway: Gateway, owner: Actor
) -> None:
    # given a sandbox created with mcp whose previews are private
    sandbox = _private(owner.personal_team, real_agent, mcp_enabled=True)
    host = f"p{GATEWAY_PORT}-{sandbox.route_token}.sandbox.localhost:{edge.port}"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}

    # when the MCP client connects to its MCP host with the token
    names, result = asyncio.run(_session(f"{edge.url}/mcp", TOKEN, host=host))
    # and others try without it, or another port of the sandbox
    no_token = httpx.post(f"{edge.url}/mcp", json=init, headers={"Host": host})
    wrong_token = httpx.post(
        f"{edge.url}/mcp", json=init, headers={"Host": host, "Authorization": "Bearer not-it"}
    )
    other_port = httpx.get(f"{edge.url}/", headers={"Host": host.replace(f"p{GATEWAY_PORT}-", "p8000-")})

    # then the client's Authorization reached the gateway (through the edge and the agent)
    assert names == ["echo__echo"] and [c.text for c in result.content] == ["there"]
    # the edge refuses a caller without the token before the guest sees it (whatever listens
    # on the port there); the rest of the sandbox stays private
    for refused in (no_token, wrong_token):
        assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized"), refused.text
    assert (other_port.status_code, other_port.json()["error"]) == (403, "forbidden")


@pytest.mark.django_db(transaction=True)
def test_the_mcp_port_of_a_private_sandbox_without_mcp_stays_private(
    edge: Any, real_agent: RealAgent, gateway: Gateway, owner: Actor
) -> None:
    sandbox = _private(owner.personal_team, real_agent, mcp_enabled=False)
    host = f"p{GATEWAY_PORT}-{sandbox.route_token}.sandbox.localhost:{edge.port}"

    response = httpx.post(
        f"{edge.url}/mcp", json={}, headers={"Host": host, "Authorization": f"Bearer {TOKEN}"}
    )

    assert (response.status_code, response.json()["error"]) == (403, "forbidden")


@pytest.mark.django_db
def test_another_team_finds_neither_the_sandbox_nor_its_mcp_port_or_token(
    owner: Actor, outsider: Actor
) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=SandboxState.READY, mcp_enabled=True)

    port = outsider.client().get(f"/v1/sandboxes/{sandbox.pk}/ports/{GATEWAY_PORT}")
    token_url = outsider.client().post(
        f"/v1/sandboxes/{sandbox.pk}/files/download_url", {"path": "/etc/mcp-gateway/.token"}, format="json"
    )

    assert (port.status_code, token_url.status_code) == (404, 404)

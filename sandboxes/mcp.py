"""`mcp` on create: what it may say, and starting the in-guest gateway that serves it.

The `mcp` object maps a server name to how to run it::

    {"time": {}, "github": {"env": {"GITHUB_TOKEN": "..."}},
     "mine": {"command": "/opt/x", "args": ["--stdio"]}}

A name without `command` must be installed in the template (`mcp-gateway pull <server>` at
build time, which records its command); `env` is added to that server's environment only;
`command`/`args` override what `pull` recorded. The platform writes the object as
`/etc/mcp-gateway/config.json` (0600, it holds the servers' credentials), a fresh token as
`/etc/mcp-gateway/.token` (0600, what `get_mcp_token()` reads), starts `mcp-gateway serve`
detached as root and waits until every server answered `initialize`. A server that cannot
start fails the create with 422 `mcp_server_failed` and leaves no VM behind.

Nothing of `mcp` is stored on the host: the guest's disk holds it. A pause or a checkpoint
with memory keeps the running gateway; a sandbox restored from a disk-only checkpoint has
the files but no process, so the gateway is started again from them with a new token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from typing import Any

from sandboxes.models import Checkpoint, Sandbox
from sandboxes.runtime.agent_client import AgentClient
from templates_app.models import TemplateVersion
from watasu import errors

logger = logging.getLogger(__name__)

GATEWAY_PORT = 50005
GATEWAY_TEMPLATE = "mcp-gateway"
# As `mcp-gateway pull` names servers: tools come back as `<server>__<tool>`.
SERVER_NAME = re.compile(r"(?=.{1,32}$)[a-z0-9]+(?:-[a-z0-9]+)*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SERVER_KEYS = frozenset({"env", "command", "args"})
MAX_SERVERS = 16
MAX_BYTES = 64 * 1024  # travels in one environment variable (the kernel's per-string cap is 128 KiB)
# Under TCG a Python server's imports take tens of seconds; the create's own budget is 150 s.
START_WAIT_SECONDS = 90
# The program's exit status when the template has no gateway.
NO_GATEWAY = 90


class McpFailed(errors.Invalid):
    """The gateway or one of its servers did not start: the create fails with this 422."""


def _server_problem(name: Any, spec: Any) -> str | None:
    where = f"mcp.{str(name)[:40]}"
    if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
        shown = name if len(str(name)) <= 40 else f"{str(name)[:40]}..."
        return (
            f"mcp: '{shown}' is not a server name: lowercase letters, digits and single hyphens, "
            "at most 32 characters (as `mcp-gateway pull` names servers)."
        )
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return f"{where} must be an object: {{env?, command?, args?}}."
    unknown = sorted(set(spec) - SERVER_KEYS)
    if unknown:
        return (
            f"{where}: unknown key(s) {', '.join(unknown)}; a server takes env (an object of strings, "
            "where credentials go), command and args."
        )
    return _env_problem(spec.get("env"), f"{where}.env") or _command_problem(spec, where)


def _env_problem(env: Any, where: str) -> str | None:
    if env is None:
        return None
    if not isinstance(env, dict):
        return f"{where} must be an object of strings."
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            return f"{where}: '{key}' is not a valid variable name."
        if not isinstance(value, str) or "\x00" in value:
            return f"{where}: the value of '{key}' must be a string without NUL."
    return None


def _command_problem(spec: dict[str, Any], where: str) -> str | None:
    command, args = spec.get("command"), spec.get("args")
    if command is not None and (not isinstance(command, str) or not command.strip() or "\x00" in command):
        return f"{where}.command must be a non-empty string (a program in the sandbox)."
    if args is not None and (
        not isinstance(args, list) or not all(isinstance(a, str) and "\x00" not in a for a in args)
    ):
        return f"{where}.args must be a list of strings."
    return None


def mcp_problem(value: Any) -> str | None:
    """Why `value` is not an `mcp` object, or None."""
    if not isinstance(value, dict):
        return 'mcp must be an object of server name -> {env?, command?, args?}, e.g. {"time": {}}.'
    if not value:
        return "mcp names no server; leave it out, or name at least one server."
    if len(value) > MAX_SERVERS:
        return f"mcp names {len(value)} servers; at most {MAX_SERVERS}."
    for name, spec in value.items():
        if problem := _server_problem(name, spec):
            return problem
    if len(json.dumps(value)) > MAX_BYTES:
        return f"mcp is larger than {MAX_BYTES // 1024} KiB."
    return None


def mcp_config(value: dict[str, Any]) -> dict[str, Any]:
    """The gateway's config.json for a valid `mcp` object (`null` servers become `{}`)."""
    return {"servers": {name: dict(spec or {}) for name, spec in value.items()}}


def mcp_template_check(version: TemplateVersion) -> None:
    """Refuse, before any VM starts, a platform template that has no gateway (base,
    code-interpreter); a team's own template is checked in the guest."""
    template = version.template
    if template.team_id is None and template.slug != GATEWAY_TEMPLATE:
        raise _unavailable(template.slug)


def _unavailable(slug: str) -> McpFailed:
    return McpFailed(
        f"Template '{slug}' has no MCP gateway: leave template out to use '{GATEWAY_TEMPLATE}', or "
        f"build a template from '{GATEWAY_TEMPLATE}' (Template().from_template('{GATEWAY_TEMPLATE}')"
        ".add_mcp_server(...)).",
        code="mcp_unavailable",
        template=slug,
    )


# Writes the files from the environment (never a shell-quoted argument), starts the gateway
# in its own session without those variables, then waits for its health.
_START = """
set -u
[ -x /usr/local/bin/mcp-gateway ] || exit 90
umask 077
mkdir -p /etc/mcp-gateway
if [ -s /run/mcp-gateway.pid ]; then  # a gateway carried over in memory: replace it
  old=$(cat /run/mcp-gateway.pid); kill "$old" 2>/dev/null
  i=0; while kill -0 "$old" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
fi
if [ -n "${WATASU_MCP_CONFIG:-}" ]; then
  printf %s "$WATASU_MCP_CONFIG" | base64 -d > /etc/mcp-gateway/config.json.new
  mv /etc/mcp-gateway/config.json.new /etc/mcp-gateway/config.json
fi
printf %s "$WATASU_MCP_TOKEN" > /etc/mcp-gateway/.token.new
mv /etc/mcp-gateway/.token.new /etc/mcp-gateway/.token
chmod 0600 /etc/mcp-gateway/config.json /etc/mcp-gateway/.token
env -u WATASU_MCP_CONFIG -u WATASU_MCP_TOKEN setsid -f /usr/local/bin/mcp-gateway serve \\
  >/var/log/mcp-gateway.log 2>&1 </dev/null
exec /usr/local/bin/mcp-gateway health --wait {wait}
"""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mcp_gateway_start(client: AgentClient, *, slug: str, config: dict[str, Any] | None) -> tuple[float, str]:
    """Write the config (None: keep the one on disk) and a fresh token, start the gateway
    and wait until every server is ready; returns the seconds the guest took.

    McpFailed names the first server that failed and its error (and stderr tail)."""
    token = secrets.token_urlsafe(32)
    env = {"WATASU_MCP_TOKEN": token}
    if config is not None:
        env["WATASU_MCP_CONFIG"] = base64.b64encode(json.dumps(config).encode()).decode()
    done = client.exec(
        _START.replace("{wait}", str(START_WAIT_SECONDS)), env=env, timeout=START_WAIT_SECONDS + 30
    )
    if done["exit_code"] == NO_GATEWAY:
        raise _unavailable(slug)
    if done["exit_code"] != 0:
        raise _failure(done)
    return float(done["duration_ms"]) / 1000, token


def _failure(done: dict[str, Any]) -> McpFailed:
    try:
        health = json.loads(done["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        health = {"state": "unreachable", "error": (done["stderr"] or done["stdout"])[-500:]}
    servers = health.get("servers") or {}
    bad = next((n for n, s in servers.items() if s.get("state") == "failed"), None)
    bad = bad or next((n for n, s in servers.items() if s.get("state") != "ready"), None)
    if bad is None:
        message = f"The MCP gateway did not start: {health.get('error') or health.get('state')}."
        return McpFailed(message, code="mcp_server_failed", server=None)
    state = servers[bad]
    detail = state.get("error") or f"not ready within {START_WAIT_SECONDS} s"
    tail = state.get("stderr_tail", "")
    message = f"MCP server '{bad}' failed to start: {detail}"
    extra = {"stderr_tail": tail[-2000:]} if tail else {}
    return McpFailed(message, code="mcp_server_failed", server=bad, **extra)


def mcp_after_start(
    sandbox: Sandbox, client: AgentClient, *, mcp: dict[str, Any] | None, checkpoint: Checkpoint | None
) -> None:
    """The create hook: start the gateway for `mcp`; after a restore of a sandbox that had
    one, keep it (a checkpoint with memory carries the running gateway over) or start it
    again from the config on the copied disk (disk only)."""
    inherited = checkpoint is not None and checkpoint.sandbox.mcp_enabled
    if mcp is None and not inherited:
        return
    if mcp is not None or not (checkpoint is not None and checkpoint.include_memory):
        slug = sandbox.template.slug if sandbox.template is not None else GATEWAY_TEMPLATE
        took, token = mcp_gateway_start(
            client, slug=slug, config=mcp_config(mcp) if mcp is not None else None
        )
        digest = token_digest(token)
        logger.info("sandbox %s: MCP gateway ready in %.1f s", sandbox.pk, took)
    else:  # the gateway came along in memory, with its token
        assert checkpoint is not None
        digest = checkpoint.sandbox.mcp_token_sha256
    Sandbox.objects.filter(pk=sandbox.pk).update(mcp_enabled=True, mcp_token_sha256=digest)
    sandbox.mcp_enabled, sandbox.mcp_token_sha256 = True, digest


def mcp_bearer_ok(sandbox: Sandbox, bearer: str | None) -> bool:
    """Whether `bearer` is the token of this sandbox's gateway (constant time)."""
    if not (sandbox.mcp_token_sha256 and bearer):
        return False
    return hmac.compare_digest(token_digest(bearer), sandbox.mcp_token_sha256)

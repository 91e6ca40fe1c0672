"""The `mcp-gateway` provider template: `base` plus the in-guest `mcp-gateway` program.

`Sandbox.create(mcp=...)` without a template starts from it, and customers' templates that
add MCP servers start from it (`Template().from_template("mcp-gateway").add_mcp_server(...)`
runs `mcp-gateway pull <servers>` as root). It carries one server, `time` (the reference
server, no credentials, no network), so `mcp={"time": {}}` works without a template of your
own; every other server's pip or npm install is the customer template's build step, cached
there as a layer (a pull of a server already here is a no-op).
python3-venv gives each PyPI server a venv of its own; nodejs and npm come with the first
npm server (`pull` installs them with apt), so a Python-only template never carries them.
"""

from __future__ import annotations

from typing import Any

SLUG = "mcp-gateway"
NAME = "MCP gateway"
DESCRIPTION = (
    "Debian 12 with the mcp-gateway program and the `time` MCP server; more servers from PyPI or "
    "npm are added at build time with `mcp-gateway pull`, served at /mcp on port 50005 behind a "
    "per-sandbox token."
)
CPU = 1
MEMORY_MB = 512


def build_spec() -> dict[str, Any]:
    """From `base`: python3-venv and pip from apt, the gateway at /usr/local/bin/mcp-gateway, `time`."""
    from templates_app.provider import guest_file

    return {
        "from_template": "base",
        "packages": {"apt": ["python3-venv", "python3-pip"]},
        "files": [guest_file("mcp_gateway.py", "/usr/local/bin/mcp-gateway", 0o755)],
        "setup": [
            # `catalog` proves the program runs on the guest's python before anything uses it.
            "mkdir -p /etc/mcp-gateway /opt/mcp-gateway/servers && mcp-gateway catalog >/dev/null",
            "mcp-gateway pull time",
        ],
    }

"""Start the agent: ``python3 -S -u /opt/watasu/agent.pyz`` in the guest.

``WATASU_AGENT_PORT`` and ``WATASU_AGENT_TOKEN`` (the boot credential, instead of the
kernel command line's) let tests run the very same zipapp on the host.
"""

from __future__ import annotations

import os

from .core import AGENT_PORT
from .server import serve


def main() -> None:
    serve(
        port=int(os.environ.get("WATASU_AGENT_PORT", AGENT_PORT)), secret=os.environ.get("WATASU_AGENT_TOKEN")
    )


if __name__ == "__main__":
    main()

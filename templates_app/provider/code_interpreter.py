"""The `code-interpreter` provider template: `base` plus Jupyter kernels and the data libraries.

`watasu_code_interpreter.Sandbox.create()` starts from it. Everything comes from Debian 12
(python3-ipykernel, python3-jupyter-client, numpy, pandas, matplotlib): apt installs them in
minutes under TCG, where pip would build or download far more. The in-guest code server
(`guest/code_server.py`) is the start command; the ready check passes only once its default
Python kernel is started and warm (numpy, pandas, matplotlib imported, inline backend set),
so the memory snapshot holds a warm kernel and a sandbox's first `run_code` does not pay
for it. The agent forwards `/runtime/v1/code/...` to it (`agent/code.py`).
"""

from __future__ import annotations

from typing import Any

SLUG = "code-interpreter"
NAME = "Code interpreter"
DESCRIPTION = (
    "Debian 12 with a warm Python (IPython) kernel, numpy, pandas and matplotlib, and bash: "
    "the template the watasu-code-interpreter SDK starts from (/runtime/v1/code)."
)
CPU = 1
# Measured in a fresh sandbox under TCG: the warm kernel (numpy, pandas, matplotlib loaded) holds
# 135 MiB resident, the code server 39 MiB, the agent 25 MiB; the guest uses ~310 MiB in all.
# With 512 MiB a DataFrame of a few million cells would already push it out of memory, so 1 GiB.
MEMORY_MB = 1024

SERVER_PATH = "/opt/watasu/code/code_server.py"
KERNEL_STARTUP_PATH = "/opt/watasu/code/code_kernel_startup.py"  # beside the server, which finds it there
PACKAGES = [
    "python3-ipykernel",
    "python3-jupyter-client",
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    # Named so apt takes these for dependencies that have alternatives, instead of the first
    # one: fonttools' `python3-scipy | python3-munkres` would bring scipy, pythran, gcc, g++ and
    # the boost headers, and debugpy's `gdb` the full debugger. Under TCG that halves the step.
    "python3-munkres",
    "python3-unicodedata2",
    "gdb-minimal",
]
# 503 until the default kernel is warm: urlopen raises, python3 exits 1.
READY_CMD = (
    'python3 -c "import urllib.request; '
    "urllib.request.urlopen('http://127.0.0.1:49999/health', timeout=10)\""
)


def build_spec() -> dict[str, Any]:
    """From `base`: the Debian packages, the server, a font cache made at build time, start and ready."""
    from templates_app.provider import guest_file

    return {
        "from_template": "base",
        "packages": {"apt": PACKAGES},
        "files": [
            guest_file("code_server.py", SERVER_PATH, 0o644),
            guest_file("code_kernel_startup.py", KERNEL_STARTUP_PATH, 0o644),
        ],
        "setup": [
            # matplotlib's font list is built once here (a layer), not in every kernel's first import.
            "python3 -c 'import matplotlib.pyplot' && python3 -m py_compile " + SERVER_PATH,
        ],
        # started again if it dies (killed by code, or by the OOM killer): a restarted server
        # warms a new default kernel, and the agent says it is starting meanwhile
        "start_cmd": f"cd /root && while :; do python3 {SERVER_PATH}; sleep 1; done",
        "ready_cmd": READY_CMD,
    }

"""A background command's stream survives a dropped socket: the SDK reconnects with
`since=<next cursor>` and sees every line exactly once. The test restarts the server
(dropping every socket) after this program prints STARTED."""

import os
import sys

from watasu import Sandbox

sbx = Sandbox.connect(os.environ["SANDBOX_ID"])
handle = sbx.commands.run(
    "for i in $(seq 1 50); do echo line-$i; sleep 0.1; done", background=True, timeout=0
)
print("STARTED", flush=True)
received: list[str] = []
told: list[bool] = []


def streaming(chunk: str) -> None:
    """Tell the test once two lines arrived, so it drops the edge mid-stream."""
    received.append(chunk)
    if "".join(received).count("\n") >= 2 and not told:
        told.append(True)
        print("STREAMING", flush=True)


result = handle.wait(on_stdout=streaming)
lines = result.stdout.split()
if lines != [f"line-{i}" for i in range(1, 51)]:
    sys.exit(f"lost or duplicated output: {lines}")
print("ok")

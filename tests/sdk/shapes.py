"""Sandboxes in a shape other than their template's baseline. The SDK's `Sandbox.create`
has no shape parameter, so the create is the API's own request (`cpu_count`, `memory_mb`,
as the REST docs name them) and the SDK connects to the sandbox and runs the commands.
Each sandbox must have the shape's vCPUs and memory. Prints, one line each, where its kernel
was placed at boot (virtual and physical, both randomised per boot by KASLR): two sandboxes
restored from one memory snapshot share them, two boots almost never do."""

import os
import sys

import requests

from watasu import Sandbox

count = int(sys.argv[1])
for _ in range(count):
    response = requests.post(
        f"{os.environ['WATASU_API_URL']}/sandboxes",
        json={"template": "base", "cpu_count": 2, "memory_mb": 1024},
        headers={"Authorization": f"Bearer {os.environ['WATASU_API_KEY']}"},
        timeout=300,
    )
    assert response.status_code == 201, response.text
    sandbox = Sandbox.connect(str(response.json()["sandbox"]["id"]))
    info = sandbox.get_info()
    assert (info.cpu_count, info.memory_mb) == (2, 1024), info
    lines = sandbox.commands.run(
        "nproc; grep MemTotal /proc/meminfo; grep ' _text$' /proc/kallsyms; grep 'Kernel code' /proc/iomem"
    )
    nproc, memtotal, text, code = lines.stdout.splitlines()
    assert nproc == "2", lines.stdout
    memory_kib = int(memtotal.split()[1])
    assert 900 * 1024 < memory_kib <= 1024 * 1024, memtotal  # the kernel keeps a little
    print(f"{text.split()[0]}/{code.split()[0]}")
    assert sandbox.kill() is True

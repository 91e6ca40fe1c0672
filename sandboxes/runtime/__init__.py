"""The VM runtime behind one small interface.

`driver.py` is the interface (`RuntimeDriver`), `libvirt_driver.py` its implementation
(and the only module importing libvirt), `lifecycle.py` pairs it with the guest agent,
`buildvm.py` gives template builds their VMs, `images.py` builds guest images,
`guest/agent/` (shipped as one zipapp, `guest/build.py`) runs inside the VM. None of these
import Django; `vm.py` maps sandbox rows onto them. Everything that drives a VM gets its
driver from `driver_for`.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.utils.module_loading import import_string

from sandboxes.runtime.driver import RuntimeDriver, set_agent_address

if TYPE_CHECKING:
    from sandboxes.models import Host

_lock = threading.Lock()
_drivers: dict[tuple[int, str, str, str], RuntimeDriver] = {}


def driver_for(host: Host) -> RuntimeDriver:
    """One driver (for libvirt: one connection) per process and host; forked workers open their own.

    The class is `settings.RUNTIME_DRIVER`: the libvirt driver, or the fake one service
    tests use (tests/fake_driver.py).
    """
    from sandboxes import hostcalls

    if not hostcalls.runs_here(host):  # a bug: host steps reach this process only for its own hosts
        raise RuntimeError(f"host {host.name} is driven by its own worker, not by this process")
    key = (os.getpid(), settings.RUNTIME_DRIVER, host.libvirt_uri, host.data_dir)
    set_agent_address(settings.RUNTIME_HOST_ADDRESS)
    with _lock:
        if key in _drivers and not _drivers[key].connected():  # libvirtd restarted: reconnect
            _drivers.pop(key).close()
        if key not in _drivers:
            if settings.EGRESS_ENFORCE:
                # the host firewall filled in before any VM of this process starts (builds too)
                from sandboxes.network import ensure_host

                ensure_host()
            driver_class = import_string(settings.RUNTIME_DRIVER)
            _drivers[key] = driver_class(
                uri=host.libvirt_uri,
                accel=settings.RUNTIME_ACCEL,
                state_dir=Path(host.data_dir) / "sandboxes",
            )
        return _drivers[key]


@atexit.register
def _close_all() -> None:
    """Close connections before interpreter teardown (libvirt's __del__ fails late)."""
    for driver in _drivers.values():
        driver.close()
    _drivers.clear()

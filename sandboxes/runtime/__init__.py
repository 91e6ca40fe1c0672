"""The VM runtime behind one small interface.

`driver.py` is the interface, `libvirt_driver.py` its only implementation (and
the only module importing libvirt), `lifecycle.py` pairs it with the guest
agent, `images.py` builds guest images, `guest/agent/` (shipped as one zipapp,
`guest/build.py`) runs inside the VM.
None of these import Django; `vm.py` maps sandbox rows onto them.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from sandboxes.models import Host
    from sandboxes.runtime.libvirt_driver import LibvirtDriver

_lock = threading.Lock()
_drivers: dict[tuple[int, str, str], LibvirtDriver] = {}


def driver_for(host: Host) -> LibvirtDriver:
    """One libvirt connection per process and host (forked workers open their own)."""
    from sandboxes.runtime.libvirt_driver import LibvirtDriver

    key = (os.getpid(), host.libvirt_uri, host.data_dir)
    with _lock:
        if key in _drivers and not _drivers[key].conn.isAlive():  # libvirtd restarted: reconnect
            _drivers.pop(key).close_quietly()
        if key not in _drivers:
            _drivers[key] = LibvirtDriver(uri=host.libvirt_uri, accel=settings.RUNTIME_ACCEL,
                                          state_dir=Path(host.data_dir) / "sandboxes")
        return _drivers[key]


@atexit.register
def _close_all() -> None:
    """Close connections before interpreter teardown (libvirt's __del__ fails late)."""
    for driver in _drivers.values():
        driver.close()
    _drivers.clear()

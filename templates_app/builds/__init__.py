"""Template builds: the SDK's `POST /templates` turned into a version built on a worker.

- ``spec``: the build spec checked and turned into ordered steps;
- ``start``: the requests (a draft version queued for a worker) and the reads of a build;
- ``worker``: the worker claims the version and runs the steps in build VMs
  (``sandboxes.runtime.buildvm``), each step's disk becoming a cached layer;
- ``ready``: the start command and ready check run before the memory snapshot;
- ``log``: the build log; ``sweep``: builds whose worker died.

The names other apps use are importable from here.
"""

from templates_app.builds.log import BuildLog
from templates_app.builds.spec import Step, build_steps
from templates_app.builds.start import (
    build_cancel,
    build_log_entries,
    build_retry,
    template_build_get,
    template_build_start,
    template_version_create,
)
from templates_app.builds.sweep import builds_sweep
from templates_app.builds.worker import build_vm_names, planned_steps, template_build_run

__all__ = [
    "BuildLog",
    "Step",
    "build_cancel",
    "build_log_entries",
    "build_retry",
    "build_steps",
    "build_vm_names",
    "builds_sweep",
    "planned_steps",
    "template_build_get",
    "template_build_run",
    "template_build_start",
    "template_version_create",
]

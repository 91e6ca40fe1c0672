"""The Celery application shared by the web process, the worker and beat."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "watasu.settings")

app = Celery("watasu")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _create_embedded_broker_folders(sender: Celery, **_: object) -> None:
    """The file-system broker expects its folders to exist before the first message."""
    options = sender.conf.broker_transport_options or {}
    broker = [
        Path(options[key])
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder")
        if options.get(key)
    ]
    folders = [*{folder.parent for folder in broker}, *broker]
    backend = str(sender.conf.result_backend or "")
    if backend.startswith("file://"):
        folders.append(Path(backend.removeprefix("file://")))
    schedule = sender.conf.beat_schedule_filename
    if schedule:
        folders.append(Path(schedule).parent)
    for folder in folders:  # messages and results are root's alone (they name sandboxes and teams)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            folder.chmod(0o700)


@app.task(name="watasu.ping")
def ping() -> str:
    """Round trip through the broker and a worker; used by health checks and tests."""
    return "pong"

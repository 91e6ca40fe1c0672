"""Typed descriptions of what lifecycle requests ask for (built by the API layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandboxes.models import OnTimeout

DEFAULT_TIMEOUT = 300


@dataclass(frozen=True)
class Lifecycle:
    on_timeout: str = OnTimeout.KILL
    auto_resume: bool = False


@dataclass(frozen=True)
class CreateSpec:
    """What a create request asks for, validated."""

    team: str | None = None
    template: str | None = None
    template_version_id: int | None = None
    snapshot_id: str | None = None
    timeout: int = DEFAULT_TIMEOUT
    cpu_count: int | None = None
    memory_mb: int | None = None
    lifecycle: Lifecycle = Lifecycle()
    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    allow_internet_access: bool = True
    network_policy: dict[str, Any] = field(default_factory=dict)

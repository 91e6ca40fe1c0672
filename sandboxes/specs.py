"""Typed descriptions of what lifecycle requests ask for (built by the API layer)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from sandboxes.models import OnTimeout
from volumes.mounts import Mount
from watasu import errors

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
    volume_mounts: tuple[Mount, ...] = ()
    allow_internet_access: bool = True
    network_policy: dict[str, Any] = field(default_factory=dict)
    network_rules: dict[str, dict[str, str]] = field(default_factory=dict)  # header rule secrets
    mcp: dict[str, Any] | None = None  # MCP servers for the in-guest gateway (`sandboxes.mcp`)
    # The top-level keys the request had: a restore keeps the source's value of any other.
    given: frozenset[str] = frozenset()


# --- checks shared by the request serializers and the build specs (domain rules) ----------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_problem(value: Any, key: str) -> str | None:
    """Why `value` is not an env object (exportable names, string values), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"{key} must be an object of strings."
    for name, item in value.items():
        if not ENV_NAME.fullmatch(name):
            return f"{key}: '{name}' is not a valid variable name."
        if not isinstance(item, str):
            return f"{key}: the value of '{name}' must be a string."
    return None


def env_map(value: Any, key: str) -> dict[str, str]:
    """An env object (a build spec's `env`), or a 422 saying what is wrong with it."""
    problem = env_problem(value, key)
    if problem:
        raise errors.Invalid(problem, errors=[problem])
    return dict(value or {})


def cpu_problem(cpu: Any) -> str | None:
    allowed = settings.SANDBOX_ALLOWED_CPU
    if type(cpu) is not int or cpu not in allowed:
        return f"cpu_count must be one of {', '.join(map(str, allowed))}."
    return None


def memory_problem(memory: Any) -> str | None:
    low, high = settings.SANDBOX_MEMORY_MIN_MB, settings.SANDBOX_MEMORY_MAX_MB
    step = settings.SANDBOX_MEMORY_INCREMENT_MB
    if type(memory) is not int or not low <= memory <= high or memory % step:
        return f"memory_mb must be between {low} and {high} in steps of {step}."
    return None

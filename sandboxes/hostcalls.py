"""Host steps: work that touches a host's VMs or files runs in that host's own worker.

A function decorated with ``@host_step`` takes the object that names its host first (a
`Sandbox`, a `Volume`, a `Checkpoint` or a `Host`). Called for a host driven in-process
(``Host.queue`` empty: the embedded single-machine mode), or inside that host's own worker,
it simply runs. Called anywhere else, its arguments go to the host's Celery queue as JSON
(rows as their ids, re-read by the worker; paths and a few value types as themselves), the
host's worker (`manage.py host_worker`) runs it, and the caller waits for the answer on the
result backend (Redis pub/sub: no polling on the blocking path) at most
WATASU_HOST_CALL_TIMEOUT_SECONDS, then answers 503 `host_unavailable`. A step not yet
started by then is dropped by the worker (the message expires), so a late worker never
starts a VM its caller gave up on; one already running finishes, and the sweeps on that
host remove what the database does not know.

Steps and their answers are sealed (encrypted and authenticated with the deployment's
key; see ``seal``), so the broker can neither make a host's worker run a step nor read an
agent secret in an answer. A caller stops waiting early when the host's heartbeat stops.

Steps are at most once: the worker acknowledges a step when it takes it, so a worker that
dies mid-step does not run it again on restart (its caller has timed out; the stuck and
reconcile sweeps finish the job from the database's state). Errors come back as the same
domain errors (`watasu.errors`) and the few runtime ones callers tell apart; anything else
as `HostStepFailed` with its message.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from celery import shared_task
from celery.exceptions import TimeoutError as CeleryTimeout
from django.apps import apps
from django.conf import settings
from django.db import models
from django.utils import timezone

from sandboxes.models import Host, HostState
from watasu import crypto, errors

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

STEP_TASK = "watasu.host_step"
# Bumped whenever what travels changes meaning: a worker of another release refuses the step
# with a clear error instead of guessing (web and host workers upgrade together, docs/hosts.md).
PROTOCOL = 1
_steps: dict[str, Callable[..., Any]] = {}
# Hosts whose worker let a call time out in this process, and when: further blocking calls
# within WATASU_HOST_DOWN_AFTER_SECONDS fail at once instead of each waiting out the
# deadline again (a failed create's clean-up, a sweep's next sandbox). An answer clears it.
_silent: dict[int, float] = {}
_value_types: dict[str, type] = {}
_error_types: dict[str, type[BaseException]] = {}


class HostStepFailed(RuntimeError):
    """A host step failed on its host with an error its callers do not tell apart."""


def value_type(cls: type) -> type:
    """Let dataclass ``cls`` travel to and from host steps as itself."""
    _value_types[cls.__name__] = cls
    return cls


def error_type(cls: type[BaseException]) -> type[BaseException]:
    """Let exception ``cls`` (constructed from its message) come back from host steps as itself."""
    _error_types[cls.__name__] = cls
    return cls


def host_of(target: Any) -> Host | None:
    """The host a step's first argument lives on."""
    if isinstance(target, Host):
        return target
    if hasattr(target, "host_id"):  # a sandbox, a volume, a checkpoint, a pooled VM
        return cast(Host | None, target.host) if target.host_id else None
    return None


def runs_here(host: Host) -> bool:
    """Whether this process drives ``host`` itself (and so must not queue its steps)."""
    if host.queue:
        return settings.HOST_WORKER and host.name == settings.RUNTIME_HOST_NAME
    if not settings.RUNTIME_IN_PROCESS:
        raise unavailable(host, "has no worker, and this process does not drive VMs itself")
    return True


def host_step(
    fn: F | None = None, *, wait: bool = True, timeout: int | None = None, expires: int | None = None
) -> Any:
    """Run the decorated function on its first argument's host (see the module doc).

    ``wait=False``: queue it and return None at once (a sweep's part for another host,
    dropped if still queued after ``expires`` seconds; a destroy on a host that is down
    runs when its worker returns). ``timeout`` overrides WATASU_HOST_CALL_TIMEOUT_SECONDS."""

    def decorate(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        _steps[name] = func

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            host = host_of(args[0]) if args else None
            if host is None or runs_here(host):
                return func(*args, **kwargs)
            return remote(host, name, args, kwargs, wait=wait, timeout=timeout, expires=expires)

        def queue(*args: Any, **kwargs: Any) -> None:
            """Queue it for its host's worker without waiting (run it now when that is us)."""
            host = host_of(args[0]) if args else None
            if host is None or runs_here(host):
                func(*args, **kwargs)
            else:
                remote(host, name, args, kwargs, wait=False)

        call.here = func  # type: ignore[attr-defined]
        call.queue = queue  # type: ignore[attr-defined]
        return cast(F, call)

    return decorate(fn) if fn is not None else decorate


def remote(
    host: Host,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    wait: bool = True,
    timeout: int | None = None,
    expires: int | None = None,
) -> Any:
    """Queue step ``name`` for ``host``'s worker; with ``wait``, its answer (or its error)."""
    from watasu.celery import app

    seconds = timeout or settings.HOST_CALL_TIMEOUT_SECONDS
    if wait:
        _refuse_if_away(host)
    lifetime = seconds if wait else expires
    result = app.send_task(
        STEP_TASK,
        args=[host.pk, name, seal(host, name, args, kwargs, lifetime)],
        queue=host.queue,
        expires=lifetime,
        ignore_result=not wait,
    )
    if not wait:
        return None
    try:
        answer = _wait(result, host, seconds)
    finally:
        with contextlib.suppress(OSError):  # the file backend has nothing to forget yet
            result.forget()  # the answer was read once; nothing else wants it
    _silent.pop(host.pk, None)
    _refresh(args)
    if "error" in answer:
        raise decode_error(answer["error"])
    return decode(answer["value"])


# How often a blocking call looks again at whether the host still heartbeats while it waits.
WAIT_SLICE_SECONDS = 2.0


def _alive(host: Host) -> bool:
    """The host as the database says now (not as the caller's row was read): up, and its
    worker's heartbeat fresh."""
    state, seen = Host.objects.filter(pk=host.pk).values_list("state", "last_seen_at").first() or ("", None)
    fresh = timezone.now() - timedelta(seconds=settings.HOST_DOWN_AFTER_SECONDS)
    return state != HostState.DOWN and seen is not None and seen >= fresh


def _refuse_if_away(host: Host) -> None:
    """Fail at once for a host that is down, silent, or let this process's last call time out."""
    since = _silent.get(host.pk)
    if since is not None and time.monotonic() - since < settings.HOST_DOWN_AFTER_SECONDS:
        raise unavailable(host, "did not answer a moment ago")
    if not _alive(host):
        raise unavailable(host, "is down (its worker stopped answering)")


def _wait(result: Any, host: Host, seconds: float) -> dict[str, Any]:
    """The step's answer, waiting at most ``seconds``, and less once the host stops
    heartbeating (a worker that died does not make its callers wait out the deadline)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            return unseal(
                result.get(timeout=max(0.01, min(WAIT_SLICE_SECONDS, left)), disable_sync_subtasks=False)
            )
        except CeleryTimeout:
            if left <= WAIT_SLICE_SECONDS:
                _silent[host.pk] = time.monotonic()
                raise unavailable(host, f"did not answer within {seconds:.0f} s") from None
            if not _alive(host):
                _silent[host.pk] = time.monotonic()
                raise unavailable(host, "stopped answering while this call waited") from None


# --- sealing: what travels through the broker is encrypted and authenticated ------------------
# Anyone who can write the broker could otherwise make a host's worker (root) run any step,
# and anyone who can read it would see agent secrets in the answers: steps and answers are
# sealed with the deployment's encryption key (watasu/crypto.py), and a step names its host,
# its own name and the time after which it is refused (a replay is bounded by that).


def seal(
    host: Host, name: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], lifetime: float | None
) -> str:
    until = time.time() + lifetime + 60 if lifetime else None  # 60 s of clock skew between machines
    body = {"v": PROTOCOL, "host": host.pk, "step": name, "until": until}
    return crypto.encrypt_json({**body, "args": encode(list(args)), "kwargs": encode(kwargs)})


def unseal(answer: Any) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], crypto.decrypt_json(answer["sealed"]))
    except (KeyError, TypeError, ValueError):
        return {
            "error": encode_error(
                HostStepFailed("the host's answer is not sealed with this deployment's key")
            )
        }


def unavailable(host: Host, why: str) -> errors.Unavailable:
    return errors.Unavailable(f"Host {host.name} {why}; retry later.", code="host_unavailable")


def host_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says a host did not answer (nothing is known about its VM)."""
    return isinstance(exc, errors.Unavailable) and exc.code == "host_unavailable"


def _refresh(args: tuple[Any, ...]) -> None:
    """The rows the step was given, as the host's worker left them."""
    for arg in args:
        if isinstance(arg, models.Model) and arg.pk is not None:
            arg.refresh_from_db()


@shared_task(name=STEP_TASK, acks_late=False, ignore_result=False)
def run_step(host_id: int, name: str, sealed: str) -> dict[str, str]:
    """The host worker's side: run step ``name`` for its own host and report how it went
    (sealed, as the step came)."""
    return {"sealed": crypto.encrypt_json(_run(host_id, name, sealed))}


def _run(host_id: int, name: str, sealed: str) -> dict[str, Any]:
    try:
        try:
            payload = crypto.decrypt_json(sealed)
            if not isinstance(payload, dict):
                raise ValueError("not a step")
        except Exception:  # forged, damaged, or sealed with another key
            logger.error("host step %s refused: not sealed with this deployment's key", name)
            raise HostStepFailed(f"step {name} is not sealed with this deployment's key") from None
        host = Host.objects.get(pk=host_id)
        if not (settings.HOST_WORKER and host.name == settings.RUNTIME_HOST_NAME):
            raise HostStepFailed(f"step {name} for host {host.name} reached the worker of another host")
        if payload.get("v") != PROTOCOL or name not in _steps:
            raise HostStepFailed(
                f"the worker of host {host.name} cannot run step {name} (protocol {payload.get('v')}, "
                f"its own {PROTOCOL}): the host worker and its caller run different releases"
            )
        if payload.get("host") != host_id or payload.get("step") != name:
            raise HostStepFailed(f"step {name} was sealed for another host or step")
        if payload.get("until") is not None and time.time() > payload["until"]:
            raise HostStepFailed(f"step {name} came after its deadline; not run")
        value = _steps[name](*decode(payload["args"]), **decode(payload["kwargs"]))
        return {"value": encode(value)}
    except BaseException as exc:
        if not isinstance(exc, Exception):
            raise
        if not isinstance(exc, errors.DomainError):
            logger.exception("host step %s failed", name)
        return {"error": encode_error(exc)}


# --- the wire format ------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """JSON for a step's arguments and results: rows by id, paths and value types tagged."""
    if isinstance(value, models.Model):
        return {"$row": value._meta.label, "pk": value.pk}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, datetime):
        return {"$time": value.isoformat()}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value).__name__
        if _value_types.get(kind) is not type(value):
            raise TypeError(f"{kind} cannot travel to a host step (not a registered value type)")
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$value": kind, "fields": fields}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"{type(value).__name__} cannot travel to a host step")


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$row" in value:
        return apps.get_model(value["$row"]).objects.get(pk=value["pk"])
    if "$path" in value:
        return Path(value["$path"])
    if "$time" in value:
        return datetime.fromisoformat(value["$time"])
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$value" in value:
        return _value_types[value["$value"]](**{k: decode(v) for k, v in value["fields"].items()})
    return {k: decode(v) for k, v in value.items()}


def encode_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, errors.DomainError):
        extra = {k: v for k, v in exc.extra.items() if _plain(v)}
        return {"domain": type(exc).__name__, "message": exc.message, "code": exc.code, "extra": extra}
    kind = type(exc).__name__
    return {"type": kind if _error_types.get(kind) is type(exc) else "", "message": str(exc) or kind}


def decode_error(data: dict[str, Any]) -> Exception:
    if "domain" in data:
        cls = getattr(errors, data["domain"], errors.DomainError)
        return cast(Exception, cls(data["message"], code=data["code"], **data.get("extra", {})))
    cls = _error_types.get(data.get("type", ""), HostStepFailed)
    return cast(Exception, cls(data["message"]))


def _plain(value: Any) -> bool:
    try:
        encode(value)
    except TypeError:
        return False
    return not isinstance(value, models.Model)

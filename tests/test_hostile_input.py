"""Hostile input never gets a 5xx or an HTML page from the control plane.

Every route under `/v1/` is enumerated from the URL resolver (a new route is walked without
touching this file; a new path parameter must be given its real ids in `REAL_IDS`). Each is
called with every method, with ids of four kinds (the caller's own object, another team's,
a missing one, hostile strings), hostile query parameters, hostile raw bodies and a hostile
value in every known body key. Every answer must be below 500, `application/json`, and for
an error status carry `error` and `message` strings.

No VM is started: the runtime calls the lifecycle services make (`sandboxes.runtime.vm`) are
fakes that succeed without libvirt, and a template build's Celery task is never queued. Each
request runs in a savepoint that is rolled back, so every request sees the same objects.

Hypothesis runs with a fixed seed (`derandomize=True`), 200 examples, no example database.
Budget: the whole module (about 14 000 requests) takes about 40 s on a 2-core machine
(limit: 60 s); the query walk and the body-key walk are the largest parts.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from billing.models import TopUp
from sandboxes.api.requests import POLICY_KEYS, create_keys
from sandboxes.models import Checkpoint, CheckpointStatus, Host, SandboxState
from sandboxes.runtime import vm
from teams.models import ApiKey, Team
from teams.services import api_key_create
from templates_app import tasks as template_tasks
from templates_app.models import Template, TemplateTag, TemplateVersion, VersionStatus
from tests.conftest import Actor
from tests.factories import SandboxFactory
from volumes import engine
from volumes.services import volume_create

pytestmark = pytest.mark.django_db

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PARAM = re.compile(r"<(?:\w+:)?(\w+)>")
MISSING_ID = "987654321"

# Raw path segments; the test client percent-decodes them as a WSGI server would.
HOSTILE_IDS = [
    "²",
    "١٢",
    "1e400",
    "1e999",
    "NaN",
    "Infinity",
    "-1",
    "0",
    "+1",
    "%201",
    "1.0",
    "0x1f",
    "1_0",
    "9" * 20,
    "9" * 5000,
    "%00",
    "1%00",
    "%01%1f%7f",
    "..%2f",
    "..%2F..%2Fadmin",
    "%2e%2e",
    "%ff%fe",
    "%c3%28",
    "%",
    "%zz",
    "%3F%23",
    "x" * 10000,
    "%E2%80%AE",
    "null",
    "[]",
    "😀",
]
# Values of query parameters and of body keys (strings and JSON values).
HOSTILE_STRINGS = [
    "²",
    "١٢",
    "1e400",
    "NaN",
    "-1",
    "9" * 20,
    "9" * 5000,
    "",
    "a\x00b",
    "\x01\x1b[31m\x7f",
    "a\n",
    "x" * 10000,
    "%ff",
]
HOSTILE_VALUES: list[Any] = [
    *HOSTILE_STRINGS,
    "../../etc/passwd",
    "\ud800",
    -1,
    1.5,
    2**63,
    10**100,
    True,
    None,
    [],
    {},
    {"k" * 10000: "v"},
    [[[[[]]]]],
    "9999-12-31T23:59:59-14:00",
]
# Query values (NULs are refused before any view: RAW_QUERIES and the 422 test cover them).
QUERY_VALUES = ["²", "١٢", "1e400", "-1", "9" * 20, "9" * 5000, "", "\x01\x1b[31m\x7f", "x" * 10000]
QUERY_KEYS = [
    "team",
    "limit",
    "next_token",
    "offset",
    "logs_offset",
    "start",
    "end",
    "lang",
    "format",
    "query[state][]",
    "query[metadata][env]",
    "visibility",
    "status",
    "scope",
    "revoked",
    "personal",
]
RAW_QUERIES = [
    "limit=%ff%fe",
    "team=%00",
    "%",
    "a=%zz&b=%",
    "\xff\xfe=\xff",
    "&&&==&=",
    "limit=1&limit=x",
    "query%5Bmetadata%5D%5B%5D=x",
    "query[metadata][\x00]=1",
    "team=" + "%C0%AF" * 100,
    "query[metadata][" + "k" * 10000 + "]=v",
    "=".join(["x"] * 5000),
]
DEEP = 100_000
RAW_BODIES: list[tuple[bytes, str]] = [
    (b"1e400", "application/json"),
    (b'{"timeout": 1e400}', "application/json"),
    (b'{"timeout": -1e999}', "application/json"),
    (b'{"timeout": NaN}', "application/json"),
    (b'{"timeout": Infinity}', "application/json"),
    (b'{"metadata": {"k": -Infinity}}', "application/json"),
    (b"[" * DEEP, "application/json"),
    (b'{"a":' * DEEP, "application/json"),
    (b"[" * DEEP + b"]" * DEEP, "application/json"),
    (b'{"metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, "application/json"),
    (b"\xff\xfe", "application/json"),
    (b'{"name": "\xff"}', "application/json"),
    (b'{"name": "\\ud800"}', "application/json"),
    (b'{"metadata": {"k": "\\u0000"}}', "application/json"),
    (b"", "application/json"),
    (b"null", "application/json"),
    (b'"string"', "application/json"),
    (b"123", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"{", "application/json"),
    (b'{"a": 1} trailing', "application/json"),
    (b"\x00", "application/json"),
    (b'{"timeout": ' + b"9" * 5000 + b"}", "application/json"),
    (b'{"timeout": 1' + b"0" * 400 + b"}", "application/json"),
    (b'{"timeout": 1, "timeout": "x"}', "application/json"),
    (b'{"name": "a"}', "application/json; charset=utf-16"),
    (b'{"name": "a"}', "application/json; charset=no-such-charset"),
    (b'{"name": "a"}', "text/plain"),
    (b"name=a", "application/x-www-form-urlencoded"),
    (b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
    (b'{"name": "a"}', ""),
    (b"{" + b" " * (3 << 20) + b"}", "application/json"),
]

# Body keys each write route knows, and a valid body to put a hostile value into.
BUILD_SPEC_KEYS = [
    "from_template",
    "from_image",
    "from_image_registry",
    "files",
    "setup",
    "start_cmd",
    "ready_cmd",
    "env",
    "packages",
]
CREATE_KEYS = list(create_keys())  # every key the create serializer reads or knowingly ignores
NESTED_CREATE_KEYS = [
    ("lifecycle", "on_timeout"),
    ("lifecycle", "onTimeout"),
    ("lifecycle", "auto_resume"),
    ("metadata", "env"),
    ("envs", "A"),
    ("env_vars", "A"),
]


@dataclass
class WriteRoute:
    name: str
    method: str
    body: dict[str, Any]
    keys: list[tuple[str, ...]] = field(default_factory=list)


def _keys(*paths: str | tuple[str, ...]) -> list[tuple[str, ...]]:
    return [(p,) if isinstance(p, str) else p for p in paths]


VERSION_BODY = {"sandbox_template_version": {"version": "v9", "build_spec": {"setup": ["true"]}}}
WRITE_ROUTES = [
    WriteRoute("sandbox-list", "POST", {"template": "base"}, _keys(*CREATE_KEYS, *NESTED_CREATE_KEYS)),
    WriteRoute("sandbox-detail", "DELETE", {}),
    WriteRoute("sandbox-pause", "POST", {}),
    WriteRoute("sandbox-stop", "POST", {}),
    WriteRoute("sandbox-resume", "POST", {"timeout": 60}, _keys("timeout")),
    WriteRoute("sandbox-connect", "POST", {"timeout": 60}, _keys("timeout")),
    WriteRoute("sandbox-timeout", "POST", {"timeout": 60}, _keys("timeout")),
    WriteRoute(
        "sandbox-network",
        "PUT",
        {"allow_internet_access": False, "allow_out": ["alpha.test"]},
        _keys(*POLICY_KEYS, ("rules", "api.example.com")),
    ),
    WriteRoute(
        "sandbox-upload-url",
        "POST",
        {"path": "/tmp/a"},
        _keys("path", "user", "use_signature_expiration", "expires_in_seconds"),
    ),
    WriteRoute(
        "sandbox-download-url",
        "POST",
        {"path": "/tmp/a"},
        _keys("path", "user", "use_signature_expiration", "expires_in_seconds"),
    ),
    WriteRoute(
        "sandbox-template-list",
        "POST",
        {"sandbox_template": {"team": "acme", "slug": "new-lab"}},
        _keys(
            "sandbox_template",
            "team",
            *[("sandbox_template", k) for k in ("team", "slug", "name", "description", "metadata")],
            ("sandbox_template", "metadata", "k"),
        ),
    ),
    WriteRoute(
        "sandbox-template-versions",
        "POST",
        VERSION_BODY,
        _keys(
            "sandbox_template_version",
            *[
                ("sandbox_template_version", k)
                for k in (
                    "version",
                    "source_kind",
                    "architecture",
                    "runtime_baseline",
                    "build_spec",
                    "skip_cache",
                )
            ],
            ("sandbox_template_version", "runtime_baseline", "cpu"),
            ("sandbox_template_version", "runtime_baseline", "memory_mb"),
            *[("sandbox_template_version", "build_spec", k) for k in BUILD_SPEC_KEYS],
        ),
    ),
    WriteRoute("sandbox-template-version", "DELETE", {}),
    WriteRoute(
        "template-build",
        "POST",
        {"name": "built:v1", "team": "acme", "build_spec": {}},
        _keys(
            "name",
            "cpu_count",
            "memory_mb",
            "tags",
            "build_spec",
            "team",
            "skip_cache",
            *[("build_spec", k) for k in BUILD_SPEC_KEYS],
            ("build_spec", "files", 0, "path"),
            ("build_spec", "packages", "apt"),
        ),
    ),
    WriteRoute("template-tags", "POST", {"target": "lab:v1", "tags": ["edge"]}, _keys("target", "tags")),
    WriteRoute("template-tags", "DELETE", {"name": "lab", "tags": ["stable"]}, _keys("name", "tags")),
    WriteRoute("volume-list", "POST", {"name": "new-vol"}, _keys("name", "team", "metadata")),
    WriteRoute("volume-detail", "DELETE", {}),
    WriteRoute(
        "volume-path", "PATCH", {"path": "/f.txt", "mode": "0644"}, _keys("path", "uid", "gid", "mode")
    ),
    WriteRoute("volume-path", "DELETE", {}),
    WriteRoute(
        "volume-directories",
        "POST",
        {"path": "/d", "force": True},
        _keys("path", "uid", "gid", "mode", "force"),
    ),
    WriteRoute(
        "volume-files",
        "PUT",
        {"path": "/f.txt", "content_b64": "aGk="},
        _keys("path", "content_b64", "content", "uid", "gid", "mode", "force"),
    ),
    WriteRoute(
        "sandbox-snapshots",
        "POST",
        {"name": "n", "quiesce_mode": "crash"},
        _keys("name", "metadata", "expires_at", "quiesce_mode"),
    ),
    WriteRoute(
        "sandbox-checkpoints",
        "POST",
        {"sandbox_checkpoint": {"name": "n", "quiesce_mode": "crash"}},
        _keys(("sandbox_checkpoint", "name"), ("sandbox_checkpoint", "expires_at"), "sandbox_checkpoint"),
    ),
    WriteRoute("sandbox-snapshot-detail", "DELETE", {}),
    WriteRoute("sandbox-checkpoint-detail", "DELETE", {}),
    WriteRoute("snapshot-detail", "DELETE", {}),
    WriteRoute(
        "sandbox-restore",
        "POST",
        {"checkpoint_id": 1, "timeout_seconds": 60},
        _keys("checkpoint_id", "snapshot_id", "timeout_seconds", "timeout"),
    ),
    WriteRoute("team-list", "POST", {"slug": "new-team", "name": "New"}, _keys("slug", "name")),
    WriteRoute("api-key-list", "POST", {"name": "ci", "scope": "read"}, _keys("name", "scope", "expires_at")),
    WriteRoute("api-key-detail", "DELETE", {}),
    WriteRoute("billing-top-ups", "POST", {"amount": "10.00"}, _keys("amount", "team")),
    WriteRoute("billing-spend-alert", "PUT", {"spend_alert": "5.00"}, _keys("spend_alert", "team")),
    WriteRoute("billing-stripe-webhook", "POST", {}),
]


def _api_routes() -> dict[str, tuple[str, list[str]]]:
    """name -> (route template, methods its view answers) of every route under /v1/."""
    routes: dict[str, tuple[str, list[str]]] = {}

    def walk(patterns: list[Any], prefix: str) -> None:
        for entry in patterns:
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, prefix + str(entry.pattern))
            elif isinstance(entry, URLPattern) and prefix.startswith("/v1/"):
                view = entry.callback.view_class  # type: ignore[attr-defined]
                methods = [m for m in METHODS if m != "OPTIONS" and hasattr(view, m.lower())]
                routes[entry.name] = (prefix + str(entry.pattern), methods)

    walk(get_resolver().url_patterns, "/")
    return routes


ROUTES = _api_routes()
# The answers that are not JSON by design: the OpenAPI document itself (YAML by default)
# and its Swagger UI page.
SCHEMA_PATH = ROUTES["schema"][0]
SCHEMA_CONTENT_TYPE = "application/vnd.oai.openapi; charset=utf-8"
DOCS_PATH = ROUTES["docs"][0]
DOCUMENTS = {(SCHEMA_PATH, SCHEMA_CONTENT_TYPE), (DOCS_PATH, "text/html; charset=utf-8")}


@dataclass
class World:
    owner: Actor
    client: APIClient
    ids: dict[str, dict[str, str]]  # parameter -> {"own", "other", "missing"} -> value
    failures: list[str] = field(default_factory=list)
    count: int = 0

    def path(self, name: str, kind: str = "own", **override: str) -> str:
        return PARAM.sub(lambda m: override.get(m[1], self.ids[m[1]][kind]), ROUTES[name][0])

    def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        query: str = "",
        **extra: Any,
    ) -> Any:
        """One request (a mutation in a rolled-back savepoint); a broken contract is recorded."""
        if method in ("GET", "OPTIONS"):
            response = self.client.generic(
                method, path, body, content_type=content_type, QUERY_STRING=query, **extra
            )
        else:
            with transaction.atomic():
                response = self.client.generic(
                    method, path, body, content_type=content_type, QUERY_STRING=query, **extra
                )
                transaction.set_rollback(True)
        self.count += 1
        problem = contract_problem(method, path, response)
        if problem:
            self.failures.append(f"{problem} <- {method} {path[:100]!r} ?{query[:60]!r} {body[:80]!r}")
        return response

    def call_json(self, method: str, path: str, body: Any) -> Any:
        return self.call(method, path, json.dumps(body).encode())

    def assert_clean(self) -> None:
        """One example of each distinct problem, so that a report shows every bug at once."""
        distinct: dict[str, str] = {}
        for failure in self.failures:
            distinct.setdefault(re.sub(r"\d+", "N", failure.partition(" <- ")[0])[:100], failure)
        report = "\n".join(distinct.values())
        assert not distinct, f"{len(self.failures)} of {self.count} requests failed:\n{report}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def contract_problem(method: str, path: str, response: Any) -> str | None:
    """Why the response breaks the contract, or None."""
    status = response.status_code
    if status >= 500:
        cause = getattr(response, "exc_info", None)
        return f"{status} {cause[1]!r}"[:300] if cause else f"{status} {response.content[:200]!r}"
    if status == 204 or method == "HEAD":
        return None if response.content == b"" else f"{status} with a body"
    content_type = response.get("Content-Type", "")
    if (method, status) == ("GET", 200) and (path, content_type) in DOCUMENTS:
        return None
    if content_type != "application/json":
        return f"{status} {content_type!r} {response.content[:80]!r}"
    try:
        body = json.loads(response.content, parse_constant=_reject_constant)
    except ValueError as exc:
        return f"{status} invalid JSON: {exc}"
    if status >= 400 and not (
        isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
    ):
        return f"{status} not the error shape: {response.content[:120]!r}"
    return None


@pytest.fixture
def world(
    owner: Actor,
    outsider: Actor,
    acme: Team,
    base_version_row: TemplateVersion,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[World]:
    # given: runtime calls that succeed without a VM, and builds that are never queued
    monkeypatch.setattr(vm, "start", lambda sandbox, version, **kwargs: vm.Started(1, "fake"))
    monkeypatch.setattr(vm, "pause", lambda sandbox, **kwargs: None)
    monkeypatch.setattr(vm, "resume", lambda sandbox: None)
    monkeypatch.setattr(vm, "destroy", lambda sandbox: True)
    monkeypatch.setattr(vm, "forget", lambda sandbox: None)
    monkeypatch.setattr(vm, "metrics", lambda sandbox: None)

    def fake_checkpoint(sandbox, checkpoint):  # type: ignore[no-untyped-def]
        checkpoint.path.parent.mkdir(parents=True, exist_ok=True)  # as vm.checkpoint does on its host
        return checkpoint.path.write_bytes(b"disk")

    monkeypatch.setattr(vm, "checkpoint", fake_checkpoint)
    monkeypatch.setattr(template_tasks, "template_build_task", SimpleNamespace(delay=lambda pk: None))
    # given: one object of each kind in the caller's team and in another team
    host = base_version_row.host
    lab = Template.objects.create(team=acme, slug="lab", name="Lab")
    lab_v1 = TemplateVersion.objects.create(
        template=lab,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=host,
        artifact_dir="/nonexistent",
    )
    TemplateTag.objects.create(template=lab, tag="stable", version=lab_v1)
    theirs_team = outsider.personal_team
    theirs = Template.objects.create(team=theirs_team, slug="theirs", name="Theirs")
    theirs_v1 = TemplateVersion.objects.create(
        template=theirs,
        version="v1",
        status=VersionStatus.READY,
        cpu=1,
        memory_mb=512,
        host=host,
        artifact_dir="/nonexistent",
    )
    mine = SandboxFactory(
        team=acme,
        host=host,
        template=base_version_row.template,
        template_version=base_version_row,
        state=SandboxState.READY,
    )
    other = SandboxFactory(team=theirs_team, host=host, state=SandboxState.READY)
    # volumes: small images in this test's own directory (mutations are rolled back, files not)
    request.getfixturevalue("settings").VOLUME_SIZE_GIB = 1
    Host.objects.filter(pk=host.pk).update(data_dir=str(tmp_path / "runtime"))
    host.refresh_from_db()
    my_volume = volume_create(user=owner.user, name="vol", team="acme")
    engine.write_file(my_volume.image_path, "/f.txt", b"hi")
    their_volume = volume_create(user=outsider.user, name="their-vol")
    my_checkpoint, their_checkpoint = (
        Checkpoint.objects.create(
            team_id=sandbox.team_id,
            sandbox=sandbox,
            template_version=base_version_row,
            host=host,
            cpu_count=1,
            memory_mb=512,
            status=CheckpointStatus.READY,
        )
        for sandbox in (mine, other)
    )
    my_top_up, their_top_up = (
        TopUp.objects.create(
            team=team,
            amount_micros=10_000_000,
            currency="EUR",
            payment_intent_id=f"pi_{team.pk}",
            customer_id="c",
        )
        for team in (acme, theirs_team)
    )
    spare_key, _ = api_key_create(user=owner.user, scope="write", name="spare")
    other_key = ApiKey.objects.filter(user=outsider.user).first()
    ids = {
        "sandbox_id": {"own": str(mine.pk), "other": str(other.pk), "missing": MISSING_ID},
        "port": {"own": "8080", "other": "8080", "missing": "65536"},
        "template_id": {"own": str(lab.pk), "other": str(theirs.pk), "missing": MISSING_ID},
        "version_id": {"own": str(lab_v1.pk), "other": str(theirs_v1.pk), "missing": MISSING_ID},
        "build_id": {"own": str(lab_v1.pk), "other": str(theirs_v1.pk), "missing": MISSING_ID},
        "alias": {"own": "lab", "other": "theirs", "missing": "no-such"},
        "template": {"own": "lab", "other": "theirs", "missing": "no-such"},
        "slug": {"own": "acme", "other": theirs_team.slug, "missing": "no-such"},
        "key_id": {"own": str(spare_key.pk), "other": str(other_key.pk), "missing": MISSING_ID},
        "volume_id": {"own": str(my_volume.pk), "other": str(their_volume.pk), "missing": MISSING_ID},
        "checkpoint_id": {
            "own": str(my_checkpoint.pk),
            "other": str(their_checkpoint.pk),
            "missing": MISSING_ID,
        },
        "snapshot_id": {
            "own": str(my_checkpoint.pk),
            "other": str(their_checkpoint.pk),
            "missing": MISSING_ID,
        },
        "top_up_id": {"own": str(my_top_up.pk), "other": str(their_top_up.pk), "missing": MISSING_ID},
        "period": {"own": f"{timezone.now():%Y-%m}", "other": "2001-01", "missing": "1999-13"},
    }
    ApiKey.objects.update(last_used_at=timezone.now())  # no last-use write on each request
    client = owner.client()
    client.raise_request_exception = False
    # Thousands of expected 4xx would otherwise be logged one by one.
    logging.disable(logging.CRITICAL)
    try:
        yield World(owner=owner, client=client, ids=ids)
    finally:
        logging.disable(logging.NOTSET)


def test_every_route_parameter_has_real_ids(world: World) -> None:
    # given: the routes the resolver knows
    params = {param for route, _ in ROUTES.values() for param in PARAM.findall(route)}

    # then: each parameter has an own, another team's and a missing value
    assert sorted(params - world.ids.keys()) == []
    assert len(ROUTES) == 50
    assert {route.name for route in WRITE_ROUTES} - ROUTES.keys() == set()


def test_every_route_and_method_with_every_kind_of_id(world: World) -> None:
    # given: every route with its own, another team's, missing and hostile ids
    for name, (route, methods) in ROUTES.items():
        # when: its own, another team's and a missing id get every method
        for kind in ("own", "other", "missing"):
            for method in METHODS:
                world.call(method, world.path(name, kind), b"{}")
        # when: each hostile id gets the methods the route answers (the others are a 405
        # before any view code runs) and one it does not
        wrong = next(m for m in ("PUT", "PATCH") if m not in methods)
        for param in PARAM.findall(route):
            for hostile in HOSTILE_IDS:
                for method in [*methods, wrong]:
                    world.call(method, world.path(name, **{param: hostile}), b"{}")

    # then
    world.assert_clean()


def test_hostile_query_parameters_on_every_route(world: World) -> None:
    # given: every route with the caller's own ids
    for name, (_, methods) in ROUTES.items():
        path = world.path(name)
        # when: every known query parameter of a readable route carries each hostile value
        # (the schema and its docs page only read lang and format: they are not regenerated for
        # the others)
        documents = (SCHEMA_PATH, DOCS_PATH)
        keys = ["lang", "format"] if path in documents else QUERY_KEYS if "GET" in methods else []
        for key in keys:
            for value in QUERY_VALUES:
                world.call("GET", path, query=_urlencode(key, value))
        # when: raw query strings, on a read and on a mutation
        for query in RAW_QUERIES:
            world.call("GET", path, query=query)
        for query in ("team=%00", "team=" + "x" * 10000, "team=%C2%B2&team=acme"):
            world.call(methods[-1], path, b"{}", query=query)

    # then
    world.assert_clean()


def _urlencode(key: str, value: str) -> str:
    from urllib.parse import urlencode

    return urlencode({key: value})


def _put(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of `body` with `value` at `path` (objects and lists made or replaced on the way)."""
    result = copy.deepcopy(body)
    target: Any = result
    for step, following in itertools.pairwise(path):
        want: type = list if isinstance(following, int) else dict
        if isinstance(target, list):
            target.extend({} for _ in range(step + 1 - len(target)))
        current = target[step] if isinstance(target, list) else target.get(step)
        if not isinstance(current, want):
            current = target[step] = want()
        target = current
    if isinstance(target, list):
        target.extend(None for _ in range(path[-1] + 1 - len(target)))
    target[path[-1]] = value
    return result


def test_hostile_values_in_every_known_body_key(world: World) -> None:
    for route in WRITE_ROUTES:
        path = world.path(route.name)
        # given: the route's valid body answers without a 5xx
        world.call_json(route.method, path, route.body)
        # when: each known key carries each hostile value
        for key in route.keys:
            for value in HOSTILE_VALUES:
                world.call_json(route.method, path, _put(route.body, key, value))

    # then
    world.assert_clean()


def test_hostile_raw_bodies_on_every_write_route(world: World) -> None:
    # given: every write route with the caller's own ids
    for route in WRITE_ROUTES:
        path = world.path(route.name)
        # when: the body is not JSON, not an object, too deep, too large or badly encoded
        for body, content_type in RAW_BODIES:
            world.call(route.method, path, body, content_type=content_type)
        world.call(route.method, path, b"[]", HTTP_IDEMPOTENCY_KEY="\x00")
        world.call(route.method, path, b"[" * DEEP, HTTP_IDEMPOTENCY_KEY="deep")

    # then
    world.assert_clean()


def test_hostile_headers(world: World) -> None:
    path = world.path("sandbox-list")
    # when: the Host, Accept, Authorization and Idempotency-Key headers are hostile
    for host in ("evil.example", "", "a" * 10000, "127.0.0.1:99999", "[::1", "\x00"):
        world.call("GET", path, HTTP_HOST=host)
        world.call("POST", "/v1/no/such/route", b"{}", HTTP_HOST=host)
    for accept in ("text/html", "application/xml", "\x00", "*/*;q=x"):
        world.call("GET", path, HTTP_ACCEPT=accept)
        world.call("GET", "/v1/no/such/route", HTTP_ACCEPT=accept)
    for auth in ("Bearer", "Bearer \x00", "Bearer " + "x" * 10000, "Basic Zm9vOmJhcg==", "\xff"):
        world.call("GET", path, HTTP_AUTHORIZATION=auth)
    for key in ("\x00", "\x01", "k" * 256, "é", " "):
        world.call("POST", path, b'{"template": "no-such"}', HTTP_IDEMPOTENCY_KEY=key)

    # then
    world.assert_clean()


def test_unknown_urls_and_odd_paths_are_json_404(world: World) -> None:
    for path in (
        "/v1",
        "/v1/",
        "/v1/nope",
        "/v1/sandboxes/",
        "/v1/sandboxes/1/2/3",
        "/v1/%00",
        "/v1/sandboxes/1/pause/",
        "/v1/..%2f..%2fadmin",
        "/nope",
        "/" + "x" * 10000,
        "/v1/sandboxes/1%2f",
        "/v1/%ff%fe",
        "/v1/sandbox_limits%00",
    ):
        for method in METHODS:
            response = world.call(method, path, b"{}")
            # then: 404 (or 405 on the known prefix), always JSON
            assert response.status_code in (404, 405), (method, path, response.status_code)

    world.assert_clean()


JSON_LEAVES = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.integers(),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(
    derandomize=True,
    max_examples=200,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hypothesis_combined_hostile_bodies(world: World, data: st.DataObject) -> None:
    # given: a write route and a body mixing hostile values into several of its known keys
    route = data.draw(st.sampled_from([r for r in WRITE_ROUTES if r.keys]))
    keys = data.draw(st.lists(st.sampled_from(route.keys), min_size=1, max_size=4))
    body = route.body
    for key in keys:
        body = _put(body, key, data.draw(JSON_VALUES))

    # when
    world.call_json(route.method, world.path(route.name), body)

    # then
    world.assert_clean()


# --- what each fix answers, exactly ------------------------------------------------------------


def test_unknown_host_is_a_json_400_not_html(owner: Actor) -> None:
    # when
    response = owner.client().get("/v1/sandboxes", HTTP_HOST="evil.example")

    # then
    assert (response.status_code, response["Content-Type"]) == (400, "application/json")
    assert response.json() == {"error": "bad_request", "message": "Invalid Host header."}


def test_oversized_body_is_a_json_413(owner: Actor, settings: Any) -> None:
    # given
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024

    # when
    response = owner.client().post("/v1/sandboxes", {"name": "x" * 2000}, format="json")

    # then
    assert response.status_code == 413
    assert response.json() == {
        "error": "payload_too_large",
        "message": "The request body is larger than 1024 bytes.",
    }


def test_oversized_body_read_by_the_idempotency_check_is_a_json_413(owner: Actor, settings: Any) -> None:
    # given: a Content-Length that understates the body passes the first check
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    client = owner.client()
    client.raise_request_exception = False

    # when
    response = client.generic(
        "POST",
        "/v1/sandboxes",
        b"{}" + b" " * 2000,
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k1",
    )

    # then
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * DEEP, "JSON parse error - nested deeper than 32 levels."),
        (
            b'{"metadata": ' + b'{"a":' * 40 + b"1" + b"}" * 41,
            "JSON parse error - nested deeper than 32 levels.",
        ),
        (b'{"timeout": NaN}', "JSON parse error - NaN is not a JSON number"),
        (b'{"name": "\\ud800"}', "JSON parse error - name holds a lone surrogate (invalid Unicode)."),
        (b'{"name": "\xff"}', "JSON parse error - the body is not valid utf-8 text."),
    ],
)
def test_unparseable_bodies_are_400(owner: Actor, body: bytes, message: str) -> None:
    # when
    response = owner.client().generic("POST", "/v1/sandboxes", body, content_type="application/json")

    # then
    assert response.status_code == 400
    assert response.json() == {"error": "bad_request", "message": message}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"metadata": {"k": "a\x00b"}}, "metadata.k: must not contain NUL characters."),
        ({"name": "x" * 201}, "name must be at most 200 characters."),
        ({"name": "bad\x1bname"}, "name must not contain control characters."),
        ({"metadata": {"k": "v" * 4097}}, "metadata.k must be at most 4096 characters."),
        (
            {"metadata": {"k" * 257: "v"}},
            "metadata keys must be 1 to 256 characters without control characters.",
        ),
        ({"allow_out": True}, "allow_out must be a list of strings."),
        ({"template_version_id": "²"}, "template_version_id must be an integer id."),
        ({"template_version_id": 2**63}, "template_version_id must be an integer id."),
        ({"cpu_count": 2.0}, "cpu_count must be one of 1, 2, 4, 8."),
        ({"envs": {"A\n": "x"}}, "envs: 'A\n' is not a valid variable name."),
    ],
)
def test_bad_create_values_are_422_naming_the_field(owner: Actor, body: dict[str, Any], message: str) -> None:
    # when
    response = owner.client().post("/v1/sandboxes", body, format="json")

    # then
    assert response.status_code == 422
    assert response.json()["message"] == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"sandbox_template": {"slug": "lab", "name": "n" * 201}},
            "sandbox_template.name: Ensure this field has no more than 200 characters.",
        ),
        (
            {"sandbox_template": {"slug": "lab x"}},
            "sandbox_template.slug: must be lowercase letters, digits and dashes.",
        ),
        ({"sandbox_template": {"slug": "lab", "metadata": [1]}}, "metadata must be an object."),
        ({"sandbox_template": "lab"}, "sandbox_template: Invalid data. Expected a dictionary, but got str."),
        (
            {"sandbox_template": {"slug": "lab", "team": ["acme"]}},
            "sandbox_template.team: Not a valid string.",
        ),
    ],
)
def test_bad_template_bodies_are_422_naming_the_field(
    owner: Actor, body: dict[str, Any], message: str
) -> None:
    # when
    response = owner.client().post("/v1/sandbox_templates", body, format="json")

    # then
    assert response.status_code == 422
    assert response.json()["message"] == message


def test_api_key_expiry_out_of_range_is_422(owner: Actor) -> None:
    # when
    response = owner.client().post("/v1/api_keys", {"expires_at": "9999-12-31T23:59:59-14:00"}, format="json")

    # then
    assert response.status_code == 422
    assert response.json()["errors"] == ["expires_at: Datetime value out of range."]


@pytest.mark.parametrize("raw_id", ["²", "١٢", "9" * 20, "9" * 5000, "%00"])
def test_ids_that_are_not_ascii_bigints_are_404(owner: Actor, raw_id: str) -> None:
    # given: a sandbox whose id the Arabic-Indic '١٢' would alias if it were parsed as a number
    SandboxFactory(id=12, team=owner.personal_team)

    # when
    response = owner.client().get(f"/v1/sandboxes/{raw_id}")

    # then
    assert response.status_code == 404
    assert response.json()["error"] in ("sandbox_not_found", "not_found")


def test_a_tag_with_a_trailing_newline_is_422(world: World) -> None:
    # when: `$` in a pattern would have matched before the newline
    response = world.client.post(
        "/v1/templates/tags", {"target": "lab:v1", "tags": ["edge\n"]}, format="json"
    )

    # then
    assert response.status_code == 422
    assert response.json()["message"] == "tags must be a non-empty list of lowercase tag names."


def test_nul_in_a_query_parameter_is_422(owner: Actor) -> None:
    # when
    response = owner.client().get("/v1/sandboxes?team=a%00b")

    # then
    assert response.status_code == 422
    assert response.json() == {
        "error": "validation_failed",
        "message": "Query parameter 'team' must not contain NUL characters.",
        "errors": ["Query parameter 'team' must not contain NUL characters."],
    }


@pytest.mark.parametrize("query", ["limit=²", "limit=" + "9" * 5000, "next_token=" + "9" * 20])
def test_pagination_parameters_out_of_range_are_422(owner: Actor, query: str) -> None:
    # when
    response = owner.client().get(f"/v1/sandboxes?{query}")

    # then
    assert response.status_code == 422
    assert response.json()["error"] == "validation_failed"


def test_actions_answer_only_their_own_methods(world: World) -> None:
    # given: the caller's ready sandbox and a template version
    sandbox = world.ids["sandbox_id"]["own"]
    version = world.path("sandbox-template-version")

    # when: DELETE on an action (it used to destroy the sandbox or retire the version)
    pause = world.client.delete(f"/v1/sandboxes/{sandbox}/pause")
    logs = world.client.delete(f"{version}/build_logs")
    port = world.client.delete(f"/v1/sandboxes/{sandbox}/ports/8080")

    # then
    assert [pause.status_code, logs.status_code, port.status_code] == [405, 405, 405]
    assert world.client.get(f"/v1/sandboxes/{sandbox}").json()["sandbox"]["state"] == "ready"
    assert world.client.get(version).status_code == 200


def test_schema_errors_are_json(owner: Actor) -> None:
    # when
    wrong_method = APIClient().post("/v1/schema")
    bad_lang = APIClient().get("/v1/schema?lang=../../etc")

    # then
    assert (wrong_method.status_code, wrong_method.json()["error"]) == (405, "method_not_allowed")
    assert bad_lang.status_code == 422
    assert bad_lang.json()["message"] == "lang must be one of the configured language codes."

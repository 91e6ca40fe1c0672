"""No surprises on the control plane: each route answers only the methods it implements,
mistakes are named instead of absorbed, deadlines only move the way users expect, and
one default shape."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from sandboxes.models import Sandbox, SandboxState
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db
S = SandboxState
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _v1_routes() -> list[tuple[str, type]]:
    """(route pattern, view class) of every route under /v1/."""
    routes = []
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver) and str(entry.pattern) == "v1/":
            for pattern in entry.url_patterns:
                assert isinstance(pattern, URLPattern)
                routes.append((f"/v1/{pattern.pattern}", pattern.callback.view_class))
    assert len(routes) > 20, routes  # the walk covers the real table, not an empty one
    return routes


def _implemented(view: type) -> set[str]:
    return {method.upper() for method in METHODS if callable(getattr(view, method.lower(), None))}


def _path(route: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        route = route.replace(f"<str:{name}>", value)
    assert "<" not in route, route
    return route


@pytest.fixture
def path_values(owner: Actor) -> dict[str, str]:
    sandbox = SandboxFactory(team=owner.personal_team)
    return {
        "sandbox_id": str(sandbox.pk),
        "port": "8080",
        "template_id": "base",
        "version_id": "1",
        "build_id": "1",
        "alias": "base",
        "template": "base",
        "slug": owner.personal_team.slug,
        "key_id": "1",
        "volume_id": "1",
        "checkpoint_id": "1",
        "snapshot_id": "1",
        "top_up_id": "1",
        "period": "2026-12",
    }


@pytest.mark.parametrize("caller", ["write key", "read key", "no key"])
def test_every_route_answers_only_its_methods_and_405s_in_the_shape(
    owner: Actor,
    path_values,  # type: ignore[no-untyped-def]
    caller: str,
) -> None:
    from rest_framework.test import APIClient

    client = {"write key": owner.client(), "read key": owner.client("read"), "no key": APIClient()}[caller]
    walked = 0
    for route, view in _v1_routes():
        allowed = _implemented(view)
        assert allowed, f"{route} implements no method"
        path = _path(route, path_values)
        for method in sorted({*METHODS, "OPTIONS", "TRACE"} - allowed):
            # when: a method the route does not implement, whoever asks
            response = client.generic(method, path, "{}", content_type="application/json")

            # then: 405 in the error shape (not 401/403), naming what the route does answer
            assert response.status_code == 405, (method, path, response.status_code, response.content)
            assert response.json()["error"] == "method_not_allowed", (method, path)
            listed = set(response["Allow"].replace(" ", "").split(","))
            assert listed - {"HEAD"} == allowed, (method, path, listed)  # HEAD wherever GET is
            walked += 1
    # and: no unimplemented method touched the sandbox (DELETE .../timeout once destroyed it)
    sandbox = Sandbox.objects.get(pk=int(path_values["sandbox_id"]))
    assert sandbox.state == S.READY
    assert walked > 40


def test_the_schema_lists_only_the_methods_each_route_implements(owner: Actor) -> None:
    schema = owner.client().get("/v1/schema?format=json").json()
    by_path = {
        route.removeprefix("/v1").replace("<str:", "{").replace(">", "}"): view
        for route, view in _v1_routes()
    }

    for path, operations in schema["paths"].items():
        view = by_path[path.removeprefix("/v1")]
        listed = {method.upper() for method in operations if method.upper() in METHODS}
        assert listed == _implemented(view), (path, listed)


def test_unknown_lifecycle_keys_are_named_with_the_closest_known_one(owner: Actor) -> None:
    response = owner.client().post("/v1/sandboxes", {"lifecycle": {"on_timout": "pause"}}, format="json")

    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error"] == "invalid_lifecycle"
    assert "lifecycle.on_timout" in body["message"] and "did you mean 'on_timeout'" in body["message"]
    assert body["did_you_mean"] == "on_timeout"
    assert not Sandbox.objects.exists()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"auto_pause": True, "lifecycle": {"on_timeout": "kill"}}, "auto_pause is true but"),
        ({"lifecycle": {"on_timeout": "pause", "onTimeout": "kill"}}, "name the same setting"),
        (
            {"lifecycle": {"on_timeout": "pause", "auto_resume": True, "autoResume": False}},
            "name the same setting",
        ),
        ({"lifecycle": {"on_timeout": ""}}, "must be 'kill' or 'pause'"),
        ({"lifecycle": {"on_timeout": False}}, "must be 'kill' or 'pause'"),
    ],
)
def test_a_lifecycle_that_contradicts_itself_is_refused_never_guessed(
    owner: Actor, body: dict, problem: str
) -> None:
    response = owner.client().post("/v1/sandboxes", body, format="json")

    assert response.status_code == 422, response.content
    assert response.json()["error"] == "invalid_lifecycle" and problem in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "on_timeout"),
    [
        ({"auto_pause": True, "lifecycle": {}}, "pause"),  # auto_pause fills what lifecycle leaves out
        ({"auto_pause": False, "lifecycle": {"on_timeout": "pause"}}, "pause"),  # what beta_create sends
        ({"lifecycle": {"on_timeout": None}}, "kill"),
    ],
)
def test_auto_pause_and_lifecycle_agree(body: dict, on_timeout: str) -> None:
    from sandboxes.api.requests import SandboxCreateSerializer

    serializer = SandboxCreateSerializer(data=body)

    assert serializer.is_valid(), serializer.errors
    assert serializer.spec().lifecycle.on_timeout == on_timeout


def test_an_unknown_lifecycle_key_unlike_any_lists_the_known_ones(owner: Actor) -> None:
    response = owner.client().post("/v1/sandboxes", {"lifecycle": {"colour": "red"}}, format="json")

    assert response.status_code == 422
    assert "known keys: autoResume, auto_resume, onTimeout, on_timeout" in response.json()["message"]


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("timeuot", "timeout"),
        ("templat", "template"),
        ("metdata", "metadata"),
        ("auto_puase", "auto_pause"),
        ("allow_internet_acess", "allow_internet_access"),
        ("Timeout", "timeout"),
        # keys other APIs use for ours (they changed nothing)
        ("cpu", "cpu_count"),
        ("vcpus", "cpu_count"),
        ("ram_mb", "memory_mb"),
        ("on_timeout", "lifecycle.on_timeout"),
        ("auto_resume", "lifecycle.auto_resume"),
        ("CPU", "cpu_count"),
        ("autoResume", "lifecycle.auto_resume"),
        ("onTimeout", "lifecycle.on_timeout"),
    ],
)
def test_near_misses_of_create_keys_are_refused_with_did_you_mean(owner: Actor, key: str, meant: str) -> None:
    response = owner.client().post("/v1/sandboxes", {key: 5}, format="json")

    assert response.status_code == 422, response.content
    assert response.json()["error"] == "unknown_field"
    assert f"did you mean '{meant}'" in response.json()["message"]
    assert not Sandbox.objects.exists()


def test_other_unknown_top_level_keys_pass_through_as_the_spec_says(owner: Actor) -> None:
    body = {
        "template": "no-such-template",
        "secure": True,
        "client_trace": "abc",
        "x_sdk_option": 1,
        "exposed_ports": [],
        "beta_create": True,
    }

    response = owner.client().post("/v1/sandboxes", body, format="json")

    # then: the keys were let through; the create got as far as resolving the template
    assert (response.status_code, response.json()["error"]) == (422, "template_not_found")


def test_an_unknown_egress_profile_is_refused_naming_the_known_ones(owner: Actor) -> None:
    response = owner.client().post("/v1/sandboxes", {"egress_profile": "strict"}, format="json")

    assert (response.status_code, response.json()["error"]) == (422, "invalid_network_policy")
    assert "package-registries" in response.json()["message"]


# --- deadlines ----------------------------------------------------------------------------


def _running(owner: Actor, *, remaining: int, timeout: int = 300) -> Sandbox:
    return SandboxFactory(
        team=owner.personal_team, timeout=timeout, deadline_at=timezone.now() + timedelta(seconds=remaining)
    )


@pytest.mark.parametrize("route", ["connect", "resume"])
@pytest.mark.parametrize("body", [{}, {"timeout": 60}])
def test_connect_or_resume_of_a_running_sandbox_never_shortens_its_deadline(
    owner: Actor, route: str, body: dict
) -> None:
    sandbox = _running(owner, remaining=3000)
    before = sandbox.deadline_at

    response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/{route}", body, format="json")

    assert response.status_code == 200, response.content
    sandbox.refresh_from_db()
    assert sandbox.deadline_at == before


def test_connect_extends_a_deadline_that_is_sooner(owner: Actor) -> None:
    sandbox = _running(owner, remaining=10)

    response = owner.client().post(f"/v1/sandboxes/{sandbox.pk}/connect", {"timeout": 600}, format="json")

    assert response.status_code == 200
    sandbox.refresh_from_db()
    assert sandbox.deadline_at > timezone.now() + timedelta(seconds=590)


def test_the_timeout_field_reflects_the_last_set_timeout(owner: Actor) -> None:
    sandbox = _running(owner, remaining=300, timeout=300)
    client = owner.client()

    client.post(f"/v1/sandboxes/{sandbox.pk}/timeout", {"timeout": 1200}, format="json")
    shown = client.get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]

    assert shown["timeout"] == 1200
    # and: a later connect without a timeout keeps the deadline set_timeout gave it
    sandbox.refresh_from_db()
    deadline = sandbox.deadline_at
    client.post(f"/v1/sandboxes/{sandbox.pk}/connect", {}, format="json")
    sandbox.refresh_from_db()
    assert sandbox.deadline_at >= deadline


def test_set_timeout_may_shorten_a_running_sandbox(owner: Actor) -> None:
    sandbox = _running(owner, remaining=3000)

    owner.client().post(f"/v1/sandboxes/{sandbox.pk}/timeout", {"timeout": 30}, format="json")

    sandbox.refresh_from_db()
    assert sandbox.deadline_at < timezone.now() + timedelta(seconds=31)


# --- destroyed sandboxes and previews that cannot work ---------------------------------------


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "connect"),
        ("POST", "resume"),
        ("POST", "pause"),
        ("POST", "timeout"),
        ("POST", "files/download_url"),
        ("GET", "ports/8080"),
    ],
)
def test_an_action_on_a_destroyed_sandbox_says_it_was_destroyed(
    owner: Actor, method: str, route: str
) -> None:
    sandbox = SandboxFactory(team=owner.personal_team, state=S.DESTROYED)
    body = {"timeout": 60, "path": "/tmp/x"}

    response = owner.client().generic(
        method, f"/v1/sandboxes/{sandbox.pk}/{route}", json.dumps(body), content_type="application/json"
    )

    assert response.status_code == 404, response.content
    assert response.json() == {
        "error": "sandbox_not_found",
        "message": f"Sandbox {sandbox.pk} was destroyed; its files and processes are gone.",
    }
    assert owner.client().get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]["state"] == "destroyed"


def test_the_agents_own_port_is_no_preview(owner: Actor) -> None:
    sandbox = SandboxFactory(team=owner.personal_team)

    response = owner.client().get(f"/v1/sandboxes/{sandbox.pk}/ports/49983")

    assert response.status_code == 422 and response.json()["error"] == "port_reserved", response.content


@pytest.mark.parametrize("path", ["/tmp/../etc/hostname", "/tmp/./x", "/.."])
def test_a_signed_url_names_the_file_itself(owner: Actor, path: str) -> None:
    sandbox = SandboxFactory(team=owner.personal_team)

    response = owner.client().post(
        f"/v1/sandboxes/{sandbox.pk}/files/download_url", {"path": path}, format="json"
    )

    assert response.status_code == 422 and response.json()["error"] == "invalid_path", response.content

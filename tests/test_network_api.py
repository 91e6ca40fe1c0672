"""Network policies through the API on the fake runtime: create and `PUT /network` with
every policy key, atomic replacement, camelCase, unknown keys, secrets never echoed,
isolation and states, restore inheriting the policy. Enforcement is the VM tests' part
(test_network_vm.py); here policies are recorded (`WATASU_EGRESS_ENFORCE` off)."""

from __future__ import annotations

from typing import Any

import pytest

from sandboxes.models import Sandbox, SandboxState
from sandboxes.network import egress_of, rule_headers
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db
SECRET = "Bearer sk-live-0123456789"


@pytest.fixture
def sandbox(owner: Actor, local_host) -> Sandbox:  # type: ignore[no-untyped-def]
    return SandboxFactory(team=owner.personal_team, host=local_host)  # type: ignore[no-any-return]


def _put(actor: Actor, sandbox: Sandbox, body: Any, scope: str = "write") -> Any:
    return actor.client(scope).put(f"/v1/sandboxes/{sandbox.pk}/network", body, format="json")


def test_put_replaces_the_whole_policy_and_shows_it_in_force(owner: Actor, sandbox: Sandbox) -> None:
    response = _put(
        owner,
        sandbox,
        {
            "allow_internet_access": False,
            "allow_package_registry_access": True,
            "allow_out": ["pypi.org:443", "198.18.0.0/24", "*.example.com"],
            "deny_out": ["198.18.0.3"],
            "network_class": "restricted",
            "egress_profiles": ["package-registries"],
            "mask_request_host": "${PORT}-app.example.com",
            "sandbox_url": "http://leaked-sdk-option",  # the SDK leaks these two: ignored
            "extra_sandbox_headers": {"X": "y"},
        },
    )

    assert response.status_code == 200, response.content
    body = response.json()["sandbox"]
    assert body["network_policy"] == {
        "allow_internet_access": False,
        "allow_package_registry_access": True,
        "allow_public_traffic": True,
        "allow_out": ["pypi.org:443", "198.18.0.0/24", "*.example.com"],
        "deny_out": ["198.18.0.3"],
        "egress_profiles": ["package-registries"],
        "network_class": "restricted",
        "mask_request_host": "${PORT}-app.example.com",
        "rules": {},
    }
    assert body["network_class"] == "restricted"
    assert body["network_policy_in_force"] is True
    # a second PUT replaces everything: what it leaves out is back at its default
    again = _put(owner, sandbox, {"deny_out": ["evil.test"]}).json()["sandbox"]["network_policy"]
    assert (again["allow_internet_access"], again["allow_out"], again["network_class"]) == (
        True,
        [],
        "standard",
    )
    sandbox.refresh_from_db()
    assert sandbox.network_revision == 2


def test_the_shape_sandboxes_show_is_accepted_as_a_put_body(owner: Actor, sandbox: Sandbox) -> None:
    shown = _put(owner, sandbox, {"allow_internet_access": False, "allow_out": ["alpha.test"]}).json()[
        "sandbox"
    ]

    again = _put(owner, sandbox, {"network_policy": shown["network_policy"]}).json()["sandbox"]

    assert again["network_policy"] == shown["network_policy"]
    assert again["network_policy"]["allow_internet_access"] is False


def test_camel_case_keys_mean_their_snake_case_names(owner: Actor, sandbox: Sandbox) -> None:
    body = {"allowInternetAccess": False, "allowOut": ["alpha.test"], "networkClass": "restricted"}
    policy = _put(owner, sandbox, body).json()["sandbox"]["network_policy"]

    assert (policy["allow_internet_access"], policy["allow_out"], policy["network_class"]) == (
        False,
        ["alpha.test"],
        "restricted",
    )
    both = _put(owner, sandbox, {"allowOut": ["a.test"], "allow_out": ["b.test"]})
    assert both.status_code == 422


def test_rules_are_secrets_never_echoed_and_encrypted_at_rest(owner: Actor, sandbox: Sandbox) -> None:
    rules = {"api.example.com": [{"transform": {"headers": {"Authorization": SECRET}}}]}

    response = _put(owner, sandbox, {"rules": rules})

    assert response.status_code == 200
    assert SECRET not in response.content.decode()
    assert response.json()["sandbox"]["network_policy"]["rules"] == {
        "api.example.com": [{"transform": {"headers": {"Authorization": "[secret]"}}}]
    }
    sandbox.refresh_from_db()
    assert SECRET not in repr(sandbox.network_policy) and SECRET not in sandbox.network_rules_encrypted
    assert rule_headers(sandbox) == {"api.example.com": {"Authorization": SECRET}}
    assert egress_of(sandbox).by_name  # header rules send 80/443 through the proxy
    assert SECRET not in owner.client().get(f"/v1/sandboxes/{sandbox.pk}").content.decode()
    # sending back what was shown is refused rather than storing the placeholder as the secret
    shown = response.json()["sandbox"]["network_policy"]
    assert _put(owner, sandbox, shown).status_code == 422


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"allow_out": ["pypi.org:5432"]}, "ports 80 (HTTP Host) and 443 (TLS SNI) only"),
        ({"allow_out": ["::1"]}, "IPv6"),
        ({"deny_out": "evil.test"}, "deny_out must be a list of strings."),
        ({"network_class": "gold"}, "network_class 'gold' is not one of: restricted, standard."),
        ({"egress_profile": "strict"}, "is not one of: package-registries"),
        (
            {"rules": {"x.test": [{"transform": {"headers": {"Host": "y"}}}]}},
            "not a header that can be injected",
        ),
        ({"mask_request_host": "http://x"}, "mask_request_host"),
        ({"allow_internet_access": "no"}, "allow_internet_access"),
        (["allow_out"], "must be a JSON object"),
        ({"alow_out": ["alpha.test"]}, "Unknown key 'alow_out': did you mean 'allow_out'?"),
        ({"allow_internet_acess": False}, "did you mean 'allow_internet_access'?"),
        ({"allow_out": ["198.18.0.2/0"]}, "bits set past its prefix"),
        ({"network_policy": {"allow_internet_access": False, "allow_in": []}}, "allow_in"),
        ({"egress_profile": ["package-registries"]}, "send a list as egress_profiles"),
    ],
)
def test_bad_policies_are_422_naming_the_entry_and_change_nothing(
    owner: Actor, sandbox: Sandbox, body: Any, words: str
) -> None:
    response = _put(owner, sandbox, body)

    assert response.status_code == 422, response.content
    assert words in response.json()["message"]
    sandbox.refresh_from_db()
    assert sandbox.network_revision == 0


def test_a_read_key_another_team_and_an_anonymous_caller_cannot_change_it(
    owner: Actor, outsider: Actor, sandbox: Sandbox, client
) -> None:  # type: ignore[no-untyped-def]
    body = {"allow_internet_access": True}
    assert _put(owner, sandbox, body, scope="read").status_code == 403
    assert _put(outsider, sandbox, body).status_code == 404
    assert (
        client.put(f"/v1/sandboxes/{sandbox.pk}/network", body, content_type="application/json").status_code
        == 401
    )
    assert _put(owner, sandbox, body).status_code == 200
    sandbox.refresh_from_db()
    assert sandbox.network_revision == 1


@pytest.mark.parametrize(("state", "status"), [(SandboxState.DESTROYED, 404), (SandboxState.FAILED, 409)])
def test_a_sandbox_that_is_gone_cannot_change_its_policy(
    owner: Actor, local_host, state: str, status: int
) -> None:  # type: ignore[no-untyped-def]
    gone = SandboxFactory(team=owner.personal_team, host=local_host, state=state)

    response = _put(owner, gone, {"allow_internet_access": False})

    assert response.status_code == status


def test_a_paused_sandbox_records_the_policy_for_its_resume(owner: Actor, local_host) -> None:  # type: ignore[no-untyped-def]
    paused = SandboxFactory(team=owner.personal_team, host=local_host, state=SandboxState.STOPPED)

    body = _put(owner, paused, {"allow_internet_access": False}).json()["sandbox"]

    assert body["network_policy"]["allow_internet_access"] is False
    assert body["network_policy_in_force"] is False  # applied when it resumes


def test_create_takes_the_policy_top_level_nested_and_camel_case(owner: Actor) -> None:
    from sandboxes.api.requests import SandboxCreateSerializer

    for data in (
        {"allow_out": ["alpha.test"], "allow_internet_access": False, "rules": {"a.test": []}},
        {"network_policy": {"allowOut": ["alpha.test"], "allow_internet_access": False}},
        {"allowOut": ["alpha.test"], "allowInternetAccess": False},
    ):
        serializer = SandboxCreateSerializer(data=data)
        assert serializer.is_valid(), serializer.errors
        spec = serializer.spec()
        assert spec.network_policy["allow_out"] == ["alpha.test"], data
        assert spec.network_policy["allow_internet_access"] is False
        assert spec.allow_internet_access is False


def test_a_policy_the_host_cannot_apply_now_is_kept_and_applied_by_the_worker(
    owner: Actor, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandboxes import network, services
    from sandboxes.tasks import network_apply

    queued: list[object] = []
    real_apply = network.apply

    def unreachable(row: Sandbox) -> None:
        raise OSError("host unreachable")

    monkeypatch.setattr(network, "apply", unreachable)
    monkeypatch.setattr(network_apply, "apply_async", lambda **kwargs: queued.append(kwargs))

    body = _put(owner, sandbox, {"allow_internet_access": False}).json()["sandbox"]

    # then: recorded, shown as not in force, handed to the worker
    assert body["network_policy"]["allow_internet_access"] is False
    assert body["network_policy_in_force"] is False
    assert queued == [{"args": [sandbox.pk], "countdown": 1}]
    # when the worker runs once the host answers again
    monkeypatch.setattr(network, "apply", real_apply)
    assert services.sandbox_network_retry(sandbox.pk) is True
    assert (
        owner.client().get(f"/v1/sandboxes/{sandbox.pk}").json()["sandbox"]["network_policy_in_force"] is True
    )

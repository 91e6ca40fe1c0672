"""`GET /v1/sandbox_limits`: shapes, prices and the quota from the database."""

from __future__ import annotations

import pytest
from django.conf import settings

from sandboxes.models import SandboxState
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db


def test_shape_with_defaults(owner: Actor) -> None:
    body = owner.client("read").get("/v1/sandbox_limits").json()

    assert body == {
        "team": "owner",
        "fallback": {"cpu": 1, "memory_mb": 512},
        "allowed_cpu": [1, 2, 4, 8],
        "memory_mb": {"min": 512, "max": 16384, "increment": 512},
        "max_timeout_seconds": 86400,
        "default_network_class": "standard",
        "network_classes": {"standard": {"max_connections": 1024}, "restricted": {"max_connections": 64}},
        "egress_profiles": {"package-registries": settings.EGRESS_PROFILES["package-registries"]},
        "prices": {
            "currency": "EUR",
            "vcpu_second": "0.000010",
            "memory_gib_second": "0.000002",
            "stopped_disk_gib_month": "0.10",
            "checkpoint_gib_month": "0.10",
            "template_gib_month": "0.10",
            "volume_gib_month": "0.10",
        },
        "quota": {
            "limits": {"max_running_instances": 100, "max_vcpu_count": 256, "max_memory_mb": 524288},
            "usage": {"running_instances": 0, "vcpu_count": 0, "memory_mb": 0},
            "reservation": {"instances": 0, "vcpu_count": 0, "memory_mb": 0},
        },
    }


def test_usage_counts_only_runtime_states_of_the_selected_team(owner: Actor, acme) -> None:
    # given acme sandboxes in runtime and non-runtime states, and one elsewhere
    SandboxFactory(team=acme, state=SandboxState.READY, cpu_count=2, memory_mb=1024)
    SandboxFactory(team=acme, state=SandboxState.CREATING, cpu_count=4, memory_mb=2048)
    SandboxFactory(team=acme, state=SandboxState.STOPPING, cpu_count=1, memory_mb=512)
    for state in (
        SandboxState.STOPPED,
        SandboxState.DESTROYED,
        SandboxState.EXPIRED,
        SandboxState.FAILED,
        SandboxState.LOST,
    ):
        SandboxFactory(team=acme, state=state, cpu_count=8, memory_mb=8192)
    SandboxFactory(team=owner.personal_team, state=SandboxState.READY)

    quota = owner.client().get("/v1/sandbox_limits?team=acme").json()["quota"]

    assert quota["usage"] == {"running_instances": 3, "vcpu_count": 7, "memory_mb": 3584}


def test_team_quota_overrides_the_defaults(owner: Actor, acme) -> None:
    acme.max_running_instances = 5
    acme.max_memory_mb = 4096
    acme.save()

    limits = owner.client().get("/v1/sandbox_limits?team=acme").json()["quota"]["limits"]

    assert limits == {"max_running_instances": 5, "max_vcpu_count": 256, "max_memory_mb": 4096}


def test_prices_and_shapes_come_from_settings(owner: Actor, settings) -> None:
    settings.PRICE_VCPU_SECOND = __import__("decimal").Decimal("0.5")
    settings.SANDBOX_ALLOWED_CPU = [1, 3]

    body = owner.client().get("/v1/sandbox_limits").json()

    assert body["prices"]["vcpu_second"] == "0.5"
    assert body["allowed_cpu"] == [1, 3]


def test_a_running_template_build_counts_against_the_team(owner: Actor, acme) -> None:
    from templates_app.models import Template, TemplateVersion, VersionStatus

    # given one acme template building (its build VM runs) and one waiting, and a ready sandbox
    template = Template.objects.create(team=acme, slug="ci", name="ci")
    TemplateVersion.objects.create(
        template=template, version="b1", status=VersionStatus.BUILDING, cpu=2, memory_mb=2048
    )
    TemplateVersion.objects.create(
        template=template, version="b2", status=VersionStatus.DRAFT, cpu=8, memory_mb=8192
    )
    SandboxFactory(team=acme, state=SandboxState.READY, cpu_count=1, memory_mb=512)

    quota = owner.client().get("/v1/sandbox_limits?team=acme").json()["quota"]

    # then the build's VM is part of the team's usage, the queued one is not yet
    assert quota["usage"] == {"running_instances": 2, "vcpu_count": 3, "memory_mb": 2560}

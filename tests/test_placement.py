"""Host registration and placement."""

from __future__ import annotations

import pytest
from django.db import transaction

from sandboxes.models import Host, HostState, SandboxState
from sandboxes.placement import host_place
from sandboxes.services import host_register_local
from tests.factories import HostFactory, SandboxFactory
from watasu.errors import Unavailable

pytestmark = pytest.mark.django_db


def test_local_host_registers_once_and_keeps_operator_capacity(settings) -> None:
    settings.RUNTIME_HOST_NAME = "node-a"
    host = host_register_local()
    Host.objects.filter(pk=host.pk).update(cpu_capacity=3, state=HostState.DOWN)

    again = host_register_local()

    assert again.pk == host.pk
    assert (again.cpu_capacity, again.state) == (3, HostState.UP)
    assert again.libvirt_uri == settings.RUNTIME_LIBVIRT_URI


def test_places_on_the_host_with_most_free_memory() -> None:
    busy = HostFactory(memory_capacity_mb=8192)
    idle = HostFactory(memory_capacity_mb=4096)
    SandboxFactory(host=busy, memory_mb=6144, state=SandboxState.READY)

    with transaction.atomic():
        assert host_place(cpu=1, memory_mb=1024) == idle


def test_non_runtime_sandboxes_free_their_capacity() -> None:
    host = HostFactory(cpu_capacity=2, memory_capacity_mb=2048)
    SandboxFactory(host=host, cpu_count=2, memory_mb=2048, state=SandboxState.STOPPED)

    with transaction.atomic():
        assert host_place(cpu=2, memory_mb=2048) == host


def test_no_room_is_a_clear_overloaded_error() -> None:
    host = HostFactory(cpu_capacity=2, memory_capacity_mb=2048)
    SandboxFactory(host=host, cpu_count=2, memory_mb=1024, state=SandboxState.READY)
    HostFactory(state=HostState.DOWN)

    with transaction.atomic(), pytest.raises(Unavailable) as raised:
        host_place(cpu=1, memory_mb=512)

    assert raised.value.code == "sandbox_overloaded"
    assert raised.value.message == ("No host has room for 1 vCPU and 512 MiB right now; retry later.")
    assert raised.value.extra == {"reason": {"message": raised.value.message}}


def test_the_admin_refuses_host_memory_beyond_what_the_host_holds(admin_client, local_host) -> None:  # type: ignore[no-untyped-def]
    from django.forms.models import model_to_dict

    from sandboxes.runtime import driver_for

    # given the local host, as libvirt reports its memory
    physical = driver_for(local_host).memory_mb()
    form = {k: v for k, v in model_to_dict(local_host).items() if v is not None}

    # when an operator asks for more guest memory than that, then for exactly that
    too_much = admin_client.post(
        f"/admin/sandboxes/host/{local_host.pk}/change/", {**form, "memory_capacity_mb": physical + 1}
    )
    exact = admin_client.post(
        f"/admin/sandboxes/host/{local_host.pk}/change/", {**form, "memory_capacity_mb": physical}
    )

    # then the first is refused with the reason, the second saved
    assert too_much.status_code == 200
    assert "never overcommitted" in too_much.content.decode()
    assert exact.status_code == 302
    local_host.refresh_from_db()
    assert local_host.memory_capacity_mb == physical


def test_registering_again_never_ends_an_operators_drain(settings) -> None:  # type: ignore[no-untyped-def]
    # given a host the operator drains (as builds and restarts register the local host again)
    settings.RUNTIME_HOST_NAME = "node-b"
    host = host_register_local()
    Host.objects.filter(pk=host.pk).update(state=HostState.DRAINING)

    # when it is registered again, then it is still draining
    assert host_register_local().state == HostState.DRAINING

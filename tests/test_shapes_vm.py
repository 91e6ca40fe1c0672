"""A shape snapshot on real VMs: the first create of a non-baseline shape cold-boots and
queues the make (run by a real Celery worker), later creates restore it with the shape's
vCPUs and memory (tests/sdk/shapes.py)."""

from __future__ import annotations

import shutil

import pytest

from templates_app import shapes
from tests.conftest import Actor, celery_worker, helper_process_env
from tests.sdk import run_scenario
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


@pytest.mark.django_db(transaction=True)
def test_a_new_shape_cold_boots_once_then_restores_its_own_snapshot(
    edge, owner: Actor, base_version, vm_cleanup
) -> None:
    # given a base version without a 2x1024 snapshot (an earlier run may have made one)
    directory = shapes.shapes_dir(base_version)
    for leftover in directory.glob("2x1024*") if directory.is_dir() else []:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    assert (base_version.cpu, base_version.memory_mb) != (2, 1024)
    api = {"api_url": f"{edge.url}/v1", "api_key": owner.write_key}

    with celery_worker(helper_process_env(), queues="builds"):
        # when a sandbox of that shape is created: it cold-boots, and the make is queued
        [cold_boot] = run_scenario("shapes", **api, args=("1",)).split()
        snapshot = wait_until(lambda: shapes.made(base_version, 2, 1024), 300, "the 2x1024 snapshot")

    # then the next two restore it: both run the memory the make saved, so their kernels sit
    # where the make's one boot placed them, unlike the cold-booted first one's
    restored = run_scenario("shapes", **api, args=("2",)).split()
    assert restored[0] == restored[1] != cold_boot
    assert (snapshot.vcpus, snapshot.memory_mb) == (2, 1024)
    assert shapes.state(base_version, 2, 1024) == shapes.ShapeState()  # nothing queued or failed
    assert shapes.summary(base_version).startswith("2x1024: ready")

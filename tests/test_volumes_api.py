"""Volumes through the API without VMs: create, names, visibility, quota, the holder rule,
detached files (real images, through the real engine), request forms of mounts."""

from __future__ import annotations

import base64

import pytest

from sandboxes.models import SandboxState
from tests.conftest import Actor
from tests.factories import SandboxFactory
from volumes.models import Volume, VolumeUsage
from volumes.mounts import parse_mounts
from volumes.services import volumes_sweep
from watasu import errors

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _small_volumes(settings, tmp_path):  # type: ignore[no-untyped-def]
    settings.VOLUME_SIZE_GIB = 1
    settings.RUNTIME_HOST_DATA_DIR = tmp_path / "runtime"


def _create(actor: Actor, name: str = "cache", **body):  # type: ignore[no-untyped-def]
    return actor.client().post("/v1/volumes", {"name": name, **body}, format="json")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_create_get_list_and_delete(owner: Actor, local_host, django_capture_on_commit_callbacks) -> None:
    created = _create(owner, metadata={"purpose": "tests"})
    assert created.status_code == 201, created.content
    volume = created.json()["volume"]
    assert (volume["name"], volume["state"], volume["size_bytes"], volume["size_mb"]) == (
        "cache",
        "ready",
        2**30,
        1024,
    )
    assert volume["team"] == owner.personal_team.slug
    assert volume["node"] == local_host.name
    assert volume["attached_sandbox_id"] is None and volume["metadata"] == {"purpose": "tests"}
    image = Volume.objects.get().image_path
    assert image.stat().st_blocks * 512 < 64 * 2**20  # sparse: a 1 GiB ext4 takes a few MiB

    client = owner.client()
    assert client.get(f"/v1/volumes/{volume['id']}").json()["volume"]["name"] == "cache"
    assert client.get("/v1/volumes/cache").json()["volume"]["id"] == volume["id"]
    assert [v["name"] for v in client.get("/v1/volumes").json()["volumes"]] == ["cache"]

    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete("/v1/volumes/cache").status_code == 204
    assert client.delete("/v1/volumes/cache").status_code == 404
    assert not image.exists()


def test_duplicate_names_are_409_and_bad_names_422(owner: Actor) -> None:
    assert _create(owner).status_code == 201
    duplicate = _create(owner)
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "volume_exists"
    for bad in ("", "a/b", "..", "1234", "x" * 64, "cache\n", "-lead"):
        response = _create(owner, bad)
        assert response.status_code == 422, (bad, response.content)
    typo = owner.client().post("/v1/volumes", {"name": "x", "tema": "acme"}, format="json")
    assert typo.status_code == 422 and typo.json()["error"] == "unknown_field"


def test_other_teams_see_404_and_read_keys_cannot_write(owner: Actor, outsider: Actor) -> None:
    volume_id = _create(owner).json()["volume"]["id"]
    for path in (f"/v1/volumes/{volume_id}", "/v1/volumes/cache", f"/v1/volumes/{volume_id}/path?path=/"):
        response = outsider.client().get(path)
        assert response.status_code == 404, (path, response.content)
    assert outsider.client().delete(f"/v1/volumes/{volume_id}").status_code == 404
    assert outsider.client().get("/v1/volumes").json()["volumes"] == []

    reader = owner.client("read")
    assert reader.get(f"/v1/volumes/{volume_id}").status_code == 200
    assert reader.post("/v1/volumes", {"name": "other"}, format="json").status_code == 403
    assert reader.delete(f"/v1/volumes/{volume_id}").status_code == 403
    body = {"path": "/a.txt", "content_b64": _b64(b"a")}
    assert reader.put(f"/v1/volumes/{volume_id}/files", body, format="json").status_code == 403
    assert Volume.objects.count() == 1


def test_viewers_read_and_members_write_in_a_shared_team(owner: Actor, viewer: Actor, member: Actor) -> None:
    assert _create(owner, team="acme").status_code == 201
    assert viewer.client().get("/v1/volumes/cache?team=acme").status_code == 200
    assert viewer.client().delete("/v1/volumes/cache?team=acme").status_code == 403
    body = {"path": "/m.txt", "content_b64": _b64(b"m")}
    assert member.client().put("/v1/volumes/cache/files?team=acme", body, format="json").status_code == 200


def test_a_name_two_of_your_teams_use_is_409_until_the_team_is_named(owner: Actor) -> None:
    assert _create(owner).status_code == 201
    assert _create(owner, team="acme").status_code == 201
    ambiguous = owner.client().get("/v1/volumes/cache")
    assert ambiguous.status_code == 409 and ambiguous.json()["error"] == "volume_ambiguous"
    assert owner.client().get("/v1/volumes/cache?team=acme").json()["volume"]["team"] == "acme"


def test_the_team_quota_counts_volumes_and_gib(owner: Actor, settings) -> None:
    settings.VOLUME_MAX_PER_TEAM = 2
    assert _create(owner, "a").status_code == 201
    assert _create(owner, "b").status_code == 201
    over = _create(owner, "c")
    assert over.status_code == 422 and over.json()["error"] == "volume_quota_exceeded"
    assert "at most 2 volumes" in over.json()["message"]

    settings.VOLUME_MAX_PER_TEAM, settings.VOLUME_MAX_TOTAL_GIB = 10, 2
    assert "at most 2 GiB" in _create(owner, "c").json()["message"]


def test_detached_files_round_trip(owner: Actor) -> None:
    client = owner.client()
    volume_id = _create(owner).json()["volume"]["id"]
    base = f"/v1/volumes/{volume_id}"

    made = client.post(
        f"{base}/directories", {"path": "/work/a", "force": True, "mode": "0750"}, format="json"
    )
    assert made.status_code == 201, made.content
    assert made.json()["file"]["type"] == "directory"
    put = client.put(
        f"{base}/files",
        {"path": "/work/a/f.bin", "content_b64": _b64(b"\x00\xffhi"), "uid": 1000},
        format="json",
    )
    assert put.status_code == 200, put.content
    assert (put.json()["file"]["size"], put.json()["file"]["uid"]) == (4, 1000)

    read = client.get(f"{base}/files", {"path": "/work/./a/f.bin"}).json()["file"]
    assert base64.b64decode(read["content_b64"]) == b"\x00\xffhi"
    assert (read["path"], read["name"], read["type"], read["size"]) == ("/work/a/f.bin", "f.bin", "file", 4)
    directory = client.get(f"{base}/files", {"path": "/work/a"})
    assert directory.status_code == 422 and directory.json()["error"] == "is_a_directory"
    stat = client.get(f"{base}/path", {"path": "/work/a"}).json()["file"]
    assert (stat["type"], stat["mode"]) == ("directory", 0o750)
    paths = [
        e["path"] for e in client.get(f"{base}/directories", {"path": "/", "depth": 3}).json()["entries"]
    ]
    assert {"/work", "/work/a", "/work/a/f.bin"} <= set(paths)

    changed = client.patch(f"{base}/path", {"path": "/work/a/f.bin", "mode": 0o600}, format="json")
    assert changed.json()["file"]["mode"] == 0o600
    assert client.delete(f"{base}/path?path=/work").status_code == 204
    missing = client.get(f"{base}/path", {"path": "/work/a/f.bin"})
    assert missing.status_code == 404


@pytest.mark.parametrize("path", ["/../etc/passwd", "relative", "/a/../../b", "/a\x00b", ""])
def test_paths_escaping_the_volume_root_are_refused(owner: Actor, path: str) -> None:
    volume_id = _create(owner).json()["volume"]["id"]
    response = owner.client().put(
        f"/v1/volumes/{volume_id}/files", {"path": path, "content_b64": _b64(b"x")}, format="json"
    )
    assert response.status_code == 422, response.content


def test_files_over_the_limit_are_413(owner: Actor, settings) -> None:
    settings.VOLUME_MAX_FILE_BYTES = 1024
    volume_id = _create(owner).json()["volume"]["id"]
    response = owner.client().put(
        f"/v1/volumes/{volume_id}/files", {"path": "/big", "content_b64": _b64(b"x" * 2048)}, format="json"
    )
    assert response.status_code == 413, response.content


def test_a_held_volume_refuses_detached_operations_and_deletion(owner: Actor) -> None:
    volume_id = _create(owner).json()["volume"]["id"]
    holder = SandboxFactory(team=owner.personal_team, state=SandboxState.READY)
    Volume.objects.filter(pk=volume_id).update(holder=holder)
    client = owner.client()

    for response in (
        client.get(f"/v1/volumes/{volume_id}/files", {"path": "/x"}),
        client.put(f"/v1/volumes/{volume_id}/files", {"path": "/x", "content_b64": ""}, format="json"),
        client.delete(f"/v1/volumes/{volume_id}"),
    ):
        assert response.status_code == 409, response.content
        assert response.json()["error"] == "volume_attached"
        assert str(holder.pk) in response.json()["message"]
    assert client.get(f"/v1/volumes/{volume_id}").json()["volume"]["attached_sandbox_id"] == str(holder.pk)


def test_the_sweep_releases_a_volume_whose_sandbox_is_gone_and_measures_usage(
    owner: Actor, fake_driver
) -> None:
    volume_id = _create(owner).json()["volume"]["id"]
    holder = SandboxFactory(team=owner.personal_team, state=SandboxState.LOST, host=Volume.objects.get().host)
    Volume.objects.filter(pk=volume_id).update(holder=holder)

    result = volumes_sweep()

    assert result["released"] == 1
    volume = Volume.objects.get()
    assert volume.holder is None and volume.used_bytes > 0 and volume.allocated_bytes > 0
    assert VolumeUsage.objects.filter(volume=volume).count() == 1


@pytest.mark.parametrize(
    "value",
    [
        [{"path": "/data", "name": "cache"}],
        {"/data": "cache"},
        {"/data/": {"name": "cache"}},
    ],
)
def test_every_form_of_volume_mounts_reads_the_same(value) -> None:  # type: ignore[no-untyped-def]
    assert [m.as_dict() for m in parse_mounts(value)] == [{"name": "cache", "path": "/data"}]


@pytest.mark.parametrize(
    "value",
    [
        {"/": "a"},
        {"/proc/x": "a"},
        {"/usr": "a"},
        {"/opt/watasu/x": "a"},
        {"/tmp": "a"},
        {"/a/../b": "a"},
        {"/a//b": "a"},
        {"/a": "a", "/a/b": "b"},
        {"/a": "a", "/b": "a"},
        [{"path": "/a", "name": "a", "mode": "ro"}],
        {"/a": "bad/name"},
        {f"/m{i}": f"v{i}" for i in range(9)},
    ],
)
def test_bad_mounts_are_refused(value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.Invalid):
        parse_mounts(value)


def test_a_retried_create_with_its_idempotency_key_makes_one_volume(owner: Actor) -> None:
    client = owner.client()
    first = client.post("/v1/volumes", {"name": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="vol-1")
    again = client.post("/v1/volumes", {"name": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="vol-1")
    other = client.post("/v1/volumes", {"name": "twice"}, format="json", HTTP_IDEMPOTENCY_KEY="vol-1")

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert other.status_code == 422  # the same key with another body is refused, not run
    assert Volume.objects.count() == 1


def test_request_errors_have_their_codes(owner: Actor) -> None:
    base = f"/v1/volumes/{_create(owner).json()['volume']['id']}"
    client = owner.client()
    cases = [
        (client.patch(f"{base}/path", {"path": "/", "mode": "10000"}, format="json"), "invalid_mode"),
        (client.patch(f"{base}/path", {"path": "/", "uid": -1}, format="json"), "invalid_argument"),
        (client.get(f"{base}/directories", {"path": "/", "depth": 0}), "invalid_argument"),
        (client.get(f"{base}/directories", {"path": "/", "depth": "x"}), "invalid_argument"),
        (client.post(f"{base}/directories", {"path": "/d" * 129}, format="json"), "invalid_path"),
    ]
    for response, code in cases:
        assert (response.status_code, response.json()["error"]) == (422, code), response.content
        assert not response.json()["message"].startswith("mode: mode")


def test_mounting_a_name_only_another_of_your_teams_has_is_refused(owner: Actor, base_version_row) -> None:
    # given a volume of team acme (the SDK mounts a Volume object by its name)
    assert _create(owner, "shared", team="acme").status_code == 201

    # when a sandbox of the personal team mounts that name
    response = owner.client().post("/v1/sandboxes", {"volume_mounts": {"/data": "shared"}}, format="json")

    # then it is refused, naming the team, and no empty namesake is made
    assert response.status_code == 422 and response.json()["error"] == "volume_in_other_team"
    assert "acme" in response.json()["message"]
    assert Volume.objects.filter(name="shared").count() == 1


def test_the_admin_deletes_only_detached_volumes_with_their_images(
    owner: Actor, admin_client, django_capture_on_commit_callbacks
) -> None:
    volume_id = _create(owner, "held").json()["volume"]["id"]
    free_id = _create(owner, "free").json()["volume"]["id"]
    holder = SandboxFactory(team=owner.personal_team, state=SandboxState.READY)
    Volume.objects.filter(pk=volume_id).update(holder=holder)
    free_image = Volume.objects.get(pk=free_id).image_path

    admin_client.raise_request_exception = False
    assert admin_client.get(f"/admin/volumes/volume/{volume_id}/delete/").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            "/admin/volumes/volume/",
            {"action": "delete_detached", "_selected_action": [volume_id, free_id]},
        )

    assert list(Volume.objects.values_list("name", flat=True)) == ["held"]
    assert not free_image.exists()

"""Volume endpoints: the volumes of your teams and their files while detached."""

from __future__ import annotations

import base64
from typing import Any

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from teams.selectors import teams_for_list
from teams.services import audit_record
from volumes import engine, selectors, services
from volumes.api.serializers import (
    MAX_DEPTH,
    ListQuerySerializer,
    MakeDirSerializer,
    MetadataChangeSerializer,
    PathQuerySerializer,
    VolumeCreateSerializer,
    VolumeSerializer,
    WriteFileSerializer,
)
from volumes.models import Volume
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView, team_param

TEAM = OpenApiParameter("team", str, description="Team slug: list only its volumes / resolve names in it")
PATH = OpenApiParameter("path", str, required=True, description="Absolute path inside the volume")
ENTRY_FIELDS = {
    "path": serializers.CharField(),
    "name": serializers.CharField(),
    "type": serializers.ChoiceField(choices=["file", "directory", "symlink", "other"]),
    "size": serializers.IntegerField(),
    "mode": serializers.IntegerField(help_text="Permission bits (0o644 = 420)"),
    "uid": serializers.IntegerField(),
    "gid": serializers.IntegerField(),
    "atime": serializers.DateTimeField(),
    "mtime": serializers.DateTimeField(),
    "ctime": serializers.DateTimeField(),
}
ENTRY = inline_serializer("VolumeEntry", ENTRY_FIELDS)
FILE_ENVELOPE = object_envelope("VolumeEntryEnvelope", "file", ENTRY)
VOLUME_ENVELOPE = object_envelope("VolumeEnvelope", "volume", VolumeSerializer())
DETACHED = " Refused with 409 `volume_attached` while a sandbox holds the volume."


def entry_dict(entry: engine.Entry) -> dict[str, Any]:
    """The VolumeEntry shape: `mode` as the integer permission bits (the SDK's type)."""
    return {**entry.as_dict(), "mode": entry.mode}


def _entry(entry: engine.Entry) -> Response:
    return Response({"file": entry_dict(entry)})


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return dict(query.validated_data)


def _body(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    body = serializer_class(data=request.data)
    body.is_valid(raise_exception=True)
    return dict(body.validated_data)


class VolumeListView(ApiView):
    envelope = "volumes"

    @extend_schema(
        operation_id="volumes_list",
        summary="List volumes",
        description="Volumes of your teams (or of `team`), newest first.",
        parameters=[TEAM],
        responses=list_envelope("VolumeList", "volumes", VolumeSerializer()),
    )
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        return self.paginated(selectors.volumes_of_teams(teams=teams), VolumeSerializer)

    @extend_schema(
        summary="Create a volume",
        description=f"A named volume of the team ({settings.VOLUME_SIZE_GIB} GiB ext4 unless the "
        "operator set another size), ready when this returns; 409 `volume_exists` for a taken name, "
        "422 `volume_quota_exceeded` past the team's volume quota.",
        request=VolumeCreateSerializer,
        responses={201: VOLUME_ENVELOPE},
    )
    def post(self, request: Request) -> Response:
        body = _body(VolumeCreateSerializer, request)
        team = team_param(request, body)
        volume = services.volume_create(
            user=self.user, name=body["name"], team=team, metadata=body.get("metadata")
        )
        audit_record(
            team=volume.team, actor=self.user, action="volume.create", target=volume.name, source="api"
        )
        return Response({"volume": VolumeSerializer(volume).data}, status=201)


class _VolumeView(ApiView):
    def volume(self, request: Request, volume_id: str, *, write: bool = False) -> Volume:
        return selectors.volume_get(
            user=self.user, id_or_name=volume_id, team=request.query_params.get("team"), write=write
        )


class VolumeDetailView(_VolumeView):
    @extend_schema(
        summary="Get a volume",
        description="By id, or by name within your teams (409 `volume_ambiguous` when two of "
        "them use the name: add `team`).",
        parameters=[TEAM],
        responses=VOLUME_ENVELOPE,
    )
    def get(self, request: Request, volume_id: str) -> Response:
        return Response({"volume": VolumeSerializer(self.volume(request, volume_id)).data})

    @extend_schema(
        summary="Delete a volume",
        description="Deletes the volume and everything on it; 409 `volume_attached` while a "
        "sandbox holds it.",
        parameters=[TEAM],
        responses={204: None},
    )
    def delete(self, request: Request, volume_id: str) -> Response:
        volume = self.volume(request, volume_id, write=True)
        services.volume_delete(volume=volume)
        audit_record(
            team=volume.team, actor=self.user, action="volume.delete", target=volume.name, source="api"
        )
        return Response(status=204)


class VolumePathView(_VolumeView):
    @extend_schema(
        summary="Stat a path in a volume",
        description="One entry (404 `path_not_found` when missing)." + DETACHED,
        parameters=[PATH, TEAM],
        responses=FILE_ENVELOPE,
    )
    def get(self, request: Request, volume_id: str) -> Response:
        volume, query = self.volume(request, volume_id), _query(PathQuerySerializer, request)
        return _entry(services.detached(volume, engine.stat, query["path"]))

    @extend_schema(
        summary="Change owner or mode of a path in a volume",
        description="`mode` is an integer or an octal string." + DETACHED,
        request=MetadataChangeSerializer,
        responses=FILE_ENVELOPE,
    )
    def patch(self, request: Request, volume_id: str) -> Response:
        volume, body = self.volume(request, volume_id, write=True), _body(MetadataChangeSerializer, request)
        path = body.pop("path")
        return _entry(services.detached(volume, engine.set_metadata, path, write=True, **body))

    @extend_schema(
        summary="Remove a path from a volume",
        description="A file, a symlink, or a directory with everything in it." + DETACHED,
        parameters=[PATH, TEAM],
        responses={204: None},
    )
    def delete(self, request: Request, volume_id: str) -> Response:
        volume, query = self.volume(request, volume_id, write=True), _query(PathQuerySerializer, request)
        services.detached(volume, engine.remove, query["path"], write=True)
        return Response(status=204)


class VolumeDirectoriesView(_VolumeView):
    @extend_schema(
        summary="List a directory of a volume",
        description="Entries under `path` (default `/`) down to `depth` levels (default 1)." + DETACHED,
        parameters=[
            OpenApiParameter("path", str, description="Directory (default /)"),
            OpenApiParameter("depth", int, description=f"Levels, 1 to {MAX_DEPTH}"),
            TEAM,
        ],
        responses=inline_serializer(
            "VolumeEntries", {"entries": inline_serializer("VolumeEntry", ENTRY_FIELDS, many=True)}
        ),
    )
    def get(self, request: Request, volume_id: str) -> Response:
        volume, query = self.volume(request, volume_id), _query(ListQuerySerializer, request)
        entries = services.detached(volume, engine.list_dir, query["path"], depth=query["depth"])
        return Response({"entries": [entry_dict(entry) for entry in entries]})

    @extend_schema(
        summary="Make a directory in a volume",
        description="`force` creates missing parents and accepts an existing directory." + DETACHED,
        request=MakeDirSerializer,
        responses={201: FILE_ENVELOPE},
    )
    def post(self, request: Request, volume_id: str) -> Response:
        volume, body = self.volume(request, volume_id, write=True), _body(MakeDirSerializer, request)
        path, force = body.pop("path"), bool(body.pop("force", False))
        entry = services.detached(volume, engine.make_dir, path, write=True, force=force, **body)
        return Response({"file": entry_dict(entry)}, status=201)


class VolumeFilesView(_VolumeView):
    @extend_schema(
        summary="Read a file of a volume",
        description="The file with its bytes base64 in `content_b64`; 413 `file_too_large` over "
        "the platform's limit." + DETACHED,
        parameters=[PATH, TEAM],
        responses=object_envelope(
            "VolumeFileEnvelope",
            "file",
            inline_serializer(
                "VolumeFile",
                {
                    "path": serializers.CharField(),
                    "name": serializers.CharField(),
                    "type": serializers.CharField(),
                    "size": serializers.IntegerField(),
                    "content_b64": serializers.CharField(),
                },
            ),
        ),
    )
    def get(self, request: Request, volume_id: str) -> Response:
        volume, query = self.volume(request, volume_id), _query(PathQuerySerializer, request)
        limit, path = settings.VOLUME_MAX_FILE_BYTES, query["path"]
        # One tool run: read_file refuses anything but a regular file, so its bytes say the rest.
        data = services.detached(volume, engine.read_file, path, max_bytes=limit)
        parts = [part.decode(errors="backslashreplace") for part in engine.split_path(path)]
        file = {"path": "/" + "/".join(parts), "name": parts[-1], "type": "file", "size": len(data)}
        return Response({"file": {**file, "content_b64": base64.b64encode(data).decode()}})

    @extend_schema(
        summary="Write a file into a volume",
        description="Creates or replaces the file with `content_b64` (or UTF-8 `content`); `force` "
        "creates missing parent directories. 413 over the platform's limit, 507 "
        "`not_enough_space` when the volume is full." + DETACHED,
        request=WriteFileSerializer,
        responses=FILE_ENVELOPE,
    )
    def put(self, request: Request, volume_id: str) -> Response:
        volume, body = self.volume(request, volume_id, write=True), _body(WriteFileSerializer, request)
        path, data, force = body.pop("path"), body.pop("data"), bool(body.pop("force", False))
        return _entry(
            services.detached(volume, engine.write_file, path, data, write=True, force=force, **body)
        )

"""Template endpoints: `/v1/sandbox_templates` (docs API) and the read/tag parts of the
SDK's `/v1/templates` API (builds, status, aliases, tags)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes.api.serializers import iso
from teams.selectors import teams_for_list, teams_of_user
from teams.services import audit_record
from templates_app import selectors, services
from templates_app.api.serializers import (
    MAX_LOG_PAGE,
    BuildLogsQuerySerializer,
    BuildLogsSerializer,
    BuildStatusQuerySerializer,
    BuildStatusSerializer,
    SandboxTemplateCreateSerializer,
    TagAssignSerializer,
    TagRemoveSerializer,
    TagsAssignedSerializer,
    TagSerializer,
    TemplateBuildRequestSerializer,
    TemplateBuildSerializer,
    TemplateSerializer,
    TemplateVersionSerializer,
    VersionCreateSerializer,
)
from templates_app.filters import TemplateFilter, TemplateVersionFilter
from templates_app.models import Template, TemplateVersion
from watasu.api.schema import object_envelope
from watasu.api.views import ApiView, team_param
from watasu.filtering import filter_or_refuse, openapi_parameters

# The SDK's build-status vocabulary for our version states.
SDK_STATUS = {"draft": "waiting", "building": "building", "ready": "ready", "failed": "error"}


def template_representation(template: Template) -> dict[str, Any]:
    return {
        "id": template.pk,
        "slug": template.slug,
        "name": template.name,
        "team": template.team.slug if template.team else None,
        "visibility": template.visibility,
        "status": "active",
        "description": template.description,
        "metadata": template.metadata,
        "created_at": iso(template.created_at),
    }


def version_representation(version: TemplateVersion) -> dict[str, Any]:
    return {
        "id": version.pk,
        "template_id": version.template_id,
        "template_slug": version.template.slug,
        "version": version.version,
        "status": version.status,
        "architecture": "x86_64",
        "source_kind": "package_spec",
        "runtime_baseline": {"cpu": version.cpu, "memory_mb": version.memory_mb},
        "build_spec": {k: v for k, v in version.build_spec.items() if k != "env"},  # values stay secret
        "size_bytes": version.size_bytes,
        "tags": sorted(t.tag for t in version.tags.all()),
        "build_failure": version.last_error_message or None,
        "last_error_message": version.last_error_message or None,
        "built_at": iso(version.built_at),
        "created_at": iso(version.created_at),
    }


TEAM = OpenApiParameter("team", str, description="Team slug; default: every team of yours")
TEMPLATE_ENVELOPE = object_envelope("SandboxTemplateEnvelope", "sandbox_template", TemplateSerializer())
VERSION_ENVELOPE = object_envelope(
    "SandboxTemplateVersionEnvelope", "sandbox_template_version", TemplateVersionSerializer()
)


def _valid(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class SandboxTemplateListView(ApiView):
    @extend_schema(
        operation_id="sandbox_templates_list",
        summary="List templates",
        description="Your teams' templates (or those of `team`) and the provider's, by slug.",
        parameters=[TEAM, *openapi_parameters(TemplateFilter)],
        responses=object_envelope("SandboxTemplateList", "sandbox_templates", TemplateSerializer(many=True)),
    )
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        templates = filter_or_refuse(
            TemplateFilter(request.query_params, queryset=selectors.templates_of_teams(teams=teams))
        ).order_by("slug", "pk")
        return Response({"sandbox_templates": [template_representation(t) for t in templates]})

    @extend_schema(
        summary="Create a template",
        description="A new, empty template of a team; add versions to build it.",
        request=SandboxTemplateCreateSerializer,
        responses={201: TEMPLATE_ENVELOPE},
    )
    def post(self, request: Request) -> Response:
        body = _valid(SandboxTemplateCreateSerializer, request.data)["sandbox_template"]
        template = services.template_create(
            user=self.user,
            team_slug=team_param(request, body),
            slug=body["slug"],
            name=body.get("name") or "",
            description=body.get("description") or "",
            metadata=body.get("metadata") or {},
        )
        return Response({"sandbox_template": template_representation(template)}, status=201)


class _TemplateView(ApiView):
    # Looks up the template of the path. Not a route: each route view declares only its own
    # methods (inheriting the version view's delete once made DELETE .../build_logs retire it).

    def template(self, template_id: str) -> Template:
        return selectors.template_get(teams=teams_of_user(user=self.user), template_id=template_id)


class _VersionView(_TemplateView):
    def version(self, template_id: str, version_id: str) -> TemplateVersion:
        return selectors.template_version_get(template=self.template(template_id), version_id=version_id)


class SandboxTemplateDetailView(_TemplateView):
    @extend_schema(
        summary="Get a template",
        description="One template visible to your teams.",
        responses=TEMPLATE_ENVELOPE,
    )
    def get(self, request: Request, template_id: str) -> Response:
        return Response({"sandbox_template": template_representation(self.template(template_id))})

    @extend_schema(
        operation_id="sandbox_templates_destroy",
        summary="Delete a template",
        description="Deletes a team template nothing runs on (409 `template_in_use` "
        "otherwise); its slug is free again at once.",
        responses={204: None},
    )
    def delete(self, request: Request, template_id: str) -> Response:
        services.template_delete(user=self.user, template=self.template(template_id))
        return Response(status=204)


class SandboxTemplateVersionListView(_TemplateView):
    @extend_schema(
        operation_id="sandbox_template_versions_list",
        summary="List a template's versions",
        description="Every version of the template, newest first, with its build status and tags.",
        parameters=openapi_parameters(TemplateVersionFilter),
        responses=object_envelope(
            "SandboxTemplateVersionList", "sandbox_template_versions", TemplateVersionSerializer(many=True)
        ),
    )
    def get(self, request: Request, template_id: str) -> Response:
        versions = self.template(template_id).versions.select_related("template").prefetch_related("tags")
        versions = filter_or_refuse(TemplateVersionFilter(request.query_params, queryset=versions))
        versions = versions.order_by("-pk")
        return Response({"sandbox_template_versions": [version_representation(v) for v in versions]})

    @extend_schema(
        operation_id="sandbox_template_versions_create",
        summary="Build a new version",
        description="Queues a build of a new version from a build spec; follow it with "
        "`.../build_logs`. One build per template at a time (409 while one runs).",
        request=VersionCreateSerializer,
        responses={201: VERSION_ENVELOPE},
    )
    def post(self, request: Request, template_id: str) -> Response:
        from templates_app.builds import template_version_create

        body = _valid(VersionCreateSerializer, request.data)["sandbox_template_version"]
        created = template_version_create(
            user=self.user,
            template=self.template(template_id),
            version=body["version"],
            build_spec=body["build_spec"],
            cpu=body["cpu"],
            memory_mb=body["memory_mb"],
            skip_cache=body.get("skip_cache") is True,
        )
        return Response({"sandbox_template_version": version_representation(created)}, status=201)


class SandboxTemplateVersionDetailView(_VersionView):
    @extend_schema(
        summary="Get a template version",
        description="One version of the template.",
        responses=VERSION_ENVELOPE,
    )
    def get(self, request: Request, template_id: str, version_id: str) -> Response:
        return Response(
            {"sandbox_template_version": version_representation(self.version(template_id, version_id))}
        )

    @extend_schema(
        summary="Delete a template version",
        description="Deletes a version nothing runs on; it no longer resolves, and its "
        "files go once nothing references them.",
        responses={204: None},
    )
    def delete(self, request: Request, template_id: str, version_id: str) -> Response:
        services.template_version_delete(user=self.user, version=self.version(template_id, version_id))
        return Response(status=204)


class SandboxTemplateVersionBuildLogsView(_VersionView):
    @extend_schema(
        operation_id="sandbox_template_version_build_logs",
        summary="Read a version's build log",
        description=f"The build log from line `offset` on, at most `limit` (≤ {MAX_LOG_PAGE}) lines; "
        "`next_offset` is where the next page starts.",
        parameters=[BuildLogsQuerySerializer],
        responses=object_envelope(
            "SandboxTemplateVersionBuildLogs", "sandbox_template_version_build_logs", BuildLogsSerializer()
        ),
    )
    def get(self, request: Request, template_id: str, version_id: str) -> Response:
        from templates_app.builds import build_log_entries

        version = self.version(template_id, version_id)
        query = _valid(BuildLogsQuerySerializer, request.query_params)
        offset, limit = query["offset"], min(query["limit"], MAX_LOG_PAGE)
        entries = build_log_entries(version=version, offset=offset)[:limit]
        return Response(
            {
                "sandbox_template_version_build_logs": {
                    "template_version_id": version.pk,
                    "status": version.status,
                    "next_offset": entries[-1].index + 1 if entries else offset,
                    "entries": [
                        {"index": e.index, "timestamp": iso(e.at), "level": e.level, "message": e.message}
                        for e in entries
                    ],
                }
            }
        )


class TemplateAliasView(ApiView):
    @extend_schema(
        summary="Look up a template by alias",
        description="200 with the template when an alias (slug) or id is visible to "
        "you, 404 otherwise (the SDK's `alias_exists`).",
        responses=object_envelope("TemplateAliasEnvelope", "template", TemplateSerializer()),
    )
    def get(self, request: Request, alias: str) -> Response:
        template = selectors.template_by_id_or_alias(teams=teams_of_user(user=self.user), value=alias)
        return Response({"template": template_representation(template)})


class TemplateTagsView(ApiView):
    @extend_schema(
        summary="List a template's tags",
        description="The tags of a template and the build each points at, as a bare "
        "JSON array (what the SDK reads).",
        responses=TagSerializer(many=True),
    )
    def get(self, request: Request, template: str) -> Response:
        found = selectors.template_by_id_or_alias(teams=teams_of_user(user=self.user), value=template)
        return Response(
            [
                {"tag": t.tag, "build_id": str(t.version_id), "created_at": iso(t.created_at)}
                for t in found.tags.all()
            ]
        )


class TemplateTagAssignView(ApiView):
    @extend_schema(
        summary="Tag a version",
        description="Points tags at a ready version (`alias:tag`, `alias:version` or "
        "`alias:<build id>`), moving them from any other version.",
        request=TagAssignSerializer,
        responses=TagsAssignedSerializer,
    )
    def post(self, request: Request) -> Response:
        body = _valid(TagAssignSerializer, request.data)
        version = services.template_tags_assign(user=self.user, target=body["target"], tags=body["tags"])
        return Response({"build_id": str(version.pk), "tags": sorted(t.tag for t in version.tags.all())})

    @extend_schema(
        summary="Remove tags",
        description="Removes tags from a template (JSON body).",
        request=TagRemoveSerializer,
        responses={204: None},
    )
    def delete(self, request: Request) -> Response:
        body = _valid(TagRemoveSerializer, request.data)
        services.template_tags_remove(user=self.user, name=body["name"], tags=body["tags"])
        return Response(status=204)


def _build_info(version: TemplateVersion) -> dict[str, Any]:
    template = version.template
    return {
        "template_id": str(template.pk),
        "build_id": str(version.pk),
        "name": template.slug,
        "alias": template.slug,
        "tags": version.build_spec.get("tags", []),
    }


class TemplateBuildView(ApiView):
    @extend_schema(
        summary="Build a template",
        description="Starts a build of `name` (the SDK's `Template.build`), creating the "
        "template if needed; poll `.../builds/{build_id}/status`.",
        request=TemplateBuildRequestSerializer,
        responses={
            201: object_envelope("TemplateBuildEnvelope", "template_build", TemplateBuildSerializer())
        },
    )
    def post(self, request: Request) -> Response:
        from templates_app.builds import template_build_start

        body = _valid(TemplateBuildRequestSerializer, request.data if isinstance(request.data, dict) else {})
        version = template_build_start(
            user=self.user,
            name=body["name"],
            build_spec=body["build_spec"],
            cpu=body["cpu_count"],
            memory_mb=body["memory_mb"],
            tags=body.get("tags") or [],
            team_slug=team_param(request, body),
            skip_cache=body.get("skip_cache") is True,
        )
        audit_record(
            team=version.template.team,  # type: ignore[arg-type]  # a build is always a team's
            actor=self.user,
            action="template.build",
            target=f"{version.template.slug}:{version.version}",
            source="api",
            version=version.pk,
        )
        return Response({"template_build": _build_info(version)}, status=201)


class TemplateBuildStatusView(ApiView):
    @extend_schema(
        summary="Follow a build",
        description="A build's status in the SDK's words (waiting, building, ready, "
        "error) and its log from `logs_offset` on; no envelope.",
        parameters=[BuildStatusQuerySerializer],
        responses=BuildStatusSerializer,
    )
    def get(self, request: Request, template_id: str, build_id: str) -> Response:
        from templates_app.builds import build_log_entries, template_build_get

        version = template_build_get(user=self.user, template_id=template_id, build_id=build_id)
        offset = _valid(BuildStatusQuerySerializer, request.query_params)["logs_offset"]
        entries = [
            {"timestamp": iso(e.at), "level": e.level, "message": e.message}
            for e in build_log_entries(version=version, offset=offset)
        ]
        status = SDK_STATUS[version.status]
        reason = (
            {"message": version.last_error_message or "build failed", "log_entries": entries[-20:]}
            if status == "error"
            else None
        )
        return Response(
            {
                "template_id": str(version.template_id),
                "build_id": str(version.pk),
                "status": status,
                "log_entries": entries,
                "logs": [e["message"] for e in entries],
                "reason": reason,
            }
        )

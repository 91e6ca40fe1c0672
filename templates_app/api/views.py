"""Template endpoints: `/v1/sandbox_templates` (docs API) and the read/tag parts of the
SDK's `/v1/templates` API (builds, status, aliases, tags)."""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes.api.parsing import SHAPE_MEANT, parse_metadata
from sandboxes.api.serializers import iso
from teams.selectors import teams_for_list, teams_of_user
from templates_app import selectors, services
from templates_app.filters import TemplateFilter, TemplateVersionFilter
from templates_app.models import Template, TemplateVersion
from watasu import errors, ids, suggest
from watasu.api.fields import NameField
from watasu.api.views import ApiView, team_param
from watasu.filtering import filter_or_refuse, openapi_parameters

TAG = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SLUG = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")  # DRF's RegexField searches
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BUILD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}(:[a-z0-9][a-z0-9._-]{0,62})?")
ANY = inline_serializer("TemplateAny", {"any": serializers.JSONField()})
# What the SDKs send to start a build and to add a version: a near-miss of one of these
# (`skip_cahce`, `memroy_mb`) is a 422, other keys are left to the clients that send them.
BUILD_KEYS = ("name", "cpu_count", "memory_mb", "skip_cache", "build_spec", "tags", "team")
VERSION_KEYS = ("version", "source_kind", "architecture", "runtime_baseline", "build_spec", "skip_cache",
                "default_user", "workdir", "metadata")
MAX_LOG_INDEX = 2**31 - 1  # BuildLogEntry.index is a PositiveIntegerField
# The SDK's build-status vocabulary for our version states.
SDK_STATUS = {"draft": "waiting", "building": "building", "ready": "ready", "failed": "error"}


def template_representation(template: Template) -> dict[str, Any]:
    return {"id": template.pk, "slug": template.slug, "name": template.name,
            "team": template.team.slug if template.team else None,
            "visibility": template.visibility, "status": "active",
            "description": template.description, "metadata": template.metadata,
            "created_at": iso(template.created_at)}


def version_representation(version: TemplateVersion) -> dict[str, Any]:
    return {"id": version.pk, "template_id": version.template_id,
            "template_slug": version.template.slug, "version": version.version,
            "status": version.status, "architecture": "x86_64", "source_kind": "package_spec",
            "runtime_baseline": {"cpu": version.cpu, "memory_mb": version.memory_mb},
            "build_spec": {k: v for k, v in version.build_spec.items() if k != "env"},  # values stay secret
            "size_bytes": version.size_bytes,
            "tags": sorted(t.tag for t in version.tags.all()),
            "build_failure": version.last_error_message or None,
            "last_error_message": version.last_error_message or None,
            "built_at": iso(version.built_at), "created_at": iso(version.created_at)}


def _tags(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and TAG.fullmatch(t)
                                                           for t in value):
        raise errors.Invalid("tags must be a non-empty list of lowercase tag names.",
                             errors=["tags: invalid"])
    return value


def _text(body: Any, key: str) -> str:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise errors.Invalid(f"{key} is required.", errors=[f"{key}: required"])
    return value


class _SandboxTemplateFields(serializers.Serializer):
    team = serializers.CharField(max_length=63, required=False, allow_null=True, allow_blank=True)
    slug = serializers.RegexField(SLUG, max_length=63, error_messages={
        "invalid": "must be lowercase letters, digits and dashes."})
    name = NameField(max_length=200, required=False, allow_null=True, allow_blank=True)
    description = serializers.CharField(max_length=10000, required=False, allow_null=True,
                                        allow_blank=True, trim_whitespace=False)
    metadata = serializers.JSONField(required=False, allow_null=True)

    def validate_metadata(self, value: Any) -> dict[str, str]:
        return parse_metadata(value)


class SandboxTemplateCreateSerializer(serializers.Serializer):
    sandbox_template = _SandboxTemplateFields()


class SandboxTemplateListView(ApiView):
    @extend_schema(operation_id="sandbox_templates_list", parameters=openapi_parameters(TemplateFilter),
                   responses=ANY)
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        templates = filter_or_refuse(TemplateFilter(
            request.query_params, queryset=selectors.templates_of_teams(teams=teams))).order_by("slug", "pk")
        return Response({"sandbox_templates": [template_representation(t) for t in templates]})

    @extend_schema(request=ANY, responses={201: ANY})
    def post(self, request: Request) -> Response:
        serializer = SandboxTemplateCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        body = serializer.validated_data["sandbox_template"]
        template = services.template_create(
            user=self.user, team_slug=team_param(request, body), slug=body["slug"],
            name=body.get("name") or "", description=body.get("description") or "",
            metadata=body.get("metadata") or {})
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
    @extend_schema(responses=ANY)
    def get(self, request: Request, template_id: str) -> Response:
        return Response({"sandbox_template": template_representation(self.template(template_id))})

    @extend_schema(operation_id="sandbox_templates_destroy", responses={204: None})
    def delete(self, request: Request, template_id: str) -> Response:
        services.template_delete(user=self.user, template=self.template(template_id))
        return Response(status=204)


class SandboxTemplateVersionListView(_TemplateView):
    @extend_schema(operation_id="sandbox_template_versions_list",
                   parameters=openapi_parameters(TemplateVersionFilter), responses=ANY)
    def get(self, request: Request, template_id: str) -> Response:
        versions = self.template(template_id).versions.select_related("template").prefetch_related("tags")
        versions = filter_or_refuse(TemplateVersionFilter(request.query_params, queryset=versions))
        versions = versions.order_by("-pk")
        return Response({"sandbox_template_versions": [version_representation(v) for v in versions]})


    @extend_schema(operation_id="sandbox_template_versions_create", request=ANY, responses={201: ANY})
    def post(self, request: Request, template_id: str) -> Response:
        from templates_app.builds import template_version_create

        body = request.data.get("sandbox_template_version") if isinstance(request.data, dict) else None
        if not isinstance(body, dict):
            raise errors.Invalid("Expected {\"sandbox_template_version\": {...}}.",
                                 errors=["sandbox_template_version"])
        suggest.refuse_near_misses(body, VERSION_KEYS, where="sandbox_template_version")
        version = _text(body, "version")
        if not VERSION.fullmatch(version):
            raise errors.Invalid("version must be letters, digits, dots, dashes and underscores.",
                                 errors=["version: invalid"])
        if body.get("source_kind", "package_spec") != "package_spec":
            raise errors.Invalid("Only source_kind 'package_spec' is supported.",
                                 errors=["source_kind: invalid"])
        if body.get("architecture", "x86_64") not in ("x86_64", "amd64"):
            raise errors.Invalid("Only the x86_64 architecture is supported.",
                                 errors=["architecture: invalid"])
        baseline = body.get("runtime_baseline") or {}
        if not isinstance(baseline, dict):
            raise errors.Invalid("runtime_baseline must be an object.", errors=["runtime_baseline: invalid"])
        suggest.refuse_unknown_keys(baseline, ("cpu", "memory_mb"),
                                    where="sandbox_template_version.runtime_baseline")
        cpu, memory = _shape(baseline, "cpu", "memory_mb")
        created = template_version_create(
            user=self.user, template=self.template(template_id), version=version,
            build_spec=_spec(body), cpu=cpu, memory_mb=memory,
            skip_cache=body.get("skip_cache") is True)
        return Response({"sandbox_template_version": version_representation(created)}, status=201)


class SandboxTemplateVersionDetailView(_VersionView):
    @extend_schema(responses=ANY)
    def get(self, request: Request, template_id: str, version_id: str) -> Response:
        return Response({"sandbox_template_version": version_representation(
            self.version(template_id, version_id))})

    @extend_schema(responses={204: None})
    def delete(self, request: Request, template_id: str, version_id: str) -> Response:
        services.template_version_delete(user=self.user, version=self.version(template_id, version_id))
        return Response(status=204)


class SandboxTemplateVersionBuildLogsView(_VersionView):
    """`GET .../versions/{vid}/build_logs?offset=N&limit=M`: the log from line `offset` on."""

    @extend_schema(operation_id="sandbox_template_version_build_logs", responses=ANY)
    def get(self, request: Request, template_id: str, version_id: str) -> Response:
        from templates_app.builds import build_log_entries

        version = self.version(template_id, version_id)
        offset = _query_int(request, "offset", 0, maximum=MAX_LOG_INDEX)
        limit = min(_query_int(request, "limit", 1000), 5000)
        entries = build_log_entries(version=version, offset=offset)[:limit]
        return Response({"sandbox_template_version_build_logs": {
            "template_version_id": version.pk, "status": version.status,
            "next_offset": entries[-1].index + 1 if entries else offset,
            "entries": [{"index": e.index, "timestamp": iso(e.at), "level": e.level, "message": e.message}
                        for e in entries]}})


def _query_int(request: Request, key: str, default: int, maximum: int = ids.MAX_DB_ID) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    value = ids.count(raw, maximum=maximum)
    if value is None:
        raise errors.Invalid(f"{key} must be an integer between 0 and {maximum}.",
                             errors=[f"{key}: invalid"])
    return value


def _shape(body: dict[str, Any], cpu_key: str, memory_key: str) -> tuple[int, int]:
    """vCPUs and memory for a version, defaulted and checked against the sandbox limits."""
    from django.conf import settings

    from sandboxes.api.parsing import parse_shape

    cpu = _positive(body, cpu_key, settings.SANDBOX_FALLBACK_CPU)
    memory = _positive(body, memory_key, settings.SANDBOX_FALLBACK_MEMORY_MB)
    parse_shape({"cpu_count": cpu, "memory_mb": memory})
    return cpu, memory


class TemplateAliasView(ApiView):
    """`GET /v1/templates/aliases/{alias}`: 200 when visible (the SDK's `alias_exists`)."""

    @extend_schema(responses=ANY)
    def get(self, request: Request, alias: str) -> Response:
        template = selectors.template_by_id_or_alias(teams=teams_of_user(user=self.user), value=alias)
        return Response({"template": template_representation(template)})


class TemplateTagsView(ApiView):
    """`GET /v1/templates/{id_or_alias}/tags`: a bare JSON array, as the SDK requires."""

    @extend_schema(responses=ANY)
    def get(self, request: Request, template: str) -> Response:
        found = selectors.template_by_id_or_alias(teams=teams_of_user(user=self.user), value=template)
        return Response([{"tag": t.tag, "build_id": str(t.version_id), "created_at": iso(t.created_at)}
                         for t in found.tags.all()])


class TemplateTagAssignView(ApiView):
    """`POST /v1/templates/tags` assigns; `DELETE` (JSON body) removes."""

    @extend_schema(request=ANY, responses=ANY)
    def post(self, request: Request) -> Response:
        version = services.template_tags_assign(user=self.user, target=_text(request.data, "target"),
                                                tags=_tags(request.data.get("tags")))
        return Response({"build_id": str(version.pk),
                         "tags": sorted(t.tag for t in version.tags.all())})

    @extend_schema(request=ANY, responses={204: None})
    def delete(self, request: Request) -> Response:
        services.template_tags_remove(user=self.user, name=_text(request.data, "name"),
                                      tags=_tags(request.data.get("tags")))
        return Response(status=204)


def _build_info(version: TemplateVersion) -> dict[str, Any]:
    template = version.template
    return {"template_id": str(template.pk), "build_id": str(version.pk),
            "name": template.slug, "alias": template.slug, "tags": version.build_spec.get("tags", [])}


def _spec(body: dict[str, Any]) -> Any:
    """The request's build spec as sent (absent or null: an empty one); its shape is
    checked by the build, so `[]` is refused rather than read as `{}`."""
    spec = body.get("build_spec")
    return {} if spec is None else spec


def _positive(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.Invalid(f"{key} must be a positive integer.", errors=[f"{key}: invalid"])
    return value


class TemplateBuildView(ApiView):
    """`POST /v1/templates`: start a build (the SDK's `Template.build`)."""

    @extend_schema(request=ANY, responses={201: ANY})
    def post(self, request: Request) -> Response:
        from templates_app.builds import template_build_start

        body = request.data if isinstance(request.data, dict) else {}
        suggest.refuse_near_misses(body, BUILD_KEYS, meant=SHAPE_MEANT)
        name = _text(body, "name")
        if not BUILD_NAME.fullmatch(name):
            raise errors.Invalid("name must be 'alias' or 'alias:tag' in lowercase.",
                                 errors=["name: invalid"])
        cpu, memory = _shape(body, "cpu_count", "memory_mb")
        tags = _tags(body["tags"]) if body.get("tags") else []
        version = template_build_start(user=self.user, name=name, build_spec=_spec(body),
                                       cpu=cpu, memory_mb=memory, tags=tags,
                                       team_slug=team_param(request, body),
                                       skip_cache=body.get("skip_cache") is True)
        return Response({"template_build": _build_info(version)}, status=201)


class TemplateBuildStatusView(ApiView):
    """`GET /v1/templates/{tid}/builds/{bid}/status?logs_offset=N` (no envelope)."""

    @extend_schema(responses=ANY)
    def get(self, request: Request, template_id: str, build_id: str) -> Response:
        from templates_app.builds import build_log_entries, template_build_get

        version = template_build_get(user=self.user, template_id=template_id, build_id=build_id)
        offset = ids.count(request.query_params.get("logs_offset", "0"), maximum=MAX_LOG_INDEX) or 0
        entries = [{"timestamp": iso(e.at), "level": e.level, "message": e.message}
                   for e in build_log_entries(version=version, offset=offset)]
        status = SDK_STATUS[version.status]
        reason = ({"message": version.last_error_message or "build failed", "log_entries": entries[-20:]}
                  if status == "error" else None)
        return Response({"template_id": str(version.template_id), "build_id": str(version.pk),
                         "status": status, "log_entries": entries,
                         "logs": [e["message"] for e in entries], "reason": reason})

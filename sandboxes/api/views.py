"""Sandbox control-plane endpoints: parse, call one service or selector, render."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes import selectors, services
from sandboxes.api.parsing import parse_create, parse_file_url, parse_timeout_body
from sandboxes.api.serializers import (
    SandboxLimitsSerializer,
    SandboxSerializer,
    SessionSerializer,
    sandbox_representation,
    session_representation,
)
from sandboxes.edge.routing import AGENT_PORT
from sandboxes.edge.signing import file_url_make, ttl_pick
from sandboxes.filters import STATE_CHOICES, SandboxFilter
from sandboxes.models import Sandbox, SandboxState
from sandboxes.runtime import vm
from sandboxes.sessions import Session
from teams.selectors import team_for_read, teams_for_list
from watasu import errors, ids
from watasu.api.pagination import NextTokenPagination
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView, team_param
from watasu.filtering import filter_or_refuse

TEAM = OpenApiParameter("team", str, description="Team slug; default: personal team")
SANDBOX_ENVELOPE = object_envelope("SandboxEnvelope", "sandbox", SandboxSerializer())
SESSION_ENVELOPE = inline_serializer("SandboxWithSession", {
    "sandbox": SandboxSerializer(), "session": SessionSerializer()})


def _with_session(sandbox: Sandbox, session: Session, status: int = 200) -> Response:
    return Response({"sandbox": sandbox_representation(sandbox),
                     "session": session_representation(session)}, status=status)


def _one(sandbox: Sandbox) -> Response:
    return Response({"sandbox": sandbox_representation(sandbox)})


class SandboxLimitsView(ApiView):
    """`GET /v1/sandbox_limits`: allowed shapes, prices and the team's quota."""

    @extend_schema(parameters=[TEAM], responses=SandboxLimitsSerializer)
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response(selectors.sandbox_limits(team=team))


class SandboxListView(ApiView):
    envelope = "sandboxes"

    @extend_schema(
        operation_id="sandboxes_list",
        parameters=[TEAM, OpenApiParameter("query[state][]", str, many=True,
                                           enum=[value for value, _ in STATE_CHOICES],
                                           description="State or alias; repeatable"),
                    OpenApiParameter("query[metadata][key]", str,
                                     description="Exact match on a metadata key (repeatable)")],
        responses=list_envelope("SandboxList", "sandboxes", SandboxSerializer()),
    )
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        queryset = filter_or_refuse(SandboxFilter.from_sdk_query(
            request.query_params, selectors.sandboxes_of_teams(teams=teams)))
        paginator = NextTokenPagination()
        page = paginator.paginate_queryset(queryset, request, view=self)
        return paginator.get_paginated_response([sandbox_representation(s) for s in page])

    @extend_schema(request=inline_serializer("SandboxCreate", {
        "template": serializers.CharField(required=False),
        "timeout": serializers.IntegerField(required=False),
        "metadata": serializers.DictField(required=False),
        "envs": serializers.DictField(required=False),
        "lifecycle": serializers.DictField(required=False),
        "team": serializers.CharField(required=False)}), responses={201: SESSION_ENVELOPE})
    def post(self, request: Request) -> Response:
        sandbox, session = services.sandbox_create(user=self.user, spec=parse_create(request.data))
        return _with_session(sandbox, session, status=201)


class _SandboxView(ApiView):
    # Looks up the sandbox of the path. Not a route: each route view declares only its own
    # methods (inheriting a route view's get/delete once made DELETE .../pause destroy).

    def sandbox(self, sandbox_id: str, *, write: bool = False) -> Sandbox:
        return selectors.sandbox_get(user=self.user, sandbox_id=sandbox_id, write=write)


class SandboxDetailView(_SandboxView):
    @extend_schema(responses=SANDBOX_ENVELOPE)
    def get(self, request: Request, sandbox_id: str) -> Response:
        return _one(self.sandbox(sandbox_id))

    @extend_schema(responses=SANDBOX_ENVELOPE)
    def delete(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        return _one(services.sandbox_destroy(sandbox=sandbox))


class SandboxPauseView(_SandboxView):
    @extend_schema(request=None, responses=SANDBOX_ENVELOPE)
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        return _one(services.sandbox_pause(sandbox=sandbox))


class SandboxResumeView(_SandboxView):
    @extend_schema(request=inline_serializer("ResumeBody", {
        "timeout": serializers.IntegerField(required=False)}), responses=SESSION_ENVELOPE)
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        timeout = parse_timeout_body(request.data, required=False)
        return _with_session(*services.sandbox_resume(sandbox=sandbox, timeout=timeout))


class SandboxTimeoutView(_SandboxView):
    @extend_schema(request=inline_serializer("TimeoutBody", {
        "timeout": serializers.IntegerField()}), responses=SANDBOX_ENVELOPE)
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        timeout = parse_timeout_body(request.data, required=True)
        return _one(services.sandbox_set_timeout(sandbox=sandbox, timeout=timeout))


class SandboxMetricsView(_SandboxView):
    @extend_schema(parameters=[OpenApiParameter("start", int), OpenApiParameter("end", int)],
                   responses=inline_serializer("Metrics", {"metrics": serializers.ListField()}))
    def get(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        sample = vm.metrics(sandbox)
        return Response({"metrics": [sample] if sample else []})


class SandboxPortView(_SandboxView):
    @extend_schema(responses=inline_serializer("SandboxPortEnvelope", {
        "sandbox_port": serializers.DictField()}))
    def get(self, request: Request, sandbox_id: str, port: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        number = ids.count(port, maximum=65535)
        if not number:
            raise errors.Invalid("port must be between 1 and 65535.", code="validation_failed")
        if number == AGENT_PORT:
            raise errors.Invalid(f"Port {AGENT_PORT} is the platform's agent in the sandbox; a preview "
                                 "serves any other port.", code="port_reserved")
        if sandbox.state == SandboxState.DESTROYED:
            raise services.sandbox_gone(sandbox.pk)
        return Response({"sandbox_port": selectors.sandbox_port(sandbox=sandbox, port=number)})


FILE_URL_REQUEST = inline_serializer("FileUrlRequest", {
    "path": serializers.CharField(),
    "user": serializers.CharField(required=False),
    "use_signature_expiration": serializers.IntegerField(required=False),
    "expires_in_seconds": serializers.IntegerField(required=False)})
FILE_URL_ENVELOPE = inline_serializer("FileUrlEnvelope", {"file_url": inline_serializer("FileUrl", {
    "method": serializers.CharField(), "path": serializers.CharField(), "url": serializers.URLField(),
    "expires_at": serializers.DateTimeField()})})


class _FileUrlView(_SandboxView):
    """A URL on the sandbox's data plane that reads or writes one file without a header (spec 3.11).

    TTL: the smaller of `use_signature_expiration` and `expires_in_seconds`,
    300 s by default, at most 24 h.
    """

    operation = "read"

    @extend_schema(request=FILE_URL_REQUEST, responses=FILE_URL_ENVELOPE)
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        if sandbox.state == SandboxState.DESTROYED:
            raise services.sandbox_gone(sandbox.pk)
        path, signature_ttl, expires_in = parse_file_url(request.data)
        url = file_url_make(sandbox, path=path, op=self.operation, ttl=ttl_pick(signature_ttl, expires_in))
        return Response({"file_url": url.as_dict()})


class SandboxUploadUrlView(_FileUrlView):
    operation = "write"


class SandboxDownloadUrlView(_FileUrlView):
    """A download URL needs a write key too: it reads any file as root, `/proc/*/environ`
    (the sandbox's secrets) included, and works for anyone holding the URL. Read keys
    read the control plane, never the inside of a sandbox."""

    operation = "read"

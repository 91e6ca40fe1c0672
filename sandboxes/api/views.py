"""Sandbox control-plane endpoints: parse, call one service or selector, render."""

from __future__ import annotations

import dataclasses

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes import selectors, services
from sandboxes.api.requests import (
    FileUrlRequestSerializer,
    NetworkUpdateSerializer,
    SandboxCreateSerializer,
    TimeoutRequestSerializer,
)
from sandboxes.api.serializers import (
    SandboxLimitsSerializer,
    SandboxPortSerializer,
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
from teams.models import User
from teams.selectors import team_for_read, teams_for_list
from teams.services import audit_record
from watasu import errors, ids
from watasu.api.pagination import NextTokenPagination
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView, team_param
from watasu.filtering import filter_or_refuse

TEAM = OpenApiParameter("team", str, description="Team slug; default: personal team")
SANDBOX_ENVELOPE = object_envelope("SandboxEnvelope", "sandbox", SandboxSerializer())
SESSION_ENVELOPE = inline_serializer(
    "SandboxWithSession", {"sandbox": SandboxSerializer(), "session": SessionSerializer()}
)


def _with_session(sandbox: Sandbox, session: Session, status: int = 200) -> Response:
    return Response(
        {"sandbox": sandbox_representation(sandbox), "session": session_representation(session)},
        status=status,
    )


def _one(sandbox: Sandbox) -> Response:
    return Response({"sandbox": sandbox_representation(sandbox)})


class SandboxLimitsView(ApiView):
    """`GET /v1/sandbox_limits`: allowed shapes, prices and the team's quota."""

    @extend_schema(
        summary="Sandbox limits",
        description="The shapes a create may ask for (vCPUs, "
        "memory, timeout), the default shape, prices and the team's quota and usage.",
        parameters=[TEAM],
        responses=SandboxLimitsSerializer,
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response(selectors.sandbox_limits(team=team))


class SandboxListView(ApiView):
    envelope = "sandboxes"

    @extend_schema(
        operation_id="sandboxes_list",
        summary="List sandboxes",
        description="Sandboxes of your teams (or of `team`), newest first, all but destroyed ones "
        "unless `query[state][]` names states; `query[metadata][<key>]=<value>` matches metadata exactly.",
        parameters=[
            TEAM,
            OpenApiParameter(
                "query[state][]",
                str,
                many=True,
                enum=[value for value, _ in STATE_CHOICES],
                description="State or alias; repeatable",
            ),
            OpenApiParameter(
                "query[metadata][key]", str, description="Exact match on a metadata key (repeatable)"
            ),
        ],
        responses=list_envelope("SandboxList", "sandboxes", SandboxSerializer()),
    )
    def get(self, request: Request) -> Response:
        teams = teams_for_list(user=self.user, slug=request.query_params.get("team"))
        queryset = filter_or_refuse(
            SandboxFilter.from_sdk_query(request.query_params, selectors.sandboxes_of_teams(teams=teams))
        )
        paginator = NextTokenPagination()
        page = paginator.paginate_queryset(queryset, request, view=self)
        return paginator.get_paginated_response([sandbox_representation(s) for s in page])

    @extend_schema(
        summary="Create a sandbox",
        description="Starts a sandbox from a template (default `base`) and returns it with a "
        "data-plane session once it is usable. Unknown top-level keys are ignored, but a "
        "near-miss of a known one (`timeuot`) is a 422 `unknown_field`.",
        request=SandboxCreateSerializer,
        responses={201: SESSION_ENVELOPE},
    )
    def post(self, request: Request) -> Response:
        body = SandboxCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        spec, in_query = body.spec(), request.query_params.get("team")
        if in_query and spec.team and in_query != spec.team:
            message = f"team is {spec.team!r} in the body and {in_query!r} in the query: name one team."
            raise errors.Invalid(message, errors=[message])
        if in_query and not spec.team:  # the query names the team as on every other route
            spec = dataclasses.replace(spec, team=in_query)
        sandbox, session = services.sandbox_create(user=self.user, spec=spec)
        _audit(self.user, sandbox, "sandbox.create", template=sandbox.template_id)
        return _with_session(sandbox, session, status=201)


def _audit(user: User, sandbox: Sandbox, action: str, **detail: object) -> None:
    audit_record(team=sandbox.team, actor=user, action=action, target=sandbox.pk, source="api", **detail)


def _timeout(request: Request, *, required: bool) -> int | None:
    body = TimeoutRequestSerializer(data=request.data, context={"required": required})
    body.is_valid(raise_exception=True)
    return body.validated_data.get("timeout")


class _SandboxView(ApiView):
    # Looks up the sandbox of the path. Not a route: each route view declares only its own
    # methods (inheriting a route view's get/delete once made DELETE .../pause destroy).

    def sandbox(self, sandbox_id: str, *, write: bool = False) -> Sandbox:
        return selectors.sandbox_get(user=self.user, sandbox_id=sandbox_id, write=write)


class SandboxDetailView(_SandboxView):
    @extend_schema(
        summary="Get a sandbox",
        description="One sandbox of your teams, destroyed ones included while their record is kept.",
        responses=SANDBOX_ENVELOPE,
    )
    def get(self, request: Request, sandbox_id: str) -> Response:
        return _one(self.sandbox(sandbox_id))

    @extend_schema(
        summary="Destroy a sandbox",
        description="Removes the VM and its disk; destroying a destroyed sandbox again is a 200.",
        responses=SANDBOX_ENVELOPE,
    )
    def delete(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        destroyed = services.sandbox_destroy(sandbox=sandbox)
        _audit(self.user, sandbox, "sandbox.kill")
        return _one(destroyed)


class SandboxPauseView(_SandboxView):
    @extend_schema(
        summary="Pause a sandbox",
        description="Saves the VM's memory and disk "
        "(processes survive); `stop` is the same. Resume or connect brings it back.",
        request=None,
        responses=SANDBOX_ENVELOPE,
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        paused = services.sandbox_pause(sandbox=sandbox)
        _audit(self.user, sandbox, "sandbox.pause")
        return _one(paused)


class SandboxResumeView(_SandboxView):
    @extend_schema(
        summary="Resume or connect to a sandbox",
        description="Resumes a paused sandbox (deadline: now + `timeout`, else its own "
        "timeout) or, for a running one, only ever extends its deadline; returns a new "
        "data-plane session.",
        request=TimeoutRequestSerializer,
        responses=SESSION_ENVELOPE,
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        timeout = _timeout(request, required=False)
        was = sandbox.state
        resumed, session = services.sandbox_resume(sandbox=sandbox, timeout=timeout)
        if was != resumed.state:  # connecting to a running sandbox changes nothing worth a line
            _audit(self.user, sandbox, "sandbox.resume")
        return _with_session(resumed, session)


class SandboxTimeoutView(_SandboxView):
    @extend_schema(
        summary="Set a sandbox's timeout",
        description="Sets the deadline to now + `timeout` seconds (shorter or longer) and "
        "the sandbox's `timeout` to it.",
        request=TimeoutRequestSerializer,
        responses=SANDBOX_ENVELOPE,
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        timeout = _timeout(request, required=True)
        changed = services.sandbox_set_timeout(sandbox=sandbox, timeout=timeout)
        _audit(self.user, sandbox, "sandbox.timeout", timeout=timeout)
        return _one(changed)


class SandboxNetworkView(_SandboxView):
    @extend_schema(
        summary="Replace a sandbox's network policy",
        description="The whole policy (keys left out take their defaults; unknown keys are "
        "ignored). Enforced on a running sandbox within a second, without restarting it; on a "
        "paused one at its resume. `network_policy_in_force` says whether the host enforces it yet.",
        request=NetworkUpdateSerializer,
        responses=SANDBOX_ENVELOPE,
    )
    def put(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        body = NetworkUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        return _one(
            services.sandbox_set_network(sandbox=sandbox, policy=data["policy"], headers=data["headers"])
        )


class SandboxMetricsView(_SandboxView):
    @extend_schema(
        summary="Sandbox metrics",
        description="The VM's current CPU and memory sample (empty without a running VM).",
        parameters=[
            OpenApiParameter("start", int, description="Accepted; one sample is kept"),
            OpenApiParameter("end", int, description="Accepted; one sample is kept"),
        ],
        responses=inline_serializer(
            "Metrics", {"metrics": serializers.ListField(child=serializers.DictField())}
        ),
    )
    def get(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        sample = vm.metrics(sandbox)
        return Response({"metrics": [sample] if sample else []})


class SandboxPortView(_SandboxView):
    @extend_schema(
        summary="Preview a port",
        description="Where a server listening on `port` inside the sandbox is reachable: "
        "`url` (an origin of its own) and `path_url` (on the platform's origin). Any port "
        "but the agent's own.",
        responses=object_envelope("SandboxPortEnvelope", "sandbox_port", SandboxPortSerializer()),
    )
    def get(self, request: Request, sandbox_id: str, port: str) -> Response:
        sandbox = self.sandbox(sandbox_id)
        number = ids.count(port, maximum=65535)
        if not number:
            raise errors.Invalid("port must be between 1 and 65535.", code="validation_failed")
        if number == AGENT_PORT:
            raise errors.Invalid(
                f"Port {AGENT_PORT} is the platform's agent in the sandbox; a preview serves any other port.",
                code="port_reserved",
            )
        if sandbox.state == SandboxState.DESTROYED:
            raise services.sandbox_gone(sandbox.pk)
        return Response({"sandbox_port": selectors.sandbox_port(sandbox=sandbox, port=number)})


FILE_URL_ENVELOPE = inline_serializer(
    "FileUrlEnvelope",
    {
        "file_url": inline_serializer(
            "FileUrl",
            {
                "method": serializers.CharField(),
                "path": serializers.CharField(),
                "url": serializers.URLField(),
                "expires_at": serializers.DateTimeField(),
            },
        )
    },
)


class _FileUrlView(_SandboxView):
    """A URL on the sandbox's data plane that reads or writes one file without a header (spec 3.11).

    TTL: the smaller of `use_signature_expiration` and `expires_in_seconds`,
    300 s by default, at most 24 h.
    """

    operation = "read"

    def post(self, request: Request, sandbox_id: str) -> Response:
        sandbox = self.sandbox(sandbox_id, write=True)
        if sandbox.state == SandboxState.DESTROYED:
            raise services.sandbox_gone(sandbox.pk)
        body = FileUrlRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ttl = ttl_pick(
            body.validated_data.get("use_signature_expiration"), body.validated_data.get("expires_in_seconds")
        )
        url = file_url_make(sandbox, path=body.validated_data["path"], op=self.operation, ttl=ttl)
        return Response({"file_url": url.as_dict()})


class SandboxUploadUrlView(_FileUrlView):
    operation = "write"

    @extend_schema(
        summary="Signed upload URL",
        description="A URL that writes one file of the sandbox without a header (POST or "
        "PUT the bytes, or a multipart form), valid for the smaller of the two TTLs, "
        "300 s by default, at most 24 h.",
        request=FileUrlRequestSerializer,
        responses=FILE_URL_ENVELOPE,
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        return super().post(request, sandbox_id)


class SandboxDownloadUrlView(_FileUrlView):
    """A download URL needs a write key too: it reads any file as root, `/proc/*/environ`
    (the sandbox's secrets) included, and works for anyone holding the URL. Read keys
    read the control plane, never the inside of a sandbox."""

    operation = "read"

    @extend_schema(
        summary="Signed download URL",
        description="A URL that reads one file of the sandbox without a header (needs a "
        "write key: it reads any file), valid for the smaller of the two TTLs, 300 s by "
        "default, at most 24 h.",
        request=FileUrlRequestSerializer,
        responses=FILE_URL_ENVELOPE,
    )
    def post(self, request: Request, sandbox_id: str) -> Response:
        return super().post(request, sandbox_id)

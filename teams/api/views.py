"""Team and API key endpoints."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from teams import selectors, services
from teams.api.serializers import (
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    TeamCreateSerializer,
    TeamSerializer,
)
from teams.filters import ApiKeyFilter, TeamFilter
from teams.models import ApiKey, User
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView
from watasu.filtering import filter_or_refuse, openapi_parameters


class TeamListView(ApiView):
    envelope = "teams"

    @extend_schema(
        operation_id="teams_list",
        summary="List your teams",
        description="The teams you belong to, your personal team included, newest first.",
        parameters=openapi_parameters(TeamFilter),
        responses=list_envelope("TeamList", "teams", TeamSerializer()),
    )
    def get(self, request: Request) -> Response:
        teams = filter_or_refuse(
            TeamFilter(request.query_params, queryset=selectors.teams_of_user(user=self.user))
        )
        return self.paginated(teams, TeamSerializer)

    @extend_schema(
        summary="Create a team",
        description="A new team owned by you (409 when the slug is taken).",
        request=TeamCreateSerializer,
        responses={201: object_envelope("TeamEnvelope", "team", TeamSerializer())},
    )
    def post(self, request: Request) -> Response:
        body = TeamCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        team = services.team_create(owner=self.user, **body.validated_data)
        services.audit_record(
            team=team, actor=self.user, action="team.create", target=team.slug, source="api"
        )
        return Response({"team": TeamSerializer(team).data}, status=201)


class TeamDetailView(ApiView):
    @extend_schema(
        summary="Get a team",
        description="One team you belong to, by slug.",
        responses=object_envelope("TeamDetail", "team", TeamSerializer()),
    )
    def get(self, request: Request, slug: str) -> Response:
        team = selectors.team_for_read(user=self.user, slug=slug)
        return Response({"team": TeamSerializer(team).data})


class ApiKeyListView(ApiView):
    envelope = "api_keys"

    @extend_schema(
        operation_id="api_keys_list",
        summary="List your API keys",
        description="Your keys, revoked ones included, newest first; never the keys "
        "themselves, only their prefix.",
        parameters=openapi_parameters(ApiKeyFilter),
        responses=list_envelope("ApiKeyList", "api_keys", ApiKeySerializer()),
    )
    def get(self, request: Request) -> Response:
        keys = filter_or_refuse(
            ApiKeyFilter(request.query_params, queryset=selectors.api_keys_of_user(user=self.user))
        )
        return self.paginated(keys, ApiKeySerializer)

    @extend_schema(
        summary="Create an API key",
        description="A new key of yours (write scope unless `scope` says read); the key itself is "
        "in the response once and never again.",
        request=ApiKeyCreateSerializer,
        responses={
            201: inline_serializer(
                "ApiKeyCreated",
                {"api_key": ApiKeySerializer(), "key": serializers.CharField(help_text="shown once")},
            )
        },
    )
    def post(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        key, raw = services.api_key_create(user=self.user, **body.validated_data)
        _audit_key(self.user, "api_key.create", key)
        return Response({"api_key": ApiKeySerializer(key).data, "key": raw}, status=201)


class ApiKeyDetailView(ApiView):
    @extend_schema(
        summary="Get an API key",
        description="One of your keys, by id.",
        responses=object_envelope("ApiKeyDetail", "api_key", ApiKeySerializer()),
    )
    def get(self, request: Request, key_id: str) -> Response:
        key = selectors.api_key_of_user(user=self.user, key_id=key_id)
        return Response({"api_key": ApiKeySerializer(key).data})

    @extend_schema(
        summary="Revoke an API key",
        description="Revokes one of your keys at once; the record stays, with `revoked_at` set.",
        responses=object_envelope("ApiKeyRevoked", "api_key", ApiKeySerializer()),
    )
    def delete(self, request: Request, key_id: str) -> Response:
        key = selectors.api_key_of_user(user=self.user, key_id=key_id)
        already = key.revoked_at is not None
        services.api_key_revoke(api_key=key)
        if not already:
            _audit_key(self.user, "api_key.revoke", key)
        return Response({"api_key": ApiKeySerializer(key).data})


def _audit_key(user: User, action: str, key: ApiKey) -> None:
    """Keys are the user's, not a team's: their events go to the user's personal team log."""
    services.audit_record(
        team=services.personal_team_ensure(user=user),
        actor=user,
        action=action,
        target=f"{key.prefix}… {key.name}".strip(),
        source="api",
        scope=key.scope,
    )

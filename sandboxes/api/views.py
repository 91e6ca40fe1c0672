"""Sandbox control-plane endpoints."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from sandboxes.api.serializers import SandboxLimitsSerializer
from sandboxes.selectors import sandbox_limits
from teams.selectors import team_for_read
from watasu.api.views import ApiView, team_param


class SandboxLimitsView(ApiView):
    """`GET /v1/sandbox_limits`: allowed shapes, prices and the team's quota."""

    @extend_schema(
        parameters=[OpenApiParameter("team", str, description="Team slug; default: personal team")],
        responses=SandboxLimitsSerializer,
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response(sandbox_limits(team=team))

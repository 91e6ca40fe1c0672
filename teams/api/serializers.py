"""Serializers for teams and API keys."""

from __future__ import annotations

from rest_framework import serializers

from teams.models import ApiKey, Scope, Team
from watasu.api.fields import ClosedSerializer, FullMatchField, NameField


class TeamSerializer(serializers.ModelSerializer[Team]):
    personal = serializers.SerializerMethodField()

    class Meta:
        model = Team
        fields = ["id", "slug", "name", "personal", "created_at"]

    def get_personal(self, team: Team) -> bool:
        return team.personal_for_id is not None


class TeamCreateSerializer(ClosedSerializer):
    """A new team, owned by the caller. Unknown fields are a 422."""

    slug = FullMatchField(
        r"[-a-zA-Z0-9_]+",
        max_length=63,
        message="Enter a valid “slug” consisting of letters, numbers, underscores or hyphens.",
    )
    name = NameField(max_length=200, required=False, allow_blank=True)


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    revoked = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "scope",
            "created_at",
            "last_used_at",
            "expires_at",
            "revoked_at",
            "revoked",
        ]

    def get_revoked(self, key: ApiKey) -> bool:
        return key.revoked_at is not None


class ApiKeyCreateSerializer(ClosedSerializer):
    """A new API key (write scope unless `scope` says read). Unknown fields are a 422."""

    name = NameField(max_length=100, required=False, allow_blank=True, default="")
    scope = serializers.ChoiceField(choices=Scope.choices, default=Scope.WRITE)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)

"""`create_api_key --email E --team SLUG --scope read|write`: prints only the key.

Creates the user (with a personal team) and the team when missing; the user
becomes the owner of a team it creates, a member of an existing one.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email, validate_slug
from django.db import transaction

from teams.models import Role, Scope, Team
from teams.services import api_key_create, membership_ensure, team_create, user_get_or_create
from watasu.errors import DomainError


class Command(BaseCommand):
    help = "Create an API key (creating the user and team when missing); prints only the key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True)
        parser.add_argument("--team", required=True, help="team slug")
        parser.add_argument("--scope", choices=Scope.values, default=Scope.WRITE)
        parser.add_argument("--name", default="", help="label shown in key listings")

    def handle(self, *args: Any, email: str, team: str, scope: str, name: str, **_: Any) -> None:
        try:
            validate_email(email)
            validate_slug(team)
        except Exception as exc:  # ValidationError carries a list of messages
            raise CommandError("; ".join(getattr(exc, "messages", [str(exc)]))) from None
        try:
            raw = self._create(email, team, scope, name)
        except DomainError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(raw)

    @transaction.atomic
    def _create(self, email: str, slug: str, scope: str, name: str) -> str:
        user = user_get_or_create(email=email)
        team = Team.objects.filter(slug=slug).first()
        if team is None:
            team = team_create(owner=user, slug=slug)
        else:
            membership_ensure(user=user, team=team, role=Role.MEMBER)
        _, raw = api_key_create(user=user, scope=scope, name=name or f"cli ({slug})")
        return raw

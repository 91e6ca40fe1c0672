"""Writes for users, teams, memberships and API keys."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from billing.services import accounts_ensure
from teams.models import ApiKey, AuditEvent, IdempotencyRecord, Membership, Role, Scope, Team, User
from watasu import errors

API_KEY_PREFIX = "wsk_"
_VISIBLE_PREFIX_LENGTH = len(API_KEY_PREFIX) + 8


def api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def _unique_slug(base: str) -> str:
    slug = slugify(base)[:50].strip("-") or "team"
    if not Team.objects.filter(slug=slug).exists():
        return slug
    return f"{slug}-{secrets.token_hex(3)}"


def team_create(*, owner: User, slug: str, name: str = "") -> Team:
    """Create a team with `owner` as its owner; a taken slug is a conflict.

    A user owns at most `MAX_TEAMS_PER_USER` teams besides the personal one (each team
    brings a full sandbox quota, so the cap bounds what one user can hold on the
    hosts); counted under the user's row lock, so concurrent creates cannot pass it.
    """
    try:
        with transaction.atomic():
            User.objects.select_for_update().filter(pk=owner.pk).first()
            owned = Membership.objects.filter(user=owner, role=Role.OWNER, team__personal_for=None).count()
            if owned >= settings.MAX_TEAMS_PER_USER:
                raise errors.Invalid(
                    f"You already own {owned} teams, the most one user may own "
                    f"({settings.MAX_TEAMS_PER_USER}).",
                    code="team_quota_exceeded",
                )
            team = Team.objects.create(slug=slug, name=name or slug)
            Membership.objects.create(user=owner, team=team, role=Role.OWNER)
            accounts_ensure(team_ids=[team.pk])
    except IntegrityError:
        raise errors.Conflict(f"A team with slug '{slug}' already exists.", code="already_exists") from None
    return team


def personal_team_ensure(*, user: User) -> Team:
    """The user's personal team, created (with the user as owner) when missing."""
    existing = Team.objects.filter(personal_for=user).first()
    return existing or _personal_team_create(user)


def _personal_team_create(user: User) -> Team:
    for _ in range(5):
        try:
            with transaction.atomic():
                team = Team.objects.create(
                    slug=_unique_slug(user.email.split("@")[0]),
                    name=f"{user.email} (personal)",
                    personal_for=user,
                )
                Membership.objects.create(user=user, team=team, role=Role.OWNER)
                accounts_ensure(team_ids=[team.pk], starting_credit=True)
                return team
        except IntegrityError:
            if Team.objects.filter(personal_for=user).exists():
                return Team.objects.get(personal_for=user)
    raise errors.Conflict("Could not allocate a slug for the personal team.")


def user_get_or_create(*, email: str) -> User:
    """The user with this email, created with a personal team when missing."""
    email = email.strip().lower()
    user = User.objects.filter(email=email).first()
    if user is None:
        try:
            with transaction.atomic():
                user = User.objects.create_user(email=email)
        except IntegrityError:
            user = User.objects.get(email=email)
    personal_team_ensure(user=user)
    return user


def membership_ensure(*, user: User, team: Team, role: str = Role.MEMBER) -> Membership:
    """Add `user` to `team` with `role` unless already a member (roles are kept)."""
    membership, _ = Membership.objects.get_or_create(user=user, team=team, defaults={"role": role})
    return membership


def api_key_create(
    *, user: User, scope: str = Scope.WRITE, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and never stored."""
    if scope not in Scope.values:
        raise errors.Invalid(f"scope must be one of {', '.join(Scope.values)}.")
    if expires_at is not None and expires_at <= timezone.now():
        raise errors.Invalid("expires_at must be in the future.")
    raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        user=user,
        scope=scope,
        name=name,
        expires_at=expires_at,
        prefix=raw[:_VISIBLE_PREFIX_LENGTH],
        key_hash=api_key_hash(raw),
    )
    return key, raw


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key; revoking twice keeps the first revocation time."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])
    return api_key


def api_key_authenticate(*, raw_key: str) -> ApiKey | None:
    """The live key matching `raw_key`, with its user; records the use.

    `last_used_at` is written at most once per resolution window, with a
    conditional update, so authenticating is not a write on every request.
    """
    now = timezone.now()
    key = (
        ApiKey.objects.select_related("user")
        .filter(key_hash=api_key_hash(raw_key), revoked_at__isnull=True, user__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    if key is None:
        return None
    stale = now - timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_SECONDS)
    if key.last_used_at is None or key.last_used_at < stale:
        ApiKey.objects.filter(pk=key.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale)
        ).update(last_used_at=now)
        key.last_used_at = now
    return key


def idempotency_records_expire(now: datetime) -> dict[str, int | bool]:
    """Delete expired idempotency records, a batch at a time (the retention sweep's part
    for this app; "more" when the batch came back full)."""
    batch = settings.SWEEP_BATCH_SIZE
    expired = IdempotencyRecord.objects.filter(
        pk__in=list(IdempotencyRecord.objects.filter(expires_at__lt=now).values_list("pk", flat=True)[:batch])
    ).delete()[0]
    return {"idempotency_records": expired, "more": expired == batch}


def audit_record(
    *, team: Team, actor: User | None, action: str, target: object = "", source: str = "api", **detail: object
) -> AuditEvent:
    """Add one line to the team's audit log (member, key and sandbox actions)."""
    return AuditEvent.objects.create(
        team=team,
        actor=actor if actor is not None and actor.pk else None,
        actor_email=actor.email if actor is not None else "",
        action=action,
        target=str(target)[:200],
        detail=detail,
        source=source,
    )

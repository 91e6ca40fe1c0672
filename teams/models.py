"""Users, teams, memberships, API keys and idempotency records."""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.db import models


class UserManager(BaseUserManager["User"]):
    """Users are identified by email; there is no username."""

    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **fields: Any) -> User:
        from teams.services import personal_team_ensure  # services import this module

        user = self.model(email=self.normalize_email(email).lower(), **fields)
        user.set_password(password)
        user.save(using=self._db)
        personal_team_ensure(user=user)
        return user

    def create_superuser(self, email: str, password: str | None = None, **fields: Any) -> User:
        fields.update(is_staff=True, is_superuser=True)
        return self.create_user(email, password, **fields)


class User(AbstractUser):
    """A person (or automation account) who belongs to teams and owns API keys."""

    username = None  # type: ignore[assignment]
    email = models.EmailField(unique=True)

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []
    objects = UserManager()  # type: ignore[misc]

    def __str__(self) -> str:
        return self.email


class Team(models.Model):
    """The owner of sandboxes, templates, volumes and the prepaid balance.

    Every user has exactly one personal team (`personal_for`). Quota columns
    left empty use the platform defaults from settings.
    """

    slug = models.SlugField(max_length=63, unique=True)
    name = models.CharField(max_length=200)
    personal_for = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="personal_team",
    )
    max_running_instances = models.PositiveIntegerField(null=True, blank=True)
    max_vcpu_count = models.PositiveIntegerField(null=True, blank=True)
    max_memory_mb = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Role(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


# Roles allowed to change a team's resources (sandboxes, templates, volumes).
WRITER_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER})


class Membership(models.Model):
    """A user's role in a team."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "team"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class Scope(models.TextChoices):
    READ = "read"
    WRITE = "write"


class ApiKey(models.Model):
    """A user's bearer credential for the control plane.

    Only a SHA-256 of the key is stored (keys are 256-bit random, so a fast
    hash is enough); `prefix` is the short visible part shown in listings.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.WRITE)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.scope}) of {self.user_id}"

    @property
    def can_write(self) -> bool:
        return self.scope == Scope.WRITE


class IdempotencyState(models.TextChoices):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class IdempotencyRecord(models.Model):
    """The first response to a mutating request carrying an Idempotency-Key.

    The unique (api_key, key) constraint is what makes concurrent retries safe:
    exactly one request inserts the row and does the work; the others read it.
    """

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    state = models.CharField(
        max_length=16, choices=IdempotencyState.choices, default=IdempotencyState.IN_PROGRESS
    )
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.BinaryField(null=True, blank=True)
    response_content_type = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    lease_expires_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "key"], name="idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.state})"


class AuditEvent(models.Model):
    """Who did what to a team's members, keys and sandboxes, from the API or the dashboard.

    Rows are only ever added. `actor` is kept as text too (`actor_email`), so the log
    still reads after a user is deleted.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="audit_events")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_email = models.CharField(max_length=254, blank=True)
    action = models.CharField(max_length=64)  # e.g. "sandbox.pause", "member.role", "api_key.create"
    target = models.CharField(max_length=200, blank=True)  # e.g. the sandbox id or the member's email
    detail = models.JSONField(default=dict, blank=True)
    source = models.CharField(max_length=16, default="api")  # api | dashboard | admin | system
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["team", "-id"], name="audit_team_recent")]

    def __str__(self) -> str:
        return f"{self.actor_email or 'system'} {self.action} {self.target}"


class Invitation(models.Model):
    """An emailed offer to join a team with a role, accepted by the person with that email.

    Only a SHA-256 of the link's token is stored. At most one invitation per (team, email)
    is pending (neither accepted nor revoked); inviting again revokes the earlier one.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "email"],
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invitation_pending_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.team_id} ({self.role})"


class TotpDevice(models.Model):
    """A user's authenticator app (RFC 6238 TOTP), the second factor at sign-in.

    The base32 secret is encrypted at rest (watasu.crypto). Until `confirmed_at` is set
    (the user typed a code from the app) it is not asked for at sign-in. `last_used_step`
    is the time step of the last code accepted: a code is good once, never replayed.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="totp_device"
    )
    secret_encrypted = models.TextField()
    confirmed_at = models.DateTimeField(null=True, blank=True)
    last_used_step = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "TOTP device"

    def __str__(self) -> str:
        return f"TOTP of {self.user_id}{'' if self.confirmed_at else ' (unconfirmed)'}"

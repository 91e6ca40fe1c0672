"""Writes for users, teams, memberships and API keys."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from billing.models import Account
from billing.services import accounts_ensure, format_micros
from teams import totp
from teams.models import (
    ApiKey,
    AuditEvent,
    IdempotencyRecord,
    Invitation,
    Membership,
    Role,
    Scope,
    Team,
    TotpDevice,
    User,
)
from watasu import crypto, errors

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
    if not (name or slug).isprintable():
        raise errors.Invalid("A team's name may not contain line breaks or other control characters.")
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


# --- members -------------------------------------------------------------------------
# The rules, in one place: a team always has an owner; only owners make or unmake owners
# (so admins never touch an owner); a personal team's user stays its owner.

MANAGER_ROLES = (Role.OWNER, Role.ADMIN)


def _require_manager(actor: Membership) -> None:
    if actor.role not in MANAGER_ROLES:
        raise errors.Forbidden(f"Only owners and admins manage members; you are {actor.role}.")


def _locked_members(team: Team) -> dict[int, Membership]:
    """The team's memberships under row locks (in pk order), so two demotions of the last
    two owners cannot both see another owner left."""
    rows = Membership.objects.select_for_update().select_related("user").filter(team=team).order_by("pk")
    return {m.pk: m for m in rows}


def _other_owner_left(members: dict[int, Membership], leaving: Membership) -> bool:
    return any(m.role == Role.OWNER and m.pk != leaving.pk for m in members.values())


def _member(members: dict[int, Membership], membership_id: int) -> Membership:
    membership = members.get(membership_id)
    if membership is None:
        raise errors.NotFound("No such member in this team.", code="member_not_found")
    return membership


def _check_owner_change(team: Team, actor: Membership, target: Membership, new_role: str | None) -> None:
    if (target.role == Role.OWNER or new_role == Role.OWNER) and actor.role != Role.OWNER:
        raise errors.Forbidden("Only owners may make, change or remove owners.")
    if team.personal_for_id == target.user_id and new_role != Role.OWNER:
        raise errors.Invalid("The owner of a personal team stays its owner.", code="personal_team")


def membership_set_role(
    *, actor: User, team: Team, membership_id: int, role: str, source: str = "dashboard"
) -> Membership:
    """Change a member's role (owners and admins; see the rules above)."""
    if role not in Role.values:
        raise errors.Invalid(f"role must be one of {', '.join(Role.values)}.")
    with transaction.atomic():
        members = _locked_members(team)
        me = next((m for m in members.values() if m.user_id == actor.pk), None)
        if me is None:
            raise errors.NotFound("Team not found.", code="team_not_found")
        _require_manager(me)
        target = _member(members, membership_id)
        _check_owner_change(team, me, target, role)
        if target.role == role:
            return target
        if target.role == Role.OWNER and not _other_owner_left(members, target):
            raise errors.Conflict(
                "A team needs at least one owner; make someone else owner first.", code="last_owner"
            )
        before, target.role = target.role, role
        target.save(update_fields=["role"])
        audit_record(
            team=team,
            actor=actor,
            action="member.role",
            target=target.user.email,
            source=source,
            before=before,
            after=role,
        )
    return target


def membership_remove(*, actor: User, team: Team, membership_id: int, source: str = "dashboard") -> None:
    """Take a member out of the team (owners and admins; owners only for owners)."""
    with transaction.atomic():
        members = _locked_members(team)
        me = next((m for m in members.values() if m.user_id == actor.pk), None)
        if me is None:
            raise errors.NotFound("Team not found.", code="team_not_found")
        _require_manager(me)
        target = _member(members, membership_id)
        _check_owner_change(team, me, target, None)
        if target.role == Role.OWNER and not _other_owner_left(members, target):
            raise errors.Conflict(
                "A team needs at least one owner; make someone else owner first.", code="last_owner"
            )
        target.delete()
        audit_record(
            team=team,
            actor=actor,
            action="member.remove",
            target=target.user.email,
            source=source,
            role=target.role,
        )


def team_leave(*, user: User, team: Team, source: str = "dashboard") -> Membership:
    """Leave a team: never one's personal team, never as its last owner (the membership
    left is returned)."""
    if team.personal_for_id == user.pk:
        raise errors.Invalid("You cannot leave your personal team.", code="personal_team")
    with transaction.atomic():
        members = _locked_members(team)
        me = next((m for m in members.values() if m.user_id == user.pk), None)
        if me is None:
            raise errors.NotFound("Team not found.", code="team_not_found")
        if me.role == Role.OWNER and not _other_owner_left(members, me):
            raise errors.Conflict(
                "You are the team's last owner: make someone else owner, or delete the team.",
                code="last_owner",
            )
        me.delete()
        audit_record(
            team=team, actor=user, action="member.leave", target=user.email, source=source, role=me.role
        )
    return me


def team_delete(*, actor: User, team: Team, confirm_slug: str, source: str = "dashboard") -> str:
    """Delete a team: owners only, never a personal team, only once nothing runs or is
    stored in it, and only if billing lets it go (its ledger protects a team through which
    money moved; a balance left in it, either way, must be settled first).

    The deletion is recorded in the actor's personal team log (the team's own log goes
    with it).
    """
    from sandboxes.models import Sandbox, SandboxState  # sandboxes import teams
    from volumes.models import Volume

    if team.personal_for_id is not None:
        raise errors.Invalid("A personal team cannot be deleted.", code="personal_team")
    if confirm_slug.strip() != team.slug:
        raise errors.Invalid(f"Type the team's slug ({team.slug}) to confirm.", code="confirmation_mismatch")
    with transaction.atomic():
        locked = Team.objects.select_for_update().filter(pk=team.pk).first()
        if locked is None:
            raise errors.NotFound("Team not found.", code="team_not_found")
        role = Membership.objects.filter(team=team, user=actor).values_list("role", flat=True).first()
        if role != Role.OWNER:
            raise errors.Forbidden("Only the team's owners may delete it.")
        live = Sandbox.objects.filter(team=team).exclude(state=SandboxState.DESTROYED).count()
        if live:
            raise errors.Conflict(
                f"The team still has {live} sandbox(es); destroy them first.", code="team_not_empty"
            )
        if Volume.objects.filter(team=team).exists():
            raise errors.Conflict("The team still has volumes; delete them first.", code="team_not_empty")
        balance = Account.objects.filter(team=team).values_list("balance_micros", flat=True).first() or 0
        if balance:
            raise errors.Conflict(
                f"The team's balance is {format_micros(balance)} {settings.PRICE_CURRENCY}; "
                "billing keeps a team with money in it (or owed) until it is settled.",
                code="billing_refused",
            )
        try:
            with transaction.atomic():
                locked.delete()
        except ProtectedError:
            raise errors.Conflict(
                "Billing keeps this team: usage or payments were recorded against it, and that "
                "history must stay. Remove its members instead, or ask an operator.",
                code="billing_refused",
            ) from None
        audit_record(
            team=personal_team_ensure(user=actor),
            actor=actor,
            action="team.delete",
            target=team.slug,
            source=source,
        )
    return team.slug


# --- invitations -------------------------------------------------------------------------


def invitation_token_hash(raw_token: str) -> str:
    return hashlib.sha256(raw_token.encode()).hexdigest()


def invitation_create(
    *, actor: User, team: Team, email: str, role: str, source: str = "dashboard"
) -> tuple[Invitation, str]:
    """Invite `email` to `team` with `role` and mail them the link; the raw token is
    returned once and only its hash kept. Inviting the same email again replaces the
    pending invitation."""
    email = User.objects.normalize_email(email.strip()).lower()
    if role not in Role.values:
        raise errors.Invalid(f"role must be one of {', '.join(Role.values)}.")
    me = Membership.objects.filter(team=team, user=actor).values_list("role", flat=True).first()
    if me not in MANAGER_ROLES:
        raise errors.Forbidden("Only owners and admins invite people.")
    if role == Role.OWNER and me != Role.OWNER:
        raise errors.Forbidden("Only owners may invite owners.")
    if Membership.objects.filter(team=team, user__email=email).exists():
        raise errors.Conflict(f"{email} is already a member of this team.", code="already_member")
    raw = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        Invitation.objects.filter(team=team, email=email, accepted_at=None, revoked_at=None).update(
            revoked_at=now
        )
        invitation = Invitation.objects.create(
            team=team,
            email=email,
            role=role,
            invited_by=actor,
            token_hash=invitation_token_hash(raw),
            expires_at=now + timedelta(seconds=settings.INVITATION_TTL_SECONDS),
        )
        audit_record(
            team=team, actor=actor, action="invitation.create", target=email, source=source, role=role
        )
    try:
        _invitation_mail(invitation, raw)
    except OSError as exc:  # SMTP refused or unreachable: the invitation stands, invite again later
        raise errors.Unavailable(
            f"The invitation was saved but the mail to {email} could not be sent ({exc}); "
            "invite again later.",
            code="mail_failed",
        ) from exc
    return invitation, raw


def invitation_url(raw_token: str) -> str:
    return settings.PUBLIC_URL + reverse("dashboard:invitation", args=[raw_token])


def _invitation_mail(invitation: Invitation, raw_token: str) -> None:
    inviter = invitation.invited_by.email if invitation.invited_by else "Someone"
    expires = invitation.expires_at.strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"{inviter} invited you to the team {invitation.team.name} ({invitation.team.slug}) "
        f"on Watasu, as {invitation.role}.\n\nAccept it here (until {expires}):\n"
        f"{invitation_url(raw_token)}\n\nIf you did not expect this, ignore this mail.\n"
    )
    one_line = " ".join(invitation.team.name.split())  # a header never takes a line break
    send_mail(f"Join {one_line} on Watasu", body, settings.DEFAULT_FROM_EMAIL, [invitation.email])


def invitation_problem(invitation: Invitation, *, now: datetime | None = None) -> str | None:
    """Why the invitation can no longer be accepted, or None."""
    if invitation.accepted_at is not None:
        return "This invitation was already accepted."
    if invitation.revoked_at is not None:
        return "This invitation was withdrawn."
    if invitation.expires_at <= (now or timezone.now()):
        return "This invitation has expired; ask for a new one."
    return None


def invitation_revoke(
    *, actor: User, team: Team, invitation_id: int, source: str = "dashboard"
) -> Invitation:
    """Withdraw a pending invitation (owners and admins; an owner's invitation, owners only)."""
    me = Membership.objects.filter(team=team, user=actor).values_list("role", flat=True).first()
    if me not in MANAGER_ROLES:
        raise errors.Forbidden("Only owners and admins withdraw invitations.")
    invitation = Invitation.objects.filter(team=team, pk=invitation_id).first()
    if invitation is None:
        raise errors.NotFound("No such invitation.", code="invitation_not_found")
    if invitation.role == Role.OWNER and me != Role.OWNER:
        raise errors.Forbidden("Only owners may withdraw an invitation to be owner.")
    claimed = Invitation.objects.filter(pk=invitation.pk, accepted_at=None, revoked_at=None).update(
        revoked_at=timezone.now()
    )
    if not claimed:
        raise errors.Conflict("The invitation is no longer pending.", code="invitation_not_pending")
    invitation.refresh_from_db()
    audit_record(team=team, actor=actor, action="invitation.revoke", target=invitation.email, source=source)
    return invitation


def invitation_accept(*, user: User, raw_token: str, source: str = "dashboard") -> Membership:
    """Join the invitation's team as the signed-in user with the invited email.

    Claimed with a conditional update first, so a link is used once even when clicked
    twice at the same moment. A user who is already a member keeps their role.
    """
    invitation = (
        Invitation.objects.select_related("team").filter(token_hash=invitation_token_hash(raw_token)).first()
    )
    if invitation is None:
        raise errors.NotFound("There is no such invitation.", code="invitation_not_found")
    problem = invitation_problem(invitation)
    if problem:
        raise errors.Conflict(problem, code="invitation_not_pending")
    if user.email.lower() != invitation.email.lower():
        raise errors.Forbidden(
            f"This invitation is for {invitation.email}; you are signed in as {user.email}.",
            code="wrong_email",
        )
    now = timezone.now()
    with transaction.atomic():
        claimed = Invitation.objects.filter(
            pk=invitation.pk, accepted_at=None, revoked_at=None, expires_at__gt=now
        ).update(accepted_at=now, accepted_by=user)
        if not claimed:
            raise errors.Conflict("This invitation is no longer pending.", code="invitation_not_pending")
        membership = membership_ensure(user=user, team=invitation.team, role=invitation.role)
        audit_record(
            team=invitation.team,
            actor=user,
            action="invitation.accept",
            target=user.email,
            source=source,
            role=membership.role,
        )
    return membership


# --- second factor (TOTP) -----------------------------------------------------------------------


def totp_secret(device: TotpDevice) -> str:
    return crypto.decrypt_text(device.secret_encrypted)


def totp_start(*, user: User) -> TotpDevice:
    """A new, unconfirmed authenticator secret for `user` (replacing an unconfirmed one)."""
    with transaction.atomic():
        existing = TotpDevice.objects.select_for_update().filter(user=user).first()
        if existing is not None and existing.confirmed_at is not None:
            raise errors.Conflict("Two-factor sign-in is already on; turn it off first.", code="totp_enabled")
        secret = crypto.encrypt_text(totp.random_secret())
        device, _ = TotpDevice.objects.update_or_create(
            user=user, defaults={"secret_encrypted": secret, "confirmed_at": None, "last_used_step": None}
        )
    return device


def _totp_use(device: TotpDevice, code: str) -> bool:
    """Accept `code` once: the step it matched must be later than the last one used,
    claimed with a conditional update (a replayed or concurrent second use finds none)."""
    step = totp.matching_step(totp_secret(device), code)
    if step is None:
        return False
    return bool(
        TotpDevice.objects.filter(pk=device.pk)
        .filter(Q(last_used_step__isnull=True) | Q(last_used_step__lt=step))
        .update(last_used_step=step)
    )


def totp_confirm(*, user: User, code: str) -> TotpDevice:
    """Turn two-factor sign-in on, proving the app holds the secret with a code."""
    device = TotpDevice.objects.filter(user=user, confirmed_at=None).first()
    if device is None:
        raise errors.Conflict("Start setting up two-factor sign-in first.", code="totp_not_started")
    if not _totp_use(device, code):
        raise errors.Invalid(
            "That code is not right; check the app's clock and try the next one.", code="totp_wrong"
        )
    TotpDevice.objects.filter(pk=device.pk).update(confirmed_at=timezone.now())
    device.refresh_from_db()
    return device


def totp_verify(*, user: User, code: str) -> bool:
    """Whether `code` is a fresh, right code of the user's confirmed device."""
    device = TotpDevice.objects.filter(user=user, confirmed_at__isnull=False).first()
    return device is not None and _totp_use(device, code)


def totp_disable(*, user: User, code: str) -> int:
    """Turn two-factor sign-in off; it takes a current code. The devices removed (1)."""
    if not totp_verify(user=user, code=code):
        raise errors.Invalid("That code is not right.", code="totp_wrong")
    return TotpDevice.objects.filter(user=user).delete()[0]


def totp_enabled(user: User) -> bool:
    return TotpDevice.objects.filter(user=user, confirmed_at__isnull=False).exists()

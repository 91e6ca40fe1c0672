"""The team page: members and their roles, invitations, leaving, deleting; the audit log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.core import mail
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sandboxes.models import SandboxState
from teams.models import AuditEvent, Invitation, Membership, Role, Team, User
from teams.services import audit_record, invitation_create, membership_ensure
from tests.conftest import Actor, make_actor
from tests.factories import MembershipFactory, SandboxFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()
    yield


@pytest.fixture
def admin(acme: Team) -> Actor:
    actor = make_actor("admin@acme.test")
    membership_ensure(user=actor.user, team=acme, role=Role.ADMIN)
    return actor


def signed_in(actor: Actor | User) -> Client:
    client = Client()
    client.force_login(actor.user if isinstance(actor, Actor) else actor)
    return client


def membership(actor: Actor, team: str = "acme") -> Membership:
    return Membership.objects.get(user=actor.user, team__slug=team)


def role_of(actor: Actor, team: str = "acme") -> str | None:
    return Membership.objects.filter(user=actor.user, team__slug=team).values_list("role", flat=True).first()


def set_role(by: Actor, target: Actor, role: str) -> object:
    return signed_in(by).post(
        f"/dashboard/t/acme/team/members/{membership(target).pk}/role", {"role": role}, follow=True
    )


def actions(team: Team) -> list[str]:
    return list(AuditEvent.objects.filter(team=team).values_list("action", flat=True))


# --- the page ---------------------------------------------------------------------------


def test_members_page_lists_members_with_roles(owner: Actor, member: Actor, viewer: Actor) -> None:
    page = signed_in(viewer).get("/dashboard/t/acme/team").content.decode()
    for actor, role in ((owner, "owner"), (member, "member"), (viewer, "viewer")):
        row = re.search(rf'<tr data-member="{re.escape(actor.user.email)}">(.*?)</tr>', page, re.S)
        assert row is not None
        assert f'value="{role}" selected' in row.group(1)
    # a viewer sees every control disabled, and no invitation form
    assert 'title="Only owners and admins manage members."' in page
    assert 'action="/dashboard/t/acme/team/invitations"' not in page


def test_an_admin_sees_owner_rows_locked(owner: Actor, admin: Actor) -> None:
    page = signed_in(admin).get("/dashboard/t/acme/team").content.decode()
    row = re.search(r'<tr data-member="owner@acme.test">(.*?)</tr>', page, re.S)
    assert row is not None and "Only owners may change or remove owners." in row.group(1)


# --- roles --------------------------------------------------------------------------------


def test_an_owner_changes_a_role_and_it_is_audited(owner: Actor, member: Actor, acme: Team) -> None:
    response = set_role(owner, member, "viewer")
    assert b"member@acme.test is now viewer." in response.content  # type: ignore[attr-defined]
    assert role_of(member) == Role.VIEWER
    event = AuditEvent.objects.get(team=acme, action="member.role")
    assert (event.actor, event.target, event.source) == (owner.user, "member@acme.test", "dashboard")
    assert event.detail == {"before": "member", "after": "viewer"}


def test_an_admin_changes_members_but_not_owners(owner: Actor, admin: Actor, member: Actor) -> None:
    set_role(admin, member, "viewer")
    assert role_of(member) == Role.VIEWER
    refused = set_role(admin, owner, "member")
    assert b"Only owners may make, change or remove owners." in refused.content  # type: ignore[attr-defined]
    assert role_of(owner) == Role.OWNER
    set_role(admin, member, "owner")
    assert role_of(member) == Role.VIEWER


def test_only_owners_make_owners(owner: Actor, member: Actor) -> None:
    set_role(owner, member, "owner")
    assert role_of(member) == Role.OWNER


def test_the_last_owner_cannot_step_down(owner: Actor, member: Actor) -> None:
    refused = set_role(owner, owner, "admin")
    assert b"A team needs at least one owner" in refused.content  # type: ignore[attr-defined]
    assert role_of(owner) == Role.OWNER
    # with a second owner, one may step down
    set_role(owner, member, "owner")
    set_role(owner, owner, "admin")
    assert role_of(owner) == Role.ADMIN


def test_members_and_viewers_cannot_change_roles(member: Actor, viewer: Actor) -> None:
    url = f"/dashboard/t/acme/team/members/{membership(viewer).pk}/role"
    assert signed_in(member).post(url, {"role": "admin"}).status_code == 403
    assert signed_in(viewer).post(url, {"role": "admin"}).status_code == 403
    assert role_of(viewer) == Role.VIEWER


def test_another_teams_membership_is_404(owner: Actor, outsider: Actor) -> None:
    theirs = Membership.objects.get(user=outsider.user)
    client = signed_in(owner)
    assert (
        client.post(f"/dashboard/t/acme/team/members/{theirs.pk}/role", {"role": "viewer"}).status_code == 404
    )
    assert client.post(f"/dashboard/t/acme/team/members/{theirs.pk}/remove").status_code == 404
    assert Membership.objects.get(pk=theirs.pk).role == Role.OWNER


def test_removing_members(owner: Actor, admin: Actor, member: Actor, acme: Team) -> None:
    client = signed_in(admin)
    client.post(f"/dashboard/t/acme/team/members/{membership(member).pk}/remove")
    assert role_of(member) is None
    refused = client.post(f"/dashboard/t/acme/team/members/{membership(owner).pk}/remove", follow=True)
    assert b"Only owners may" in refused.content
    assert role_of(owner) == Role.OWNER
    assert actions(acme) == ["member.remove"]


def test_a_personal_teams_owner_stays_its_owner(owner: Actor, member: Actor) -> None:
    team = owner.personal_team
    membership_ensure(user=member.user, team=team, role=Role.OWNER)
    mine = Membership.objects.get(user=owner.user, team=team)
    response = signed_in(member).post(
        f"/dashboard/t/{team.slug}/team/members/{mine.pk}/role", {"role": "viewer"}, follow=True
    )
    assert b"The owner of a personal team stays its owner." in response.content
    assert Membership.objects.get(pk=mine.pk).role == Role.OWNER


# --- invitations --------------------------------------------------------------------------


def invite(by: Actor, email: str, role: str = "member") -> str:
    """Invite through the page; the link's token, from the mail."""
    mail.outbox.clear()
    response = signed_in(by).post(
        "/dashboard/t/acme/team/invitations", {"email": email, "role": role}, follow=True
    )
    assert response.status_code == 200
    assert len(mail.outbox) == 1, response.content
    found = re.search(r"http://127\.0\.0\.1:8000/dashboard/invitations/(\S+)", mail.outbox[0].body)
    assert found is not None, mail.outbox[0].body
    return found.group(1)


def test_an_invitation_is_mailed_and_accepted(owner: Actor, acme: Team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    token = invite(owner, "New@Example.test", "admin")
    assert mail.outbox[0].to == ["new@example.test"]
    invitation = Invitation.objects.get(team=acme)
    assert invitation.token_hash != token and token not in invitation.token_hash  # only a hash is kept
    page = signed_in(owner).get("/dashboard/t/acme/team").content.decode()
    assert 'data-invitation="new@example.test"' in page
    # the invitee signs in and accepts
    new = make_actor("new@example.test")
    client = signed_in(new)
    assert b"Accept and join" in client.get(f"/dashboard/invitations/{token}").content
    response = client.post(f"/dashboard/invitations/{token}")
    assert response["Location"] == "/dashboard/t/acme/sandboxes"
    assert role_of(new) == Role.ADMIN
    assert actions(acme) == ["invitation.accept", "invitation.create"]
    # the link is used up
    again = Client().get(f"/dashboard/invitations/{token}")
    assert again.status_code == 410 and b"already accepted" in again.content


def test_an_expired_invitation_cannot_be_accepted(owner: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    token = invite(owner, "late@example.test")
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    late = make_actor("late@example.test")
    client = signed_in(late)
    page = client.get(f"/dashboard/invitations/{token}")
    assert page.status_code == 410 and b"This invitation has expired" in page.content
    client.post(f"/dashboard/invitations/{token}")
    assert role_of(late) is None


def test_an_invitation_for_another_email_is_refused(owner: Actor, outsider: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    token = invite(owner, "someone@example.test")
    client = signed_in(outsider)
    page = client.get(f"/dashboard/invitations/{token}")
    assert page.status_code == 403
    assert b"this invitation is for someone@example.test" in page.content
    response = client.post(f"/dashboard/invitations/{token}", follow=True)
    assert b"This invitation is for someone@example.test" in response.content
    assert role_of(outsider) is None
    assert Invitation.objects.get().accepted_at is None


def test_a_revoked_invitation_cannot_be_accepted(owner: Actor, acme: Team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    token = invite(owner, "gone@example.test")
    invitation = Invitation.objects.get()
    signed_in(owner).post(f"/dashboard/t/acme/team/invitations/{invitation.pk}/revoke")
    assert Invitation.objects.get().revoked_at is not None
    gone = make_actor("gone@example.test")
    page = signed_in(gone).get(f"/dashboard/invitations/{token}")
    assert page.status_code == 410 and b"This invitation was withdrawn." in page.content
    signed_in(gone).post(f"/dashboard/invitations/{token}")
    assert role_of(gone) is None
    assert actions(acme) == ["invitation.revoke", "invitation.create"]


def test_an_unknown_invitation_link_is_404(db: None) -> None:
    page = Client().get("/dashboard/invitations/not-a-token")
    assert page.status_code == 404 and b"There is no such invitation." in page.content


def test_an_invitation_lets_its_email_sign_up_when_sign_up_is_closed(owner: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    settings.SIGNUP_OPEN = False
    token = invite(owner, "fresh@example.test", "viewer")
    anonymous = Client()
    landing = anonymous.get(f"/dashboard/invitations/{token}").content.decode()
    assert f'href="/dashboard/sign-up?invitation={token}"' in landing
    assert anonymous.get(f"/dashboard/sign-up?invitation={token}").status_code == 200
    # another email may not use it
    other = anonymous.post(
        "/dashboard/sign-up",
        {"email": "other@example.test", "password": "a long passphrase 9", "invitation": token},
    )
    assert other.status_code == 400 and not User.objects.filter(email="other@example.test").exists()
    response = anonymous.post(
        "/dashboard/sign-up",
        {"email": "fresh@example.test", "password": "a long passphrase 9", "invitation": token},
    )
    assert response["Location"] == "/dashboard/t/acme/sandboxes"
    user = User.objects.get(email="fresh@example.test")
    assert Membership.objects.get(user=user, team__slug="acme").role == Role.VIEWER
    assert Team.objects.filter(personal_for=user).exists()


def test_admins_may_not_invite_owners_and_viewers_may_not_invite(
    admin: Actor, viewer: Actor, acme: Team
) -> None:
    response = signed_in(admin).post(
        "/dashboard/t/acme/team/invitations", {"email": "boss@example.test", "role": "owner"}, follow=True
    )
    assert b"Only owners may invite owners." in response.content
    forbidden = signed_in(viewer).post(
        "/dashboard/t/acme/team/invitations", {"email": "x@example.test", "role": "member"}
    )
    assert forbidden.status_code == 403
    assert not Invitation.objects.exists()
    assert mail.outbox == []


def test_inviting_again_replaces_the_pending_invitation(owner: Actor, acme: Team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    first = invite(owner, "twice@example.test")
    second = invite(owner, "twice@example.test", "viewer")
    assert Invitation.objects.filter(revoked_at=None).count() == 1
    assert Client().get(f"/dashboard/invitations/{first}").status_code == 410
    assert Client().get(f"/dashboard/invitations/{second}").status_code == 200


# --- leaving and deleting ---------------------------------------------------------------------


def test_a_member_leaves(member: Actor, acme: Team) -> None:
    response = signed_in(member).post("/dashboard/t/acme/team/leave")
    assert response["Location"] == "/dashboard/"
    assert role_of(member) is None
    assert actions(acme) == ["member.leave"]


def test_the_last_owner_cannot_leave_and_nobody_leaves_a_personal_team(owner: Actor) -> None:
    client = signed_in(owner)
    refused = client.post("/dashboard/t/acme/team/leave", follow=True)
    assert b"You are the team&#x27;s last owner" in refused.content
    assert role_of(owner) == Role.OWNER
    personal = owner.personal_team.slug
    client.post(f"/dashboard/t/{personal}/team/leave")
    assert role_of(owner, personal) == Role.OWNER


def test_deleting_a_team_needs_an_owner_and_the_slug(owner: Actor, admin: Actor, acme: Team) -> None:
    assert signed_in(admin).post("/dashboard/t/acme/team/delete", {"confirm": "acme"}).status_code == 403
    wrong = signed_in(owner).post("/dashboard/t/acme/team/delete", {"confirm": "acm"}, follow=True)
    assert b"Type the team&#x27;s slug (acme) to confirm." in wrong.content
    assert Team.objects.filter(slug="acme").exists()
    done = signed_in(owner).post("/dashboard/t/acme/team/delete", {"confirm": "acme"})
    assert done["Location"] == "/dashboard/"
    assert not Team.objects.filter(slug="acme").exists()
    logged = AuditEvent.objects.get(team=owner.personal_team, action="team.delete")
    assert logged.target == "acme"


def test_a_team_with_live_sandboxes_is_not_deleted(owner: Actor, acme: Team) -> None:
    SandboxFactory(team=acme, state=SandboxState.READY)
    response = signed_in(owner).post("/dashboard/t/acme/team/delete", {"confirm": "acme"}, follow=True)
    assert b"The team still has 1 sandbox(es); destroy them first." in response.content
    assert Team.objects.filter(slug="acme").exists()


def test_billing_keeps_a_team_money_moved_through(owner: Actor, acme: Team) -> None:
    from decimal import Decimal

    from billing.services import credit_grant

    credit_grant(team=acme, amount=Decimal("5"), reason="test", by=None)
    credit_grant(team=acme, amount=Decimal("-5"), reason="test", by=None)
    response = signed_in(owner).post("/dashboard/t/acme/team/delete", {"confirm": "acme"}, follow=True)
    assert b"Billing keeps this team" in response.content
    assert Team.objects.filter(slug="acme").exists()


def test_a_personal_team_is_not_deleted(owner: Actor) -> None:
    slug = owner.personal_team.slug
    signed_in(owner).post(f"/dashboard/t/{slug}/team/delete", {"confirm": slug})
    assert Team.objects.filter(slug=slug).exists()


# --- audit log -----------------------------------------------------------------------------


def test_audit_log_is_for_owners_and_admins(
    owner: Actor, admin: Actor, member: Actor, viewer: Actor, acme: Team
) -> None:
    audit_record(
        team=acme, actor=owner.user, action="member.role", target="x@example.test", source="dashboard"
    )
    audit_record(team=acme, actor=admin.user, action="sandbox.pause", target="sbx_1", source="api")
    page = signed_in(admin).get("/dashboard/t/acme/audit").content.decode()
    assert page.index('data-action="sandbox.pause"') < page.index('data-action="member.role"')  # newest first
    assert "admin@acme.test" in page and "sbx_1" in page
    assert signed_in(owner).get("/dashboard/t/acme/audit").status_code == 200
    assert signed_in(member).get("/dashboard/t/acme/audit").status_code == 403
    assert signed_in(viewer).get("/dashboard/t/acme/audit").status_code == 403


def test_audit_log_pages(owner: Actor, acme: Team) -> None:
    for n in range(55):
        audit_record(team=acme, actor=owner.user, action="member.role", target=f"m{n}@example.test")
    client = signed_in(owner)
    first = client.get("/dashboard/t/acme/audit").content.decode()
    assert "m54@example.test" in first and "m4@example.test" not in first and "?page=2" in first
    second = client.get("/dashboard/t/acme/audit?page=2").content.decode()
    assert "m4@example.test" in second and "m54@example.test" not in second


# --- outsiders, query counts ---------------------------------------------------------------------

TEAM_URLS = [
    ("get", "team"),
    ("get", "audit"),
    ("post", "team/members/1/role"),
    ("post", "team/members/1/remove"),
    ("post", "team/invitations"),
    ("post", "team/invitations/1/revoke"),
    ("post", "team/leave"),
    ("post", "team/delete"),
]


@pytest.mark.parametrize(("method", "page"), TEAM_URLS)
def test_outsiders_get_404_on_every_team_url(owner: Actor, outsider: Actor, method: str, page: str) -> None:
    response = getattr(signed_in(outsider), method)(
        f"/dashboard/t/acme/{page}", {"role": "viewer", "confirm": "acme"}
    )
    assert response.status_code == 404
    assert Team.objects.filter(slug="acme").exists()


def count_queries(client: Client, url: str) -> int:
    client.get(url)  # warm: the first request of a session does its own one-off reads
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_members_and_audit_pages_take_constant_queries(owner: Actor, acme: Team) -> None:
    client = signed_in(owner)

    def grow(to: int) -> None:
        while Membership.objects.filter(team=acme).count() < to:
            m = MembershipFactory(team=acme)
            audit_record(team=acme, actor=m.user, action="member.role", target=m.user.email)
            invitation_create(actor=owner.user, team=acme, email=f"inv-{m.pk}@example.test", role="member")

    grow(3)
    few = (count_queries(client, "/dashboard/t/acme/team"), count_queries(client, "/dashboard/t/acme/audit"))
    grow(30)
    many = (count_queries(client, "/dashboard/t/acme/team"), count_queries(client, "/dashboard/t/acme/audit"))
    assert few == many


def test_a_team_name_with_a_line_break_is_refused_and_old_ones_still_get_invitations(
    owner: Actor, acme: Team
) -> None:
    from django.core import mail

    client = Client()
    client.force_login(owner.user)
    # a new team's name may not carry a header injection
    refused = client.post(
        "/dashboard/teams/new", {"slug": "nl-team", "name": "Evil\r\nBcc: victim@example.com"}, follow=True
    )
    assert not Team.objects.filter(slug="nl-team").exists()
    assert b"may not contain line breaks or other control characters" in refused.content
    # and a team named so before still mails its invitations, on one subject line
    Team.objects.filter(pk=acme.pk).update(name="Old\nname")
    client.post("/dashboard/t/acme/team/invitations", {"email": "new@example.test", "role": "member"})
    assert [m.subject for m in mail.outbox] == ["Join Old name on Watasu"]

"""Signing in (rate limits, two-factor codes), signing up, resetting a password, the account page."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from django.contrib.auth import SESSION_KEY
from django.core import mail
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client

from teams import totp
from teams.models import Membership, Role, Team, TotpDevice, User
from teams.services import totp_secret
from tests.conftest import Actor

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fresh(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.SIGNIN_ATTEMPTS = 3
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def alice(db: None) -> User:
    return User.objects.create_user("alice@example.test", PASSWORD)


class Clock:
    """The authenticator's clock, set by the test (the one edge of the world TOTP has)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.at = 1_800_000_000.0
        monkeypatch.setattr(totp, "now", lambda: self.at)

    def code(self, user: User, steps_ahead: int = 0) -> str:
        device = TotpDevice.objects.get(user=user)
        return totp.code_at(totp_secret(device), totp.step_at(self.at) + steps_ahead)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def sign_in(client: Client, email: str, password: str, address: str = "10.0.0.1", **extra: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/dashboard/sign-in", {"username": email, "password": password, **extra}, REMOTE_ADDR=address
    )


def signed_in_user(client: Client) -> str | None:
    return client.session.get(SESSION_KEY)


# --- sign-in ---------------------------------------------------------------------------


def test_sign_in_with_the_right_password(alice: User) -> None:
    client = Client()
    response = sign_in(client, "Alice@Example.test", PASSWORD, next="/dashboard/account")
    assert response.status_code == 302
    assert response["Location"] == "/dashboard/account"
    assert signed_in_user(client) == str(alice.pk)


def test_sign_in_ignores_a_next_on_another_site(alice: User) -> None:
    response = sign_in(Client(), alice.email, PASSWORD, next="https://evil.test/")
    assert response["Location"] == "/dashboard/"


def test_a_wrong_password_is_refused(alice: User) -> None:
    client = Client()
    response = sign_in(client, alice.email, "wrong password")
    assert response.status_code == 400
    assert b"Wrong email or password." in response.content
    assert signed_in_user(client) is None


def test_sign_in_page_links_to_reset_and_to_sign_up_when_open(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = True
    page = Client().get("/dashboard/sign-in").content.decode()
    assert 'href="/dashboard/password-reset"' in page
    assert 'href="/dashboard/sign-up"' in page
    settings.SIGNUP_OPEN = False
    assert 'href="/dashboard/sign-up"' not in Client().get("/dashboard/sign-in").content.decode()


def test_too_many_failures_for_an_email_refuse_even_the_right_password(alice: User) -> None:
    # Given three failures for alice, from three different addresses
    for n in range(3):
        assert sign_in(Client(), alice.email, "nope", address=f"10.0.1.{n}").status_code == 400
    # When the right password comes, from yet another address
    client = Client()
    response = sign_in(client, alice.email, PASSWORD, address="10.0.2.1")
    # Then it is refused without being checked, and the page says when to retry
    assert response.status_code == 429
    assert b"Too many sign-in attempts. Try again in 15 minutes." in response.content
    assert signed_in_user(client) is None


def test_too_many_failures_from_one_address_refuse_every_email(alice: User) -> None:
    for n in range(3):
        sign_in(Client(), f"someone{n}@example.test", "guess", address="10.0.3.3")
    refused = sign_in(Client(), alice.email, PASSWORD, address="10.0.3.3")
    assert refused.status_code == 429
    # another address is not refused
    assert sign_in(Client(), alice.email, PASSWORD, address="10.0.3.4").status_code == 302


def test_failures_below_the_limit_still_let_the_right_password_in(alice: User) -> None:
    for _ in range(2):
        sign_in(Client(), alice.email, "nope")
    assert sign_in(Client(), alice.email, PASSWORD).status_code == 302


# --- two-factor -------------------------------------------------------------------------


def enable_totp(user: User, clock: Clock) -> Client:
    client = Client()
    client.force_login(user)
    assert client.post("/dashboard/account/two-factor/start").status_code == 302
    page = client.get("/dashboard/account").content.decode()
    secret = totp_secret(TotpDevice.objects.get(user=user))
    assert secret in page and "otpauth://totp/Watasu:alice@example.test?secret=" in page
    client.post("/dashboard/account/two-factor/confirm", {"code": clock.code(user)})
    return client


def test_enabling_totp_takes_a_right_code(alice: User, clock: Clock) -> None:
    client = Client()
    client.force_login(alice)
    client.post("/dashboard/account/two-factor/start")
    # a wrong code does not turn it on
    wrong = str((int(clock.code(alice)) + 1) % 1_000_000).zfill(6)
    client.post("/dashboard/account/two-factor/confirm", {"code": wrong})
    assert TotpDevice.objects.get(user=alice).confirmed_at is None
    # the right one does
    response = client.post("/dashboard/account/two-factor/confirm", {"code": clock.code(alice)}, follow=True)
    assert b"Two-factor sign-in is on" in response.content
    device = TotpDevice.objects.get(user=alice)
    assert device.confirmed_at is not None
    assert totp_secret(device) not in device.secret_encrypted  # encrypted at rest


def test_sign_in_with_totp_asks_for_a_code_before_signing_in(alice: User, clock: Clock) -> None:
    enable_totp(alice, clock)
    client = Client()
    # Given the right password
    response = sign_in(client, alice.email, PASSWORD, next="/dashboard/account")
    # Then the user is only half signed in
    assert response["Location"] == "/dashboard/sign-in/code"
    assert signed_in_user(client) is None
    assert client.get("/dashboard/account")["Location"].startswith("/dashboard/sign-in")
    # When a fresh code comes
    clock.at += totp.STEP_SECONDS
    done = client.post("/dashboard/sign-in/code", {"code": clock.code(alice)})
    # Then the user is signed in and sent where they were going
    assert done["Location"] == "/dashboard/account"
    assert signed_in_user(client) == str(alice.pk)


def test_a_used_code_is_not_accepted_again(alice: User, clock: Clock) -> None:
    enable_totp(alice, clock)
    clock.at += totp.STEP_SECONDS
    code = clock.code(alice)
    first = Client()
    sign_in(first, alice.email, PASSWORD)
    assert first.post("/dashboard/sign-in/code", {"code": code}).status_code == 302
    # the same code, replayed in another sign-in within its window
    second = Client()
    sign_in(second, alice.email, PASSWORD)
    refused = second.post("/dashboard/sign-in/code", {"code": code})
    assert refused.status_code == 400
    assert b"already used" in refused.content
    assert signed_in_user(second) is None


def test_a_code_from_too_long_ago_is_refused(alice: User, clock: Clock) -> None:
    enable_totp(alice, clock)
    old = clock.code(alice, steps_ahead=1)
    clock.at += 3 * totp.STEP_SECONDS  # the code's step is now two steps back
    client = Client()
    sign_in(client, alice.email, PASSWORD)
    assert client.post("/dashboard/sign-in/code", {"code": old}).status_code == 400
    assert signed_in_user(client) is None


def test_wrong_codes_count_towards_the_sign_in_limit(alice: User, clock: Clock) -> None:
    enable_totp(alice, clock)
    client = Client()
    sign_in(client, alice.email, PASSWORD)
    for _ in range(3):
        client.post("/dashboard/sign-in/code", {"code": "000000"}, REMOTE_ADDR="10.0.0.1")
    clock.at += totp.STEP_SECONDS
    refused = client.post("/dashboard/sign-in/code", {"code": clock.code(alice)}, REMOTE_ADDR="10.0.0.1")
    assert refused.status_code == 429
    assert signed_in_user(client) is None


def test_disabling_totp_needs_a_current_code(alice: User, clock: Clock) -> None:
    client = enable_totp(alice, clock)
    client.post("/dashboard/account/two-factor/disable", {"code": "123456"})
    assert TotpDevice.objects.filter(user=alice).exists()
    clock.at += totp.STEP_SECONDS
    client.post("/dashboard/account/two-factor/disable", {"code": clock.code(alice)})
    assert not TotpDevice.objects.filter(user=alice).exists()
    assert sign_in(Client(), alice.email, PASSWORD)["Location"] == "/dashboard/"


# --- password reset --------------------------------------------------------------------


def test_password_reset_mails_a_link_that_sets_a_new_password(alice: User) -> None:
    client = Client()
    response = client.post("/dashboard/password-reset", {"email": alice.email})
    assert response["Location"] == "/dashboard/password-reset/done"
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == [alice.email]
    link = re.search(r"https?://[^/\s]+(/dashboard/password-reset/confirm/\S+)", mail.outbox[0].body)
    assert link is not None
    form_url = client.get(link.group(1))["Location"]  # Django swaps the token for a session
    new = "a brand new passphrase 42"
    done = client.post(form_url, {"new_password1": new, "new_password2": new})
    assert done["Location"] == "/dashboard/password-reset/complete"
    assert sign_in(Client(), alice.email, new).status_code == 302
    assert sign_in(Client(), alice.email, PASSWORD).status_code == 400


def test_a_user_made_without_a_password_sets_a_first_one_by_reset(db: None) -> None:
    # given an account an operator made for an email (`create_api_key`): no password yet
    from teams.services import user_get_or_create

    made = user_get_or_create(email="made-by-ops@example.test")
    assert not made.has_usable_password()

    # when its owner asks for a reset and follows the mailed link
    client = Client()
    client.post("/dashboard/password-reset", {"email": "Made-By-Ops@example.test"})
    assert [m.to for m in mail.outbox] == [["made-by-ops@example.test"]]
    link = re.search(r"https?://[^/\s]+(/dashboard/password-reset/confirm/\S+)", mail.outbox[0].body)
    assert link is not None
    form_url = client.get(link.group(1))["Location"]
    first = "my very first passphrase 42"
    client.post(form_url, {"new_password1": first, "new_password2": first})

    # then they can sign in with it, and the link is spent
    assert sign_in(Client(), "made-by-ops@example.test", first).status_code == 302
    assert b"This link does not work" in Client().get(link.group(1), follow=True).content


def test_reset_links_use_the_public_url_and_reset_mails_are_limited(alice: User, settings) -> None:  # type: ignore[no-untyped-def]
    settings.PUBLIC_URL, settings.SIGNIN_ATTEMPTS = "https://watasu.example", 3
    client = Client(HTTP_HOST="localhost")
    answers = [client.post("/dashboard/password-reset", {"email": alice.email})["Location"] for _ in range(5)]
    # the same answer every time, three mails, each linking to the public URL (not the Host)
    assert set(answers) == {"/dashboard/password-reset/done"}
    assert len(mail.outbox) == 3
    assert all("https://watasu.example/dashboard/password-reset/confirm/" in m.body for m in mail.outbox)
    assert not any("localhost" in m.body for m in mail.outbox)


def test_password_reset_of_an_unknown_email_sends_nothing_and_says_the_same(db: None) -> None:
    response = Client().post("/dashboard/password-reset", {"email": "nobody@example.test"})
    assert response["Location"] == "/dashboard/password-reset/done"
    assert mail.outbox == []


def test_a_bad_reset_link_says_so(alice: User) -> None:
    response = Client().get("/dashboard/password-reset/confirm/MQ/bad-token")
    assert response.status_code == 200
    assert b"This link does not work" in response.content


# --- sign-up ---------------------------------------------------------------------------


def test_sign_up_creates_a_user_with_a_personal_team_and_signs_in(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = True
    client = Client()
    response = client.post("/dashboard/sign-up", {"email": "New@Example.test", "password": PASSWORD})
    user = User.objects.get(email="new@example.test")
    team = Team.objects.get(personal_for=user)
    assert response["Location"] == f"/dashboard/t/{team.slug}/sandboxes"
    assert signed_in_user(client) == str(user.pk)
    assert Membership.objects.get(user=user, team=team).role == Role.OWNER


def test_sign_up_validates_the_password(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = True
    response = Client().post("/dashboard/sign-up", {"email": "new@example.test", "password": "12345678"})
    assert response.status_code == 400
    assert b"This password is entirely numeric." in response.content
    assert not User.objects.filter(email="new@example.test").exists()


def test_sign_up_refuses_a_taken_email(settings, alice: User) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = True
    response = Client().post("/dashboard/sign-up", {"email": alice.email, "password": PASSWORD})
    assert response.status_code == 400
    assert b"There is already an account with this email" in response.content


def test_sign_up_is_404_when_closed(settings, db: None) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = False
    assert Client().get("/dashboard/sign-up").status_code == 404
    assert (
        Client().post("/dashboard/sign-up", {"email": "x@example.test", "password": PASSWORD}).status_code
        == 404
    )
    assert not User.objects.filter(email="x@example.test").exists()


# --- account ---------------------------------------------------------------------------


def test_account_page_changes_the_password_and_lists_teams(alice: User, acme: Team) -> None:
    Membership.objects.create(user=alice, team=acme, role=Role.VIEWER)
    client = Client()
    client.force_login(alice)
    page = client.get("/dashboard/account").content.decode()
    assert "Acme" in page and "viewer" in page
    wrong = client.post(
        "/dashboard/account/password",
        {"old_password": "nope", "new_password1": "x" * 3, "new_password2": "x" * 3},
    )
    assert wrong.status_code == 400
    new = "another long passphrase 7"
    ok = client.post(
        "/dashboard/account/password", {"old_password": PASSWORD, "new_password1": new, "new_password2": new}
    )
    assert ok["Location"] == "/dashboard/account"
    assert signed_in_user(client) == str(alice.pk)  # still signed in
    assert sign_in(Client(), alice.email, new).status_code == 302


def test_creating_a_team_from_the_account_page(owner: Actor) -> None:
    client = Client()
    client.force_login(owner.user)
    response = client.post("/dashboard/teams/new", {"slug": "rockets", "name": "Rockets"})
    assert response["Location"] == "/dashboard/t/rockets/sandboxes"
    assert Membership.objects.get(user=owner.user, team__slug="rockets").role == Role.OWNER
    taken = client.post("/dashboard/teams/new", {"slug": "rockets"}, follow=True)
    assert b"already exists" in taken.content
    bad = client.post("/dashboard/teams/new", {"slug": "Not A Slug"})
    assert bad.status_code == 400


def test_two_factor_secrets_survive_an_encryption_key_rotation(alice: User, clock: Clock, settings) -> None:  # type: ignore[no-untyped-def]
    settings.ENCRYPTION_KEYS = ["old-key"]
    enable_totp(alice, clock)
    settings.ENCRYPTION_KEYS = ["new-key", "old-key"]
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    settings.ENCRYPTION_KEYS = ["new-key"]
    clock.at += totp.STEP_SECONDS
    client = Client()
    sign_in(client, alice.email, PASSWORD)
    assert client.post("/dashboard/sign-in/code", {"code": clock.code(alice)}).status_code == 302


def test_sign_out_is_a_post_and_a_typed_url_shows_the_button(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    shown = client.get("/dashboard/sign-out")
    assert shown.status_code == 200 and b'action="/dashboard/sign-out"' in shown.content
    assert signed_in_user(client) == str(alice.pk)  # a GET signs nobody out
    assert client.post("/dashboard/sign-out").status_code == 302
    assert signed_in_user(client) is None

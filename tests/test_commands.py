"""`manage.py create_api_key` and `dev_api_key`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from teams.models import Membership, Role, Team, User

pytestmark = pytest.mark.django_db


def _run(**options: str) -> str:
    out = io.StringIO()
    call_command("create_api_key", stdout=out, **options)
    return out.getvalue()


def _client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_creates_user_and_team_and_prints_only_the_key() -> None:
    output = _run(email="new@example.com", team="newco", scope="write")

    raw = output.strip()
    assert output == raw + "\n"
    assert raw.startswith("wsk_") and " " not in raw
    user = User.objects.get(email="new@example.com")
    assert Membership.objects.get(user=user, team__slug="newco").role == Role.OWNER
    assert Team.objects.filter(personal_for=user).exists()
    assert _client(raw).post("/v1/teams", {"slug": "z"}, format="json").status_code == 201


def test_read_scope_key_is_read_only() -> None:
    raw = _run(email="r@example.com", team="rco", scope="read").strip()

    assert _client(raw).get("/v1/sandbox_limits?team=rco").status_code == 200
    assert _client(raw).post("/v1/teams", {"slug": "z"}, format="json").status_code == 403


def test_existing_team_gains_a_member_and_keeps_its_owner() -> None:
    _run(email="a@example.com", team="shared", scope="write")

    _run(email="b@example.com", team="shared", scope="write")

    roles = dict(Membership.objects.filter(team__slug="shared").values_list("user__email", "role"))
    assert roles == {"a@example.com": "owner", "b@example.com": "member"}


@pytest.mark.parametrize(
    "options",
    [
        {"email": "not-an-email", "team": "t", "scope": "write"},
        {"email": "a@example.com", "team": "bad slug", "scope": "write"},
    ],
)
def test_bad_arguments_fail_clearly(options: dict[str, str]) -> None:
    with pytest.raises(CommandError):
        _run(**options)
    assert not User.objects.exists()


def test_dev_api_key_is_stable_across_runs(tmp_path: Path) -> None:
    key_file = tmp_path / "dev-api-key"
    first, second = io.StringIO(), io.StringIO()

    call_command("dev_api_key", file=key_file, stdout=first)
    call_command("dev_api_key", file=key_file, stdout=second)

    assert first.getvalue() == second.getvalue()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert _client(first.getvalue().strip()).get("/v1/sandbox_limits?team=dev").status_code == 200


def test_dev_password_signs_in_and_is_stable_until_changed(tmp_path: Path) -> None:
    from django.test import Client

    password_file = tmp_path / "dev-password"
    first, second, after_change = io.StringIO(), io.StringIO(), io.StringIO()

    call_command("dev_password", file=password_file, stdout=first)
    call_command("dev_password", file=password_file, stdout=second)
    password = first.getvalue().strip()

    assert password and second.getvalue().strip() == password
    assert oct(password_file.stat().st_mode & 0o777) == "0o600"
    assert Client().login(username="dev@localhost.localdomain", password=password)
    # an operator who sets their own password keeps it, and nothing is printed
    user = User.objects.get(email="dev@localhost.localdomain")
    user.set_password("chosen by the operator 42")
    user.save()
    call_command("dev_password", file=password_file, stdout=after_change)
    assert after_change.getvalue() == ""
    assert Client().login(username="dev@localhost.localdomain", password="chosen by the operator 42")

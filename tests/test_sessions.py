"""Data-plane session tokens: scoped, expiring, revocable, valid across a pause."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from sandboxes.models import Sandbox, SandboxState
from sandboxes.services import sandbox_destroy
from sandboxes.sessions import session_mint, session_verify
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db


def test_token_is_valid_only_for_its_own_sandbox() -> None:
    mine, other = SandboxFactory(), SandboxFactory()
    session = session_mint(sandbox=mine)

    assert session_verify(token=session.token, sandbox=mine)
    assert not session_verify(token=session.token, sandbox=other)
    assert not session_verify(token=session.token + "x", sandbox=mine)
    assert not session_verify(token="wsk_not-a-session", sandbox=mine)


def test_token_lives_until_the_later_of_deadline_and_one_hour() -> None:
    far = SandboxFactory(deadline_at=timezone.now() + timedelta(hours=5))
    near = SandboxFactory(deadline_at=timezone.now() + timedelta(minutes=5))

    assert session_mint(sandbox=far).expires_at > timezone.now() + timedelta(hours=4)
    assert (
        timedelta(minutes=59) < session_mint(sandbox=near).expires_at - timezone.now() <= timedelta(hours=1)
    )


def test_token_expires() -> None:
    sandbox = SandboxFactory()
    session = session_mint(sandbox=sandbox)
    later = session.expires_at + timedelta(seconds=1)

    with mock.patch("django.utils.timezone.now", return_value=later):
        assert not session_verify(token=session.token, sandbox=sandbox)


def test_token_survives_a_pause_but_not_a_destroy() -> None:
    sandbox = SandboxFactory()
    session = session_mint(sandbox=sandbox)

    Sandbox.objects.filter(pk=sandbox.pk).update(state=SandboxState.STOPPED)
    sandbox.refresh_from_db()
    assert session_verify(token=session.token, sandbox=sandbox)

    sandbox_destroy(sandbox=sandbox)
    assert not session_verify(token=session.token, sandbox=sandbox)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=SandboxState.READY)  # even if revived
    sandbox.refresh_from_db()
    assert not session_verify(token=session.token, sandbox=sandbox)

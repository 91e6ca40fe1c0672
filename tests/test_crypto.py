"""Secrets at rest: a key list that rotates, and no derived keys in production."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from sandboxes.models import Sandbox
from tests.conftest import Actor
from tests.factories import SandboxFactory
from watasu import crypto

ROOT = Path(__file__).resolve().parent.parent


def test_keys_rotate_without_losing_a_secret(owner: Actor, settings) -> None:  # type: ignore[no-untyped-def]
    # given a sandbox's secrets encrypted under the old key
    settings.ENCRYPTION_KEYS = ["old-key"]
    first = owner.client().post("/v1/teams", {"slug": "lab"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    sandbox = SandboxFactory(
        team=owner.personal_team,
        env_vars_encrypted=crypto.encrypt_json({"A": "1"}),
        agent_secret_encrypted=crypto.encrypt_text("agent-secret"),
    )

    # when a new key is put first and the secrets are re-encrypted
    settings.ENCRYPTION_KEYS = ["new-key", "old-key"]
    call_command("rotate_encryption_keys", stdout=open(os.devnull, "w"))  # noqa: SIM115
    settings.ENCRYPTION_KEYS = ["new-key"]

    # then the old key can go: everything reads back with the new one alone
    row = Sandbox.objects.get(pk=sandbox.pk)
    assert crypto.decrypt_json(row.env_vars_encrypted) == {"A": "1"}
    assert crypto.decrypt_text(row.agent_secret_encrypted) == "agent-secret"
    replay = owner.client().post("/v1/teams", {"slug": "lab"}, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert (replay.status_code, replay.content) == (201, first.content)
    settings.ENCRYPTION_KEYS = ["old-key"]
    with pytest.raises(ValueError, match="encryption key changed"):
        crypto.decrypt_text(row.agent_secret_encrypted)


@pytest.mark.parametrize("missing", ["WATASU_SECRET_KEY", "WATASU_ENCRYPTION_KEYS", None])
def test_production_refuses_to_start_with_generated_or_derived_keys(missing, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "WATASU_DEPLOYMENT": "production",
        "WATASU_DATA_DIR": str(tmp_path),
        "WATASU_SECRET_KEY": "s" * 50,
        "WATASU_ENCRYPTION_KEYS": "k" * 40,
    }
    env.pop("WATASU_ENCRYPTION_KEY", None)
    if missing:
        del env[missing]

    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )

    if missing is None:  # both given: it starts
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0
    assert "WATASU_DEPLOYMENT=production needs WATASU_SECRET_KEY and WATASU_ENCRYPTION_KEYS" in result.stderr

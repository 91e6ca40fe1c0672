"""The typed environment reader rejects bad values with a clear message."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from watasu.settings.env import Env


def test_defaults_apply_when_unset() -> None:
    env = Env({})

    assert env.int("N", 5) == 5
    assert env.bool("B", False) is False
    assert (
        env.database("DATABASE_URL", __import__("pathlib").Path("/d/db.sqlite3"))["ENGINE"]
        == "django.db.backends.sqlite3"
    )
    assert env.redis_url("REDIS_URL") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.int("PORT", 1, min=1, max=65535), "PORT='x' is invalid: expected an integer."),
        (lambda e: e.bool("PORT", False), "PORT='x' is invalid: expected one of 1/0, true/false"),
        (lambda e: e.decimal("PORT", None), "PORT='x' is invalid: expected a decimal number."),
        (lambda e: e.int_list("PORT", [1]), "PORT='x' is invalid: expected a comma-separated"),
        (lambda e: e.path("PORT", "/a"), "PORT='x' is invalid: expected an absolute path."),
    ],
)
def test_bad_values_name_the_variable(call, message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        call(Env({"PORT": "x"}))

    assert str(raised.value).startswith(message)


def test_out_of_range_integer() -> None:
    with pytest.raises(ImproperlyConfigured, match="between 1 and 10"):
        Env({"N": "11"}).int("N", 1, min=1, max=10)


def test_postgres_url_is_parsed() -> None:
    db = Env({"DATABASE_URL": "postgres://u:p%40ss@db.local:5433/watasu"}).database(
        "DATABASE_URL", __import__("pathlib").Path("/x")
    )

    assert (db["ENGINE"], db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]) == (
        "django.db.backends.postgresql",
        "watasu",
        "u",
        "p@ss",
        "db.local",
        "5433",
    )


@pytest.mark.parametrize("url", ["mysql://x/y", "postgres://host", "redis://x"])
def test_unsupported_database_urls_are_rejected(url: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL="):
        Env({"DATABASE_URL": url}).database("DATABASE_URL", __import__("pathlib").Path("/x"))


def test_redis_url_must_be_redis() -> None:
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL='http://x' is invalid"):
        Env({"REDIS_URL": "http://x"}).redis_url("REDIS_URL")


def test_vm_names_are_scoped_to_the_installation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    def prefix(data_dir: str, **extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "WATASU_VM_PREFIX"}
        env.update(WATASU_DATA_DIR=data_dir, DJANGO_SETTINGS_MODULE="watasu.settings", **extra)
        code = (
            "import django; django.setup(); from django.conf import settings; "
            "print(settings.RUNTIME_VM_PREFIX)"
        )
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    # two installations on one host (two data dirs) get prefixes neither of which contains the other
    first, second = prefix(str(tmp_path / "a")), prefix(str(tmp_path / "b"))

    assert first != second and not first.startswith(second) and not second.startswith(first)
    assert prefix(str(tmp_path / "a")) == first  # stable across restarts
    assert prefix(str(tmp_path / "a"), WATASU_VM_PREFIX="mine-") == "mine-"

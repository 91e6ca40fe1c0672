"""One typed reader for every setting that comes from the environment.

Each accessor parses and validates its variable and fails loudly with the
variable's name, the bad value and what was expected, so a typo in an
operator's environment stops start-up instead of silently using a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Env:
    """Typed access to environment variables with defaults."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return None if value is None else value.strip()

    def _fail(self, name: str, value: str, expected: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(f"{name}={value!r} is invalid: expected {expected}.")

    def str(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None or raw == "" else raw

    def bool(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise self._fail(name, raw, "one of 1/0, true/false, yes/no, on/off")

    def int(self, name: str, default: int, *, min: int | None = None, max: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(name, raw, "an integer") from None
        if (min is not None and value < min) or (max is not None and value > max):
            raise self._fail(name, raw, f"an integer between {min} and {max}")
        return value

    def int_list(self, name: str, default: list[int]) -> list[int]:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        try:
            values = [int(part) for part in raw.split(",") if part.strip()]
        except ValueError:
            raise self._fail(name, raw, "a comma-separated list of integers") from None
        if not values or any(v <= 0 for v in values):
            raise self._fail(name, raw, "a non-empty list of positive integers")
        return sorted(set(values))

    def list(self, name: str, default: list[str]) -> list[str]:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        return [part.strip() for part in raw.split(",") if part.strip()]

    def decimal(self, name: str, default: str | None) -> Decimal | None:
        raw = self._raw(name)
        if raw is None or raw == "":
            return None if default is None else Decimal(default)
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise self._fail(name, raw, "a decimal number") from None
        if value < 0 or not value.is_finite():
            raise self._fail(name, raw, "a non-negative decimal number")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(name, default)
        if value not in choices:
            raise self._fail(name, value, "one of " + ", ".join(choices))
        return value

    def path(self, name: str, default: str) -> Path:
        value = self.str(name, default)
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise self._fail(name, value, "an absolute path")
        return path

    def database(self, name: str, sqlite_path: Path) -> dict[str, object]:
        """DATABASES['default'] from a URL; SQLite in the data directory when unset."""
        raw = self._raw(name)
        if not raw:
            return {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(sqlite_path),
                "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
            }
        return parse_database_url(name, raw)

    def redis_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if not raw:
            return None
        if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
            raise self._fail(name, raw, "a redis://, rediss:// or unix:// URL")
        return raw


@dataclass(frozen=True)
class _DbScheme:
    engine: str


_DB_SCHEMES = {
    "postgres": _DbScheme("django.db.backends.postgresql"),
    "postgresql": _DbScheme("django.db.backends.postgresql"),
    "sqlite": _DbScheme("django.db.backends.sqlite3"),
}


def parse_database_url(name: str, raw: str) -> dict[str, object]:
    """Parse postgres://user:pass@host:port/db or sqlite:////abs/path."""
    parts = urlsplit(raw)
    scheme = _DB_SCHEMES.get(parts.scheme)
    if scheme is None:
        raise ImproperlyConfigured(f"{name}={raw!r} is invalid: expected a postgres:// or sqlite:// URL.")
    if parts.scheme == "sqlite":
        return {
            "ENGINE": scheme.engine,
            "NAME": unquote(parts.path) or ":memory:",
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ImproperlyConfigured(f"{name}={raw!r} is invalid: the URL names no database.")
    return {
        "ENGINE": scheme.engine,
        "NAME": database,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"connect_timeout": 10},
    }

"""Encryption at rest for secrets the platform must be able to read back
(sandbox env vars, guest agent secrets, stored idempotent responses).

Fernet (AES-128-CBC + HMAC-SHA256). Keys come from `WATASU_ENCRYPTION_KEYS`, a
comma-separated list: the first encrypts, every one decrypts, so a key is
rotated by putting a new one first, running `manage.py rotate_encryption_keys`
(re-encrypts every stored secret with it) and then dropping the old one. Without
any key (embedded mode only: production refuses to start), a key derived from the
Django secret key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


def _derive(secret: str) -> Fernet:
    digest = hashlib.sha256(b"watasu-encryption-v1:" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


@lru_cache(maxsize=4)
def _keyring(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_derive(key) for key in keys])


def _current() -> MultiFernet:
    return _keyring(tuple(settings.ENCRYPTION_KEYS) or (settings.SECRET_KEY,))


def encrypt_text(plain: str) -> str:
    return encrypt_bytes(plain.encode()).decode()


def decrypt_text(token: str) -> str:
    return decrypt_bytes(token.encode()).decode()


def encrypt_bytes(plain: bytes) -> bytes:
    return _current().encrypt(plain)


def decrypt_bytes(token: bytes) -> bytes:
    try:
        return _current().decrypt(token)
    except InvalidToken:
        raise ValueError("cannot decrypt: the encryption key changed or the data is damaged") from None


def rotate_bytes(token: bytes) -> bytes:
    """`token` re-encrypted with the first key (empty stays empty)."""
    return _current().rotate(token) if token else token


def rotate_text(token: str) -> str:
    return rotate_bytes(token.encode()).decode()


def encrypt_json(value: Any) -> str:
    return encrypt_text(json.dumps(value, separators=(",", ":")))


def decrypt_json(token: str) -> Any:
    return json.loads(decrypt_text(token)) if token else None

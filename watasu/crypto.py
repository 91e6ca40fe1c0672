"""Encryption at rest for secrets the platform must be able to read back
(sandbox env vars, guest agent secrets).

Fernet (AES-128-CBC + HMAC-SHA256) with a key derived from
`WATASU_ENCRYPTION_KEY`, or from the Django secret key when that is unset.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@lru_cache(maxsize=4)
def _fernet(secret: str) -> Fernet:
    digest = hashlib.sha256(b"watasu-encryption-v1:" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def _current() -> Fernet:
    return _fernet(settings.ENCRYPTION_KEY or settings.SECRET_KEY)


def encrypt_text(plain: str) -> str:
    return _current().encrypt(plain.encode()).decode()


def decrypt_text(token: str) -> str:
    try:
        return _current().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("cannot decrypt: the encryption key changed or the data is damaged") from None


def encrypt_json(value: Any) -> str:
    return encrypt_text(json.dumps(value, separators=(",", ":")))


def decrypt_json(token: str) -> Any:
    return json.loads(decrypt_text(token)) if token else None

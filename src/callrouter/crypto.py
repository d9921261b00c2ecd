"""Secrets at rest: the trunk-password box and API-key tokens.

How it works:

- ``SecretBox`` encrypts trunk passwords with Fernet (AES-128-CBC + HMAC-SHA256). The
  key comes from ``CALLROUTER_SECRET_KEY`` when set, otherwise from the key file
  (``secrets.key_file``, default ``secret.key`` in the data dir), created on first use
  with mode 0600 (``O_EXCL``, so two processes starting together agree on one key).
  Routers sharing a database share the key file. Losing the key makes stored passwords
  unreadable, never readable by someone else.
- The database keeps a check value: the key encrypting ``KEY_CHECK_TEXT``, written by the
  first router to start (``Store.key_check``). A router whose key cannot decrypt it
  refuses to start (``SecretBox.verify``) instead of writing passwords no other router
  can read.
- API keys are ``cr_`` + 32 random bytes (urlsafe base64). Only ``sha256(token)`` is
  stored; the token is shown once. A plain hash suffices because the token has 256
  bits of entropy: there is nothing to brute-force, so no slow KDF is needed, and
  lookups by hash stay an indexed equality.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from callrouter.domain.models import ApiKey
from callrouter.errors import ConfigError, StoreError

KEY_ENV = "CALLROUTER_SECRET_KEY"
KEY_FILE = "secret.key"
KEY_CHECK_TEXT = "callrouter trunk-password key check"
API_KEY_PREFIX = "cr_"


class SecretBox:
    """Encrypts and decrypts small secrets (trunk passwords) with one Fernet key."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise ConfigError([f"{KEY_ENV}/{KEY_FILE}: not a Fernet key ({exc})"]) from exc

    @classmethod
    def load(cls, key_file: Path, environ: Mapping[str, str]) -> SecretBox:
        """The key from the environment, else from (or newly into) ``key_file``."""
        from_env = environ.get(KEY_ENV, "").strip()
        if from_env:
            return cls(from_env.encode())
        return cls(_read_or_create_key(key_file))

    def check_value(self) -> bytes:
        """This key's check value, for a database that has none yet."""
        return self.encrypt(KEY_CHECK_TEXT)

    def verify(self, stored_check: bytes) -> bool:
        """Whether this key wrote ``stored_check`` (and so can read the stored secrets)."""
        try:
            return self._fernet.decrypt(stored_check).decode() == KEY_CHECK_TEXT
        except (InvalidToken, UnicodeDecodeError):
            return False

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken as exc:
            raise StoreError("stored secret cannot be decrypted with the current key") from exc


def _read_or_create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


@dataclass(frozen=True)
class IssuedKey:
    """A freshly generated API key: the token (shown once), its record and its hash."""

    token: str
    record: ApiKey
    key_hash: bytes


def hash_api_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def generate_api_key(name: str, read_only: bool, now: datetime) -> IssuedKey:
    token = API_KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=uuid.uuid4(), name=name, prefix=token[:8], read_only=read_only, created_at=now
    )
    return IssuedKey(token=token, record=record, key_hash=hash_api_key(token))

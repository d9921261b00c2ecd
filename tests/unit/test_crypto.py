"""Secrets at rest (``crypto``): the trunk-password key file and API-key tokens."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from callrouter.crypto import KEY_ENV, KEY_FILE, SecretBox, generate_api_key, hash_api_key
from callrouter.errors import ConfigError, StoreError


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    """Guards the issue's 'created with mode 0600 on first start'."""
    data_dir = tmp_path / "var"
    box = SecretBox.load(data_dir / "secret.key", {})
    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    token = box.encrypt("s3cr3t-password")
    again = SecretBox.load(data_dir / "secret.key", {})  # the same key, reused
    assert again.decrypt(token) == "s3cr3t-password"
    assert b"s3cr3t-password" not in token


def test_key_from_the_environment_wins_and_no_file_is_written(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    token = SecretBox.load(tmp_path / "secret.key", {KEY_ENV: key}).encrypt("pw")
    assert Fernet(key.encode()).decrypt(token) == b"pw"
    assert not (tmp_path / KEY_FILE).exists()


def test_bad_key_in_environment_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SecretBox.load(tmp_path / "secret.key", {KEY_ENV: "not-a-key"})


def test_secret_under_another_key_is_a_store_error(tmp_path: Path) -> None:
    token = SecretBox(Fernet.generate_key()).encrypt("pw")
    with pytest.raises(StoreError):
        SecretBox.load(tmp_path / "secret.key", {}).decrypt(token)


def test_the_check_value_tells_the_key_that_wrote_it(tmp_path: Path) -> None:
    """Guards routers sharing a database: only the key that wrote the check value
    verifies it, so a router with another key can refuse to start."""
    box = SecretBox.load(tmp_path / "shared" / "router.key", {})
    check = box.check_value()
    assert box.verify(check)
    assert SecretBox.load(tmp_path / "shared" / "router.key", {}).verify(check)
    assert not SecretBox(Fernet.generate_key()).verify(check)
    assert not box.verify(b"not a token")


def test_api_keys_are_random_and_only_their_hash_is_kept() -> None:
    now = datetime(2025, 12, 13, tzinfo=UTC)
    first, second = generate_api_key("a", False, now), generate_api_key("b", True, now)
    assert first.token.startswith("cr_") and len(first.token) > 40
    assert first.token != second.token
    assert first.key_hash == hash_api_key(first.token) != second.key_hash
    assert first.token.encode() not in first.key_hash
    assert first.record.prefix == first.token[:8] and second.record.read_only

"""API keys from ``API_KEY`` (comma-separated) and ``API_KEYS_FILE`` (one a line); never shown in a message."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import SecretStr

MIN_KEY_CHARS = 8


def _well_formed(key: str) -> bool:
    return len(key) >= MIN_KEY_CHARS and not any(ch.isspace() for ch in key)


def read_keys(api_key: SecretStr | None, keys_file: Path | None) -> tuple[SecretStr, ...]:
    keys: list[str] = []
    if api_key is not None:
        keys += [k.strip() for k in api_key.get_secret_value().split(",") if k.strip()]
        if not keys:
            raise ValueError("API_KEY holds no key (only commas or spaces); unset it to leave the service open")
    if keys_file is not None:
        lines = [line.strip() for line in keys_file.expanduser().read_text().splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"API_KEYS_FILE {str(keys_file)!r} holds no key")
        keys += from_file
    for key in keys:
        if not _well_formed(key):
            # The key itself is never shown: only where it came from.
            raise ValueError(
                f"every API key must be at least {MIN_KEY_CHARS} characters without spaces (API_KEY / API_KEYS_FILE)"
            )
    return tuple(SecretStr(k) for k in dict.fromkeys(keys))


def read_admin_key(admin_api_key: SecretStr) -> SecretStr:
    """ADMIN_API_KEY under the API keys' rules: stripped (a mounted secret's trailing newline), at least
    ``MIN_KEY_CHARS`` characters without spaces. The message never shows the key."""
    key = admin_api_key.get_secret_value().strip()
    if not key:
        raise ValueError("empty; unset it to turn /admin off")
    if not _well_formed(key):
        raise ValueError(f"must be at least {MIN_KEY_CHARS} characters without spaces")
    return SecretStr(key)


def check_admin_key_is_not_a_user_key(admin_api_key: SecretStr, api_keys: tuple[SecretStr, ...]) -> None:
    """A user key must never open /admin."""
    admin = admin_api_key.get_secret_value().encode()
    if any(secrets.compare_digest(admin, user.get_secret_value().encode()) for user in api_keys):
        raise ValueError("ADMIN_API_KEY must differ from every API key (API_KEY / API_KEYS_FILE)")

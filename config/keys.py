"""API keys from ``API_KEY`` (comma-separated) and ``API_KEYS_FILE`` (one a line); never shown in a message."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr


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
        if any(ch.isspace() for ch in key) or len(key) < 8:
            # The key itself is never shown: only where it came from.
            raise ValueError("every API key must be at least 8 characters without spaces (API_KEY / API_KEYS_FILE)")
    return tuple(SecretStr(k) for k in dict.fromkeys(keys))

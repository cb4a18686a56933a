"""Settings errors in the words of the environment: each message names the variable, never a secret's value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from config.model_fields import IDLE_TIMEOUT_ALIAS

# Fields whose value is never shown: not in error messages, not in generated files.
SECRET_FIELDS = frozenset({"api_key", "admin_api_key"})


class SettingsError(ValueError):
    """A setting is missing, malformed or inconsistent; the message names each variable."""


def env_name(field: str) -> str:
    """The environment variable a field is read from."""
    return field.upper()


def describe(error: Mapping[str, Any], env: bool = True) -> str:
    """One pydantic error as ``NAME: message, got value`` (the environment variable, or the entry's field)."""
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    field = loc[0].lower()
    name = env_name(field) if env else field
    value = error.get("input")
    secret = field in SECRET_FIELDS
    shown = (
        f", got {value!r}"
        if not secret and isinstance(value, str | int | float | bool) and repr(value) not in message
        else ""
    )
    # "Input should be ..." reads as "input should be ..."; a message that opens with a name (MAX_NEW_TOKENS) keeps it.
    if message[1:2].islower():
        message = message[:1].lower() + message[1:]
    return f"{name}: {message}{shown}"


def check_aliases(environ: Mapping[str, str]) -> None:
    upper = {key.upper(): value for key, value in environ.items()}
    primary, alias = upper.get("IDLE_TIMEOUT_S"), upper.get(IDLE_TIMEOUT_ALIAS)
    if primary is not None and alias is not None and primary.strip() != alias.strip():
        raise SettingsError(
            f"IDLE_TIMEOUT_S ({primary!r}) and its alias {IDLE_TIMEOUT_ALIAS} ({alias!r}) disagree; set one"
        )

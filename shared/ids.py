"""Identifiers and user-supplied values that must be validated before use.

Session ids end up in file paths, Redis keys and URLs, so they are checked against a strict
pattern before anything else touches them.
"""

from __future__ import annotations

import re
import secrets

from shared.errors import InvalidPhoneNumber, InvalidSessionId

# lower-case letters, digits, '-' and '_'; starts with a letter or digit; 3-64 characters
SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{2,63}$")
PHONE_RE = re.compile(r"^[1-9][0-9]{5,14}$")
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_session_id() -> str:
    return "s_" + "".join(secrets.choice(_ALPHABET) for _ in range(20))


def new_profile_id() -> str:
    return "p_" + secrets.token_hex(10)


def check_session_id(value: object) -> str:
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise InvalidSessionId(
            "session id must be 3-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )
    return value


def normalize_phone(value: object) -> str:
    """E.164 digits without '+': accepts a leading '+' and spaces, dashes, dots or parentheses."""
    if not isinstance(value, str):
        raise InvalidPhoneNumber("phone_number must be a string of digits in international format")
    digits = re.sub(r"[\s().-]", "", value)
    if digits.startswith("+"):
        digits = digits[1:]
    if not PHONE_RE.fullmatch(digits):
        raise InvalidPhoneNumber("phone_number must be 6-15 digits in international format, e.g. 12025550108")
    return digits

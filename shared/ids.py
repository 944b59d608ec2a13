"""Identifiers and user-supplied values that must be validated before use.

Session ids end up in file paths, Redis keys and URLs, so they are checked against a strict
pattern before anything else touches them.

Session ids are one namespace for every workspace, so a client may not choose just any id (it
would learn from a ``409`` that another workspace has it): a client-chosen id lives in its
workspace's namespace, ``<workspace id>.<local part>`` (``acme.acct-1``). A workspace id never
contains ``.`` (:data:`WORKSPACE_ID_RE`), so two workspaces' namespaces never overlap, and ids the
gateway generates (``s_…``, random) have no ``.`` at all. Ids without a namespace made before this
rule stay valid to address.
"""

from __future__ import annotations

import re
import secrets

from shared.errors import InvalidPhoneNumber, InvalidSessionId, InvalidWorkspaceId, SessionIdOutsideWorkspace

_WORD = r"[a-z0-9][a-z0-9_-]"  # lower-case letters, digits, '-' and '_'; a letter or digit first
NAMESPACE_SEPARATOR = "."
# a workspace id that can prefix chosen session ids: 1-64 characters, never the separator
WORKSPACE_ID_RE = re.compile(rf"^{_WORD}{{0,63}}$")
# a client-chosen id: <workspace id>.<local part of 1-64 characters>
CHOSEN_SESSION_ID_RE = re.compile(rf"^{_WORD}{{0,63}}\.{_WORD}{{0,63}}$")
# any session id: a chosen one, or (generated, or chosen before namespaces) 3-64 characters without '.'
SESSION_ID_RE = re.compile(rf"^(?:{_WORD}{{0,63}}\.{_WORD}{{0,63}}|{_WORD}{{2,63}})$")
PHONE_RE = re.compile(r"^[1-9][0-9]{5,14}$")
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
GENERATED_SESSION_ID_RE = re.compile(rf"^s_[{_ALPHABET}]{{20}}$")


def new_session_id() -> str:
    return "s_" + "".join(secrets.choice(_ALPHABET) for _ in range(20))


def new_profile_id() -> str:
    return "p_" + secrets.token_hex(10)


def check_session_id(value: object) -> str:
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise InvalidSessionId(
            "session id must be <workspace id>.<1-64 characters of a-z, 0-9, '-' or '_', starting "
            "with a letter or digit> (or 3-64 such characters for ids made by walink)"
        )
    return value


def namespace_of(session_id: str) -> str | None:
    """The workspace whose namespace a (checked) session id is in; None: a generated or older id."""
    workspace, separator, _ = session_id.partition(NAMESPACE_SEPARATOR)
    return workspace if separator else None


def check_chosen_session_id(value: object, workspace_id: str) -> str:
    """A session id a client chose for a new session of ``workspace_id``: in that workspace's namespace.

    Rejected otherwise (400, saying the exact prefix), whether or not the id exists anywhere."""
    session_id = check_session_id(value)
    prefix = workspace_id + NAMESPACE_SEPARATOR
    if not WORKSPACE_ID_RE.fullmatch(workspace_id):
        raise SessionIdOutsideWorkspace(
            f"workspace {workspace_id[:64]!r} cannot choose session ids (its id is not 1-64 characters of "
            "a-z, 0-9, '-' or '_'); leave out id to get a generated one"
        )
    if namespace_of(session_id) != workspace_id:
        raise SessionIdOutsideWorkspace(
            f"a session id you choose must start with your workspace's prefix {prefix!r}, e.g. "
            f"{prefix}acct-1 (or leave out id to get a generated one)"
        )
    return session_id


def check_new_session_id(value: object, workspace_id: str) -> str:
    """The id of a session being created on a worker: one the gateway generated, or one chosen in
    ``workspace_id``'s namespace (:func:`check_chosen_session_id`)."""
    if isinstance(value, str) and GENERATED_SESSION_ID_RE.fullmatch(value):
        return value
    return check_chosen_session_id(value, workspace_id)


def check_workspace_id(value: object) -> str:
    """The id of a workspace being made: 1-64 characters of a-z, 0-9, '-' or '_' (never '.')."""
    if not isinstance(value, str) or not WORKSPACE_ID_RE.fullmatch(value):
        raise InvalidWorkspaceId(
            "workspace id must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
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

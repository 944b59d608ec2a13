"""User input that reaches Postgres, Redis or a header: checked whole before anything acts on it.

Postgres ``text`` and ``jsonb`` refuse the NUL character (``\\u0000``), so a NUL that got through
would fail a write halfway through a request, after a workspace row, a lease or a browser already
exist. Every user string is therefore checked here first, at the edge (gateway and worker alike),
and a bad one is a 400 that changes nothing:

* text fields (``label``, ``webhook_url``, query values): no NUL; strings that end up in a
  header or a key (``workspace_id``) no control character at all;
* text walink cannot refuse (a push name, chosen by the phone's owner) is stored without its
  NULs (:func:`storable`);
* ``metadata``: a JSON object, no NUL in any key or string value, at most
  :data:`MAX_METADATA_DEPTH` levels of nesting and :data:`MAX_METADATA_BYTES` serialized, since it
  is copied into every event of its session (webhook bodies, ``GET /v1/events``).

The rules for the body of ``POST /v1/sessions`` live in :func:`check_create_body`, which both the
gateway and the workers apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import BadRequest, InvalidMetadata, InvalidText
from shared.ids import check_session_id
from shared.webhook_config import check_event_filter

MAX_METADATA_BYTES = 4096
"""``metadata`` serialized (compact JSON, UTF-8) may not exceed this; every event embeds it."""
MAX_METADATA_DEPTH = 8
"""Nesting levels of ``metadata`` (the object itself is level 1)."""
MAX_LABEL_CHARS = 200
MAX_WEBHOOK_URL_CHARS = 2048
MAX_WORKSPACE_ID_CHARS = 64

CREATE_FIELDS = frozenset({"id", "workspace_id", "label", "webhook_url", "metadata", "events"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_text(value: str, name: str) -> str:
    """``value`` when it holds no NUL (Postgres text refuses it), else :class:`InvalidText`."""
    if "\x00" in value:
        raise InvalidText(f"{name} must not contain the NUL character (\\u0000)")
    return value


def storable(value: str) -> str:
    """Text that comes from outside and cannot be refused (a WhatsApp push name, set by the phone's
    owner), made storable: without its NUL characters."""
    return value.replace("\x00", "")


def check_workspace_id(value: object, name: str = "workspace_id") -> str:
    """A workspace id as a caller names it: 1-64 characters, none of them a control character
    (it travels in a header between the gateway and the workers, and is a key in Postgres)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_WORKSPACE_ID_CHARS:
        raise BadRequest(f"{name} must be a string of 1-{MAX_WORKSPACE_ID_CHARS} characters")
    if _CONTROL.search(value):
        raise InvalidText(f"{name} must not contain control characters (NUL, line breaks, …)")
    return value


def optional_text(data: dict[str, Any], key: str, *, max_len: int) -> str | None:
    """``data[key]``: absent/null, or a string of at most ``max_len`` characters without NUL."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise BadRequest(f"{key} must be a string of at most {max_len} characters")
    return check_text(value, key)


def check_metadata(value: object) -> dict[str, Any]:
    """A session's ``metadata``: an object of at most :data:`MAX_METADATA_BYTES` serialized and
    :data:`MAX_METADATA_DEPTH` levels, with no NUL in any key or string."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMetadata("metadata must be a JSON object")
    _check_json(value, "metadata", 1)
    size = len(orjson.dumps(value))
    if size > MAX_METADATA_BYTES:
        raise InvalidMetadata(
            f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed "
            "(it is copied into every event of the session)"
        )
    return value


def _check_json(value: object, where: str, depth: int) -> None:
    if isinstance(value, dict | list) and depth > MAX_METADATA_DEPTH:
        raise InvalidMetadata(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels (at {where})")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or "\x00" in key:
                raise InvalidMetadata(f"a key in {where} contains the NUL character (\\u0000)")
            _check_json(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, str) and "\x00" in value:
        raise InvalidMetadata(f"{where} contains the NUL character (\\u0000)")


@dataclass(frozen=True, slots=True)
class CreateBody:
    """The checked body of ``POST /v1/sessions``."""

    id: str | None
    workspace_id: str | None
    label: str | None
    webhook_url: str | None
    metadata: dict[str, Any]
    events: list[str] | None  # the event types its webhook receives (None: all)


def check_create_body(data: dict[str, Any]) -> CreateBody:
    """Every field of a create, checked (unknown fields refused): nothing of it can fail later.

    (Whether ``webhook_url`` may be reached is the workers' call: :mod:`shared.webhook_guard`.)"""
    extra = sorted(set(data) - CREATE_FIELDS)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}; allowed: {', '.join(sorted(CREATE_FIELDS))}")
    session_id = data.get("id")
    workspace_id = data.get("workspace_id")
    webhook_url = optional_text(data, "webhook_url", max_len=MAX_WEBHOOK_URL_CHARS)
    if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
        raise BadRequest("webhook_url must be an http(s) URL")
    return CreateBody(
        id=check_session_id(session_id) if session_id is not None else None,
        workspace_id=check_workspace_id(workspace_id) if workspace_id is not None else None,
        label=optional_text(data, "label", max_len=MAX_LABEL_CHARS),
        webhook_url=webhook_url,
        metadata=check_metadata(data.get("metadata")),
        events=check_event_filter(data.get("events")),
    )

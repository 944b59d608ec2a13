"""QR payloads: refs, the ``ref,noise,identity,adv,platform`` string, and its module matrix."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

import segno

REF_PREFIX = "2@"
URL_PREFIX = "https://wa.me/settings/linked_devices#"


def new_ref() -> str:
    """A server-issued ref: ``2@`` + base64 of 60 random bytes (82 chars)."""
    return REF_PREFIX + base64.b64encode(secrets.token_bytes(60)).decode("ascii")


def full_text(ref: str, noise_pub: str, identity_pub: str, adv_secret: str, platform: str) -> str:
    return ",".join((ref, noise_pub, identity_pub, adv_secret, platform))


def qr_matrix(text: str) -> list[list[int]]:
    """Module matrix (1 = dark) of ``text``: error level L, no boost, no quiet zone."""
    code = segno.make(text, error="L", boost_error=False, micro=False)
    return [[1 if module else 0 for module in row] for row in code.matrix]  # .matrix has no quiet zone


def qr_matrices(texts: list[str]) -> list[list[list[int]]]:
    return [qr_matrix(text) for text in texts]


@dataclass(frozen=True, slots=True)
class ScannedQr:
    ref: str
    noise_pub: str
    identity_pub: str
    adv_secret: str
    platform: str | None


def parse_qr(raw: str) -> ScannedQr | None:
    """Parse what a phone camera reads: 4, 5 or 6 comma-separated parts, optional wa.me prefix."""
    text = raw.strip()
    if text.startswith(URL_PREFIX):
        text = text[len(URL_PREFIX) :]
    parts = text.split(",")
    if len(parts) not in (4, 5, 6) or not all(parts[:4]):
        return None
    platform = parts[4] if len(parts) >= 5 else None
    return ScannedQr(parts[0], parts[1], parts[2], parts[3], platform)

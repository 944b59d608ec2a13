"""WebAuthn assertions made in Python, as an authenticator would (for tests of the verifier and of
the worker's checks): ES256 over ``authenticatorData || SHA-256(clientDataJSON)``."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.async_api import BrowserContext, Page

from simulator.passkeys import b64url, unb64url

ORIGIN = "https://web.whatsapp.com"
RP_ID = "whatsapp.com"


def new_private_key() -> str:
    """A fresh P-256 key as PKCS#8 DER, base64url."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return b64url(der)


def assertion(
    private_key: str,
    credential_id: str,
    challenge: str,
    *,
    origin: str = ORIGIN,
    rp_id: str = RP_ID,
    flags: int = 0x05,
    sign_count: int = 1,
    kind: str = "webauthn.get",
) -> dict[str, Any]:
    """``AuthenticationResponseJSON`` signed with ``private_key`` (PKCS#8, base64url)."""
    key = serialization.load_der_private_key(unb64url(private_key, "private_key"), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    client_data = json.dumps(
        {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}
    ).encode()
    auth_data = hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + sign_count.to_bytes(4, "big")
    signature = key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
    return {
        "id": credential_id,
        "rawId": credential_id,
        "type": "public-key",
        "authenticatorAttachment": "platform",
        "clientExtensionResults": {},
        "response": {
            "clientDataJSON": b64url(client_data),
            "authenticatorData": b64url(auth_data),
            "signature": b64url(signature),
            "userHandle": None,
        },
    }


def _std_b64(b64url_text: str) -> str:
    """CDP's binary fields are standard base64."""
    return base64.b64encode(unb64url(b64url_text, "value")).decode()


async def virtual_authenticator(
    context: BrowserContext, page: Page, credential_id: str, private_key: str
) -> None:
    """A platform authenticator with user verification (CDP WebAuthn domain) on ``page``,
    holding one credential for rpId whatsapp.com: ``credential_id`` with ``private_key``."""
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    added = await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    await cdp.send(
        "WebAuthn.addCredential",
        {
            "authenticatorId": added["authenticatorId"],
            "credential": {
                "credentialId": _std_b64(credential_id),
                "isResidentCredential": False,
                "rpId": RP_ID,
                "privateKey": _std_b64(private_key),
                "signCount": 0,
            },
        },
    )

"""QR images for the API: PNG and SVG drawn by segno from the raw QR string."""

from __future__ import annotations

import io

import segno


def _make(raw: str) -> segno.QRCode:
    # error level L like WhatsApp Web's own canvas; let segno pick the version
    return segno.make(raw, error="l", boost_error=False, micro=False)


def png(raw: str, *, scale: int = 6) -> bytes:
    buf = io.BytesIO()
    _make(raw).save(buf, kind="png", scale=scale, border=4)
    return buf.getvalue()


def svg(raw: str, *, scale: int = 6) -> bytes:
    buf = io.BytesIO()
    _make(raw).save(buf, kind="svg", scale=scale, border=4, xmldecl=False, svgns=True)
    return buf.getvalue()

"""Masking of credentials in anything that leaves the process (logs, errors, metrics)."""

from __future__ import annotations

import re

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def mask_credentials(text: str) -> str:
    """``https://user:token@host/x`` → ``https://***@host/x``, wherever it appears in text."""
    return _URL_USERINFO.sub(r"\1***@", text)

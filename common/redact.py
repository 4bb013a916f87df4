"""Untrusted text in logs and status messages: at most a short, escaped prefix of it.

Client ids, fingerprints and reasons come from callers; quoting them whole lets one call write a megabyte line
into the log or smuggle newlines and terminal escapes into it. `shown` is the one way they are quoted.
"""
from __future__ import annotations

SHOWN_CHARS = 40  # characters of an untrusted string that logs and status messages show


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """`text` quoted and escaped (repr), cut to `limit` characters with the full length said when longer."""
    if not isinstance(text, str):
        return str(text)[:limit]
    value = text
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"

"""Structured logging: every record may carry the client and round it concerns, shown in text or JSON lines.

Code attaches context with ``log.info(..., extra=context(client=..., round=...))`` or through a
:class:`ContextLogger` that carries a fixed client id. ``--log-format json`` prints one JSON object per line.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, MutableMapping

CONTEXT_FIELDS = ("client", "round", "step")
LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def context(**fields: Any) -> dict[str, Any]:
    """The `extra=` mapping of a log call: only the context fields that are set."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context fields {sorted(unknown)}; use {', '.join(CONTEXT_FIELDS)}")
    return {k: v for k, v in fields.items() if v is not None}


def _record_context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    """The classic one-line format, followed by `[client=... round=...]` when the record carries them."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = _record_context(record)
        if not ctx:
            return text
        first, sep, rest = text.partition("\n")
        return first + " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]" + sep + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, context fields, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                                 **_record_context(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ContextLogger(logging.LoggerAdapter):
    """A logger that adds fixed context (e.g. the client id) to every record, merged with the call's `extra`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr in `fmt` ("text" or "json") at `level`; quiet the chattiest libraries."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])  # no-op if already configured
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


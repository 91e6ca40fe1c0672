"""Route tokens never reach a log file.

A route token is the capability of a sandbox's previews (anyone holding one reaches
the sandbox's public ports), so log lines name sandboxes by id, never by token. The
filter rewrites `/sandboxes-dp/<token>`, `/sandboxes-preview/<token>` and the host
forms `<token>.sandbox.` / `p<port>-<token>.sandbox.` in every record it sees.
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    (re.compile(r"(/sandboxes-(?:dp|preview)/)[a-z0-9]{1,32}"), r"\1<route>"),
    (re.compile(r"\b(p\d{1,5}-)?[a-z0-9]{1,32}(\.sandbox\.)"), r"\1<route>\2"),
]
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_FORMATTER = logging.Formatter()


class RedactRouteTokens(logging.Filter):
    """Rewrites the message (arguments merged in) of each record without a route token, and
    its traceback and stack too (a DisallowedHost names the host it refused)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message and isinstance(record.args, tuple):
            # each argument on its own first: formatters that read the arguments (uvicorn's
            # access log unpacks its five) keep working
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
            if isinstance(record.msg, str):
                record.msg = redact(record.msg)
            message = record.getMessage()
            cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)  # formatters use it as is
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_on_uvicorn() -> None:
    """uvicorn configures its own handlers; give them the filter too."""
    for name in UVICORN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(RedactRouteTokens())

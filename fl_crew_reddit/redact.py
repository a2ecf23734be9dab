"""Secrets in text: the user:password part of URLs, masked wherever a setting or a message could show one (logs,
history, state, reports, console). No imports of ours, so every layer (reddit/ included) can use it."""
from __future__ import annotations

import logging
import re

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#\"'<>\\]+)@")


def mask_url_credentials(text: str) -> str:
    """`text` with the user:password part of every URL in it masked: http://***:***@host/... (a user alone:
    http://***@host/...). Everything else is left as it is."""
    if "@" not in text:
        return text
    return _URL_USERINFO.sub(
        lambda match: match["scheme"] + ("***:***@" if ":" in match["userinfo"] else "***@"), text)


class MaskUrlCredentials(logging.Filter):
    """A log handler's filter: masks URL credentials in each record's message and traceback (`mask_url_credentials`),
    whatever logger the record comes from (our MCP client, CrewAI, LiteLLM, httpx)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            masked = mask_url_credentials(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = mask_url_credentials(record.exc_text)
            if record.stack_info:
                record.stack_info = mask_url_credentials(record.stack_info)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is the handler's to report
            pass
        return True

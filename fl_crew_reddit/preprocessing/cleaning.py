"""Pure text cleaning for Reddit bodies: markdown to plain text, URLs out, removed/bot content recognised.

No I/O. Each rule that drops a comment returns a reason string so the pipeline can count it.
"""
from __future__ import annotations

import re

REMOVED_BODIES = {"[deleted]", "[removed]", "[deleted by user]", ""}
BOT_AUTHORS = {"automoderator"}
BOT_AUTHOR_PATTERN = re.compile(r"(bot|_bot|-bot)$", re.IGNORECASE)
BOT_BODY_PATTERN = re.compile(
    r"(i am a bot|i'm a bot|this action was performed automatically|beep boop|^remindme!)", re.IGNORECASE)

_MARKDOWN_LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^()\s]|\([^()]*\))*\)")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_QUOTE_LINE = re.compile(r"^\s*(>|&gt;).*$", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|__|~~|\^)(.+?)\1")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)([^*\n]+?)\*(?!\w)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*", re.MULTILINE)
_HTML_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&nbsp;": " ", "&#x200B;": "", "&quot;": '"'}
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def is_removed(body: str | None) -> bool:
    return body is None or body.strip().lower() in REMOVED_BODIES


def is_bot(author: str | None, body: str) -> bool:
    """Bots and moderator automation write text no person wrote: it teaches the model boilerplate."""
    if author:
        name = author.lower()
        if name in BOT_AUTHORS or BOT_AUTHOR_PATTERN.search(name):
            return True
    return bool(BOT_BODY_PATTERN.search(body.strip()))


def clean_text(text: str) -> str:
    """Markdown to plain text: links keep their words, bare URLs and quoted lines go, whitespace is tidied."""
    for entity, char in _HTML_ENTITIES.items():
        text = text.replace(entity, char)
    text = _QUOTE_LINE.sub("", text)
    text = _MARKDOWN_LINK.sub(lambda m: m.group(1), text)
    text = _URL.sub("", text)
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub(lambda m: m.group(2), text)
    text = _ITALIC.sub(lambda m: m.group(1), text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalise_for_dedupe(text: str) -> str:
    """Key for exact-duplicate detection: case, punctuation and spacing do not make a reply new."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def drop_reason(author: str | None, body: str | None, min_chars: int = 2) -> str | None:
    """Why a comment cannot be a training reply, or None if it can (on the raw body)."""
    if is_removed(body):
        return "deleted_or_removed"
    if is_bot(author, body or ""):
        return "bot_or_moderator"
    if len(clean_text(body or "")) < min_chars:
        return "empty_after_cleaning"
    return None

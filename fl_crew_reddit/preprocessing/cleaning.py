"""Pure text cleaning for Reddit bodies: control and invisible characters out, markdown to plain text, URLs out,
removed/bot/moderator content recognised, personal data (user handles, e-mail addresses, phone numbers) replaced by
placeholders, language checked.

No I/O. Each rule that drops a comment returns a reason string, and each rule that changes a text counts what it
changed, so the pipeline can report both.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

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


def is_bot(author: str | None, body: str, distinguished: str | None = None, stickied: bool = False) -> bool:
    """Bots and moderator notes write text no person wrote as a reply: it teaches the model boilerplate.

    Moderator notes are comments posted with the mod badge (`distinguished == "moderator"`, or "admin") or pinned to
    the top of the thread (`stickied`: only moderators can pin a comment)."""
    if stickied or (distinguished or "").lower() in ("moderator", "admin"):
        return True
    if author:
        name = author.lower()
        if name in BOT_AUTHORS or BOT_AUTHOR_PATTERN.search(name):
            return True
    return bool(BOT_BODY_PATTERN.search(body.strip()))


# --- control and invisible characters -----------------------------------------------------------------------------
# Characters nobody sees but a tokenizer does: they teach the model noise, and bidi overrides can make a text read
# differently from what it says. Line ends (\r\n, \r) become \n; tabs and newlines stay.
_INVISIBLE_KINDS = {
    "control": "\x00-\x08\x0b-\x1f\x7f-\x9f",  # C0 and C1 controls (NUL, BEL, ESC, ...) and DEL
    "bidi": "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069",  # direction marks, embeddings, overrides, isolates
    "zero_width": "\u180e\u200b-\u200d\u2060-\u2064",  # zero-width space / (non-)joiner, word joiner, ...
    "bom": "\ufeff",  # byte-order mark (zero-width no-break space)
}
_INVISIBLE = re.compile(f"[{''.join(_INVISIBLE_KINDS.values())}]")
_ZWJ, _ZWNJ = "\u200d", "\u200c"
_EMOJI_TAILS = {"\ufe0f", *map(chr, range(0x1F3FB, 0x1F400))}  # variation selector, skin tones


_KIND_PATTERNS = [(kind, re.compile(f"[{chars}]")) for kind, chars in _INVISIBLE_KINDS.items()]


def _invisible_kind(char: str) -> str:
    return next(kind for kind, pattern in _KIND_PATTERNS if pattern.match(char))


def _is_emoji(char: str) -> bool:
    return unicodedata.category(char) == "So" or char in _EMOJI_TAILS


def _joins(text: str, at: int) -> bool:
    """A joiner that belongs to its text: a ZWJ inside an emoji sequence (👨‍👩‍👧), a ZWNJ between two letters of a
    script that needs it (Persian, Indic). Those stay."""
    before, after = text[at - 1] if at else "", text[at + 1] if at + 1 < len(text) else ""
    if not before or not after:
        return False
    if text[at] == _ZWJ:
        return _is_emoji(before) and _is_emoji(after)
    return (text[at] == _ZWNJ and ord(before) > 0x2FF and ord(after) > 0x2FF
            and unicodedata.category(before)[0] in "LM" and unicodedata.category(after)[0] in "LM")


def strip_invisible(text: str) -> tuple[str, Counter]:
    """`text` without control and invisible characters (NUL and other controls, bidi marks and overrides,
    zero-width characters, byte-order marks), and how many of each kind went. Line ends become \n; tabs,
    newlines and joiners that belong to an emoji sequence or a script stay."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not _INVISIBLE.search(text):
        return text, Counter()
    counts: Counter = Counter()

    def drop(match: re.Match) -> str:
        char = match.group(0)
        if char in (_ZWJ, _ZWNJ) and _joins(match.string, match.start()):
            return char
        counts[_invisible_kind(char)] += 1
        return ""

    return _INVISIBLE.sub(drop, text), counts


def clean_text(text: str) -> str:
    """Markdown to plain text: invisible characters go (see `strip_invisible`), links keep their words, bare URLs
    and quoted lines go, whitespace is tidied."""
    text = strip_invisible(text)[0]
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


def has_quote(text: str) -> bool:
    """The body quotes someone (`> ...` lines), which `clean_text` removes: the quote is not the author's reply."""
    return bool(_QUOTE_LINE.search(text))


def drop_reason(author: str | None, body: str | None, min_chars: int = 2, *, distinguished: str | None = None,
                stickied: bool = False, max_chars: int = 0) -> str | None:
    """Why a comment cannot be a training reply, or None if it can (on the raw body).

    `max_chars` (0: no limit) drops huge bodies before any tokenizer or detector sees them."""
    if is_removed(body):
        return "deleted_or_removed"
    if max_chars and len(body) > max_chars:
        return "over_max_chars"
    if is_bot(author, body or "", distinguished, stickied):
        return "bot_or_moderator"
    if len(clean_text(body or "")) < min_chars:
        return "empty_after_cleaning"
    return None


# --- personal data ------------------------------------------------------------------------------------------------
# Placeholders keep the sentence readable ("ask [user], she knows") without teaching the model who anyone is.
USER_PLACEHOLDER = "[user]"
EMAIL_PLACEHOLDER = "[email]"
PHONE_PLACEHOLDER = "[phone]"

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Reddit usernames: 3-20 of letters, digits, _ and -, written u/name or /u/name.
_REDDIT_HANDLE = re.compile(r"(?<![\w/])/?u/[A-Za-z0-9_-]{3,20}\b")
# @handles (Twitter, Instagram, ...), starting with a letter or _ ("@3x" is a size); the lookbehind keeps e-mail
# addresses, "foo@bar" and "[name]@host" out.
_AT_HANDLE = re.compile(r"(?<![\w@.\])])@[A-Za-z_](?:[A-Za-z0-9_.]{0,28}[A-Za-z0-9_])?\b")
# International: +, country code, then digit groups with optional separators; checked for 8-15 digits (E.164).
_INTERNATIONAL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?![\d-])")
# US / NANP: (202) 555-0143, 202-555-0143, 202.555.0143, 202 555 0143, 1-800-555-0199: 3-3-4 digit groups with
# separators, area code and exchange starting 2-9, so years (2015) and plain digit runs (1234567890) never match.
_US_PHONE = re.compile(r"(?<![\w+-])(?:1[\s.-])?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[\s.-])[2-9]\d{2}[\s.-]\d{4}(?![\w-])")


def _replace_international_phone(match: re.Match) -> str:
    digits = sum(char.isdigit() for char in match.group(0))
    return PHONE_PLACEHOLDER if 8 <= digits <= 15 else match.group(0)


def scrub_personal_data(text: str) -> tuple[str, Counter]:
    """Replace user handles, e-mail addresses and phone numbers with placeholders; count each kind replaced.

    E-mail addresses go first, so their `@host` part is never taken for an @handle."""
    counts: Counter = Counter()
    text, counts["email"] = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    text, counts["reddit_handle"] = _REDDIT_HANDLE.subn(USER_PLACEHOLDER, text)
    text, counts["at_handle"] = _AT_HANDLE.subn(USER_PLACEHOLDER, text)
    before = text.count(PHONE_PLACEHOLDER)
    text = _INTERNATIONAL_PHONE.sub(_replace_international_phone, text)
    text = _US_PHONE.sub(PHONE_PLACEHOLDER, text)
    counts["phone"] = text.count(PHONE_PLACEHOLDER) - before
    return text, +counts  # unary plus drops the zero counts


# --- language -----------------------------------------------------------------------------------------------------
# Shorter replies are not judged. On reddit-2015 langdetect misjudged 1 in ~150 English replies of 5+ words and
# 1 in ~3,000 of 10+ words.
LANGUAGE_MIN_WORDS = 10
LANGUAGE_MIN_PROBABILITY = 0.1  # dropped only when the allowed languages together score below this
_LANGUAGE_SAMPLE_CHARS = 600  # enough text for a stable guess, and bounded time per reply


def language_drop_reason(text: str, allowed: frozenset[str] | set[str]) -> str | None:
    """Return "other_language" when langdetect is confident `text` is in none of `allowed` (langdetect codes,
    e.g. {"en"}).

    Short texts, texts without letters and an empty `allowed` are not judged. langdetect is seeded (seed 0), so
    the same text always gets the same verdict."""
    if not allowed or len(text.split()) < LANGUAGE_MIN_WORDS:
        return None
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        guesses = detect_langs(text[:_LANGUAGE_SAMPLE_CHARS])
    except LangDetectException:  # no letters to judge (numbers, emoji, code)
        return None
    allowed_probability = sum(g.prob for g in guesses if g.lang in allowed or g.lang.split("-")[0] in allowed)
    return "other_language" if allowed_probability < LANGUAGE_MIN_PROBABILITY else None

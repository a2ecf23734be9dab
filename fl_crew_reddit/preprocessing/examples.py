"""Reddit threads → prompt/reply chat examples in the base model's own chat template.

A top-level comment answers the post (title + body); a nested comment answers its parent comment, with the post
title as context. The reply is what the model learns to write; the prompt is only context (its tokens carry no loss).
Prompts and replies are cleaned (control and invisible characters removed and counted) and have personal data
replaced by placeholders before they become examples. A comment that is its own parent (`own_parent`), sits in a
cycle of parents (`parent_cycle`) or hangs below one (`ancestor_cycle`) never becomes an example: its thread does
not lead back to the post.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fl_crew_reddit.preprocessing.cleaning import (
    clean_text,
    drop_reason,
    has_quote,
    normalise_for_dedupe,
    scrub_personal_data,
    strip_invisible,
)
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost

PLAIN_TEMPLATE_PROMPT = "### Reddit post\n{prompt}\n\n### Reply\n"
PLAIN_TEMPLATE_END = "\n"


@dataclass
class ThreadExamples:
    examples: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    scrubbed: Counter = field(default_factory=Counter)  # texts changed but kept, by rule (once per distinct text)


class _TextCleaner:
    """clean_text + personal-data scrubbing, once per distinct post or comment text, counting what changed
    (`invisible_<kind>`: characters removed; `personal_data_<kind>`: replacements; `quoted_text`: texts)."""

    def __init__(self, scrub: bool, counts: Counter):
        self.scrub, self.counts, self._done = scrub, counts, {}

    def __call__(self, key: str, text: str) -> str:
        if key not in self._done:
            text, invisible = strip_invisible(text)
            self.counts.update({f"invisible_{kind}": n for kind, n in invisible.items()})
            if has_quote(text):
                self.counts["quoted_text"] += 1
            cleaned = clean_text(text)
            if self.scrub:
                cleaned, found = scrub_personal_data(cleaned)
                self.counts.update({f"personal_data_{kind}": n for kind, n in found.items()})
            self._done[key] = cleaned
        return self._done[key]


def post_prompt(post: RedditPost, clean=None) -> str:
    clean = clean or (lambda key, text: clean_text(text))
    title = clean("title", post.title)
    body = clean("selftext", post.selftext) if post.selftext else ""
    return f"r/{post.subreddit}: {title}" + (f"\n\n{body}" if body else "")


def thread_examples(post: RedditPost, comments: list[RedditComment], seen_replies: set[str], *,
                    max_chars: int = 0, scrub_personal: bool = True) -> ThreadExamples:
    """Prompt/reply pairs of one thread; `seen_replies` (normalised bodies) is shared to drop duplicates.

    `max_chars` (0: no limit): a post whose title and text are longer drops its whole thread, a longer comment
    is dropped; huge records are bad input, not conversation."""
    out = ThreadExamples()
    if max_chars and len(post.title) + len(post.selftext or "") > max_chars:
        out.dropped["post_over_max_chars"] += len(comments)
        return out
    clean = _TextCleaner(scrub_personal, out.scrubbed)

    def reason_for(comment: RedditComment) -> str | None:
        return drop_reason(comment.author, comment.body, distinguished=comment.distinguished,
                           stickied=comment.stickied, max_chars=max_chars)

    by_id = {comment.id: comment for comment in comments}
    context = post_prompt(post, clean)
    for comment in comments:
        reason = cycle_reason(comment, by_id) or reason_for(comment)
        if reason:
            out.dropped[reason] += 1
            continue
        reply = clean(comment.id, comment.body)
        if comment.parent_id.startswith("t1_"):
            parent = by_id.get(comment.parent_id[3:])
            if parent is None or reason_for(parent):
                out.dropped["parent_missing_or_removed"] += 1
                continue
            prompt = f"r/{post.subreddit}: {clean('title', post.title)}\n\n{clean(parent.id, parent.body)}"
        else:
            prompt = context
        key = normalise_for_dedupe(reply)
        if key in seen_replies:
            out.dropped["duplicate_reply"] += 1
            continue
        seen_replies.add(key)
        out.examples.append({
            "id": comment.id,
            "post_id": post.id,
            "subreddit": post.subreddit,
            "author": comment.author,
            "score": comment.score,  # votes pairs compare replies to the same parent by score
            "parent_id": comment.parent_id,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "image_paths": list(post.image_paths) if comment.parent_id.startswith("t3_") else [],
            "reply_to_post": comment.parent_id.startswith("t3_"),  # replies to the post pair with its media
        })
    return out


def cycle_reason(comment: RedditComment, by_id: dict[str, RedditComment]) -> str | None:
    """`own_parent`, `parent_cycle` (following parents leads back to the comment) or `ancestor_cycle` (it leads into
    a loop above the comment); None when the parents end at the post or at a comment not in `by_id`."""
    if comment.parent_id == f"t1_{comment.id}":
        return "own_parent"
    seen = {comment.id}
    parent_id = comment.parent_id
    while parent_id.startswith("t1_"):
        parent = by_id.get(parent_id[3:])
        if parent is None:
            return None
        if parent.id in seen:
            return "parent_cycle" if parent.id == comment.id else "ancestor_cycle"
        seen.add(parent.id)
        parent_id = parent.parent_id
    return None


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt text ending where the reply starts, reply text including its end-of-turn marker)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    # Base models without a chat template (e.g. Mistral-7B-v0.1): a plain, stable layout.
    prompt = PLAIN_TEMPLATE_PROMPT.format(prompt=messages[0]["content"])
    eos = tokenizer.eos_token or ""
    return prompt, messages[-1]["content"] + eos + PLAIN_TEMPLATE_END


def tokenize_example(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """input_ids plus a reply mask; prompts are cut from the left and replies from the right to fit."""
    prompt_text, reply_text = render_chat(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    truncated = False
    min_reply = min(len(reply_ids), max(8, max_length // 4))
    if len(prompt_ids) + len(reply_ids) > max_length:
        truncated = True
        keep_prompt = max(max_length - len(reply_ids), max_length - min_reply, 0)
        keep_prompt = min(keep_prompt, len(prompt_ids))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
        reply_ids = reply_ids[: max_length - len(prompt_ids)]
    if not reply_ids:
        return None
    return {"input_ids": prompt_ids + reply_ids, "reply_mask": [0] * len(prompt_ids) + [1] * len(reply_ids),
            "truncated": truncated}

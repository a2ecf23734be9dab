"""Preference pairs (chosen reply, rejected reply) for DPO, built from one client's kept SFT examples.

Two kinds:
- votes: two replies to the same parent (the post for top-level replies, the parent comment for nested ones) whose
  Reddit scores differ enough (PREF_MIN_SCORE_GAP and PREF_MIN_SCORE_RATIO); the higher-scored reply is chosen.
  A source whose scores are placeholders (every reply scores the same, as in the reddit-2015 sample) gives none.
- relevance: a reply (chosen) against a reply to another thread of the same subreddit (rejected): the model should
  prefer the answer that belongs to the question.

Pairs are built per split from examples that already passed every SFT rule, so a pair's texts are cleaned and
scrubbed like the SFT examples; the rejected reply of a relevance pair is drawn from the same split, so held-out
pairs never carry training text. Every candidate left out is counted by reason. Pure functions over example dicts,
no I/O.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

from fl_crew_reddit.preprocessing.examples import render_chat, tokenize_example

PAIR_KINDS = ("votes", "relevance")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class PreferenceRules:
    """The PREF_* settings (defaults = FLCrewRedditConfig's)."""

    kinds: tuple[str, ...] = PAIR_KINDS
    min_score_gap: int = 5
    min_score_ratio: float = 2.0  # higher / lower, both clipped at 1 from below
    max_pairs_per_parent: int = 3

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(PAIR_KINDS))
        if unknown:
            raise ValueError(f"PREF_PAIR_KINDS: unknown kind(s) {', '.join(unknown)}; use {', '.join(PAIR_KINDS)}")

    @classmethod
    def from_settings(cls, settings) -> PreferenceRules:
        """From any object with the FLCrewRedditConfig field names (the config itself)."""
        return cls(kinds=tuple(settings.pref_pair_kinds), min_score_gap=settings.pref_min_score_gap,
                   min_score_ratio=settings.pref_min_score_ratio,
                   max_pairs_per_parent=settings.pref_max_pairs_per_parent)


def scores_are_placeholders(examples: list[dict]) -> bool:
    """True when two or more examples exist and all carry the same score (or none): votes say nothing then."""
    scores = {example.get("score") for example in examples}
    return len(examples) >= 2 and len(scores) == 1


def pair_row(kind: str, chosen: dict, rejected: dict, with_scores: bool) -> dict:
    """One line of `<split>_pairs.jsonl`; the prompt is the chosen example's user message."""
    return {"id": f"{kind}:{chosen['id']}>{rejected['id']}", "post_id": chosen["post_id"],
            "subreddit": chosen["subreddit"], "kind": kind, "prompt": [dict(chosen["messages"][0])],
            "chosen": chosen["messages"][-1]["content"], "rejected": rejected["messages"][-1]["content"],
            "chosen_id": chosen["id"], "rejected_id": rejected["id"],
            "chosen_score": chosen.get("score") if with_scores else None,
            "rejected_score": rejected.get("score") if with_scores else None}


def vote_reason(high: int, low: int, rules: PreferenceRules) -> str | None:
    """Why two scores (high >= low) make no vote pair, or None when they do."""
    if high == low:
        return "votes_tie"
    if high - low < rules.min_score_gap:
        return "votes_gap_too_small"
    if max(high, 1) / max(low, 1) < rules.min_score_ratio:
        return "votes_ratio_too_small"
    return None


def vote_pairs(examples: list[dict], rules: PreferenceRules, dropped: Counter) -> list[dict]:
    """Pairs of replies to the same parent whose scores pass `vote_reason`, the higher one chosen; per parent the
    largest gaps first, at most `rules.max_pairs_per_parent` (the rest counted as `votes_over_parent_cap`)."""
    by_parent: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for example in examples:
        if not isinstance(example.get("score"), int):
            dropped["votes_no_score"] += 1
            continue
        parent = example.get("parent_id") or f"t3_{example['post_id']}"
        by_parent[(example["post_id"], parent)].append(example)
    pairs = []
    for key in sorted(by_parent):
        siblings = sorted(by_parent[key], key=lambda e: e["id"])
        candidates = []
        for first, second in combinations(siblings, 2):
            high, low = (first, second) if first["score"] >= second["score"] else (second, first)
            reason = vote_reason(high["score"], low["score"], rules)
            if reason:
                dropped[reason] += 1
            else:
                candidates.append((high["score"] - low["score"], high, low))
        candidates.sort(key=lambda c: (-c[0], c[1]["id"], c[2]["id"]))
        dropped["votes_over_parent_cap"] += max(0, len(candidates) - rules.max_pairs_per_parent)
        pairs.extend(pair_row("votes", high, low, True) for _, high, low in candidates[:rules.max_pairs_per_parent])
    return pairs


def relevance_pairs(examples: list[dict], seed: int, dropped: Counter, with_scores: bool = True) -> list[dict]:
    """Each reply against one reply to another thread of its subreddit, from `examples` only (one client's split),
    drawn with a generator seeded by SEED and the chosen reply's id: the same pairs whatever the examples' order."""
    by_subreddit: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        by_subreddit[example["subreddit"]].append(example)
    for group in by_subreddit.values():
        group.sort(key=lambda e: e["id"])
    pairs = []
    for chosen in sorted(examples, key=lambda e: e["id"]):
        others = [e for e in by_subreddit[chosen["subreddit"]] if e["post_id"] != chosen["post_id"]]
        if not others:
            dropped["relevance_no_other_thread"] += 1
            continue
        rejected = random.Random(f"{seed}:{chosen['id']}").choice(others)
        pairs.append(pair_row("relevance", chosen, rejected, with_scores))
    return pairs


def reply_fits(tokenizer, max_seq_length: int) -> Callable[[list[dict], str], bool]:
    """A test: does prompt + reply tokenize (`tokenize_example`) with the whole reply inside MAX_SEQ_LENGTH? A cut
    reply would compare halves of answers. Results are cached per (prompt, reply)."""
    cache: dict[tuple[str, str], bool] = {}

    def fits(prompt: list[dict], reply: str) -> bool:
        key = (prompt[-1]["content"], reply)
        if key not in cache:
            messages = [*prompt, {"role": "assistant", "content": reply}]
            row = tokenize_example(tokenizer, messages, max_seq_length)
            reply_tokens = len(tokenizer(render_chat(tokenizer, messages)[1], add_special_tokens=False)["input_ids"])
            cache[key] = row is not None and sum(row["reply_mask"]) == reply_tokens
        return cache[key]
    return fits


def split_pairs(examples: list[dict], rules: PreferenceRules, seed: int, *, scores_placeholder: bool,
                fits: Callable[[list[dict], str], bool] | None, dropped: Counter, built: Counter) -> list[dict]:
    """Every pair of the kinds in `rules` from one split of one client; `dropped` and `built` (per kind) grow."""
    pairs = []
    if "votes" in rules.kinds and not scores_placeholder:
        pairs += vote_pairs(examples, rules, dropped)
    if "relevance" in rules.kinds:
        pairs += relevance_pairs(examples, seed, dropped, with_scores=not scores_placeholder)
    kept = []
    for pair in pairs:
        if fits is not None and not (fits(pair["prompt"], pair["chosen"]) and fits(pair["prompt"], pair["rejected"])):
            dropped[f"{pair['kind']}_over_max_seq_length"] += 1
            continue
        built[pair["kind"]] += 1
        kept.append(pair)
    return kept


def client_pairs(splits: dict[str, list[dict]], rules: PreferenceRules, seed: int, *, scores_placeholder: bool,
                 fits: Callable[[list[dict], str], bool] | None, dropped: Counter,
                 built: Counter) -> dict[str, list[dict]]:
    """Pairs per split of one client ({"train": [...], "validation": [...], "test": [...]}): each split's pairs are
    made of that split's examples only, so a pair sits in its thread's split and no thread is in two splits."""
    return {split: split_pairs(examples, rules, seed, scores_placeholder=scores_placeholder, fits=fits,
                               dropped=dropped, built=built)
            for split, examples in splits.items()}

"""Self-improvement (SELF_IMPROVE): a client adds its own best generated replies to its next round's training.

At the start of round r ≥ 2 (so: right after round r − 1, with the new global adapter the client has just received)
a client takes a seeded sample of its own train prompts, generates SELF_IMPROVE_CANDIDATES replies to each (the first
greedy, through the evaluator's own `generate_replies`; the others sampled, seeded from SEED, round and client), and
keeps at most one per prompt:

1. rule filters, the first that fails is the reason counted: `empty`; `reply_under_min_tokens` /
   `reply_over_max_tokens` (MIN_/MAX_REPLY_TOKENS, counted as preprocessing counts them); `repeated_ngrams` (a word
   3-gram three or more times: a generation loop); `copies_prompt` (half or more of its word 3-grams, or all of a
   shorter reply, are in the prompt); `same_as_real_reply`; `other_language` (preprocessing's langdetect rule and
   LANGUAGES); `no_reply_tokens` (nothing left to train on after tokenizing); `duplicate_candidate` (the same text
   as an earlier candidate of the prompt);
2. the model's implicit reward, r(x, y) = [log π_global(y|x) − log π_base(y|x)] / |y|, where π_base is the same
   model with its adapter disabled (`model.disable_adapter()`, never a second copy). **Per token, not summed**:
   candidates are cut at SELF_IMPROVE_MAX_NEW_TOKENS (48) while the real replies they are measured against run to
   MAX_REPLY_TOKENS (512); the summed log-ratio grows with length, so summed rewards would mostly compare lengths.
   A candidate must score **at least the real reply's reward** (`below_real_reward`): the federation's model then
   prefers it to the human reply at least as much as the fine-tuning so far moved it towards human replies;
3. of the candidates left, **the best one per prompt** is kept (`not_best_for_prompt` for the others): two
   synthetic replies to one prompt would weigh that thread twice and are often near copies of each other.

The prompts sampled are ⌊SELF_IMPROVE_MAX_FRACTION × real train examples⌋, so the synthetic examples never exceed
that share. They are SFT example dicts (the keys of train.jsonl rows) plus `"synthetic": true`; they live only in the
client's train rows of that one round (`WithSynthetic`), never in a file, a validation or a test split. Generation
is deterministic for a seed (the sampled candidates draw from a forked RNG seeded from SEED, round and client), so a
resumed run regenerates exactly the examples the stopped one trained on; nothing needs saving.

**Collapse guard** (`CollapseGuard`): a client stops adding synthetic examples for the rest of the run once the
global model's validation perplexity on its data rose, or its validation preference accuracy fell, from one round to
the next (round 0: the base model): training on its own outputs is where collapse would start.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fl_crew_reddit.evaluation.evaluator import generate_replies
from fl_crew_reddit.preprocessing.cleaning import language_drop_reason
from fl_crew_reddit.preprocessing.examples import render_chat, tokenize_example
from fl_crew_reddit.training.dpo import reply_logprobs, reply_target_count

log = logging.getLogger(__name__)

NGRAM = 3  # word n-grams of the repetition and copy rules
MAX_NGRAM_REPEATS = 2  # a word 3-gram seen more often than this: a generation loop
MAX_PROMPT_OVERLAP = 0.5  # share of a candidate's word 3-grams found in the prompt from which it counts as a copy
TOP_P = 0.95  # nucleus sampling of the sampled candidates (temperature 1)
REJECT_REASONS = ("empty", "reply_under_min_tokens", "reply_over_max_tokens", "repeated_ngrams", "copies_prompt",
                  "same_as_real_reply", "other_language", "no_reply_tokens", "duplicate_candidate",
                  "below_real_reward", "not_best_for_prompt")
METRIC_PREFIX = "self_improve_"  # the keys this adds to a client's round metrics (history.json, `clients[].metrics`)


@dataclass(frozen=True)
class SelfImproveSettings:
    """SELF_IMPROVE_* and the quality rules the candidates must pass (defaults = FLCrewRedditConfig's)."""

    candidates: int = 2
    max_fraction: float = 0.25
    max_new_tokens: int = 48
    min_reply_tokens: int = 3
    max_reply_tokens: int = 512
    languages: frozenset[str] = frozenset({"en"})
    max_seq_length: int = 256
    seed: int = 42
    batch_size: int = 8

    @classmethod
    def from_settings(cls, settings) -> SelfImproveSettings:
        """From any object with the FLCrewRedditConfig field names (the config itself)."""
        return cls(candidates=settings.self_improve_candidates, max_fraction=settings.self_improve_max_fraction,
                   max_new_tokens=settings.self_improve_max_new_tokens, min_reply_tokens=settings.min_reply_tokens,
                   max_reply_tokens=settings.max_reply_tokens, languages=frozenset(settings.languages),
                   max_seq_length=settings.max_seq_length, seed=settings.seed)


# --- rule filters (pure) -------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _normalised(text: str) -> str:
    return " ".join(_words(text))


def repeats_ngrams(text: str) -> bool:
    """A word 3-gram occurs more than MAX_NGRAM_REPEATS times (a degenerate loop such as "I think I think ...")."""
    counts = Counter(_ngrams(_words(text)))
    return bool(counts) and max(counts.values()) > MAX_NGRAM_REPEATS


def copies_prompt(text: str, prompt: str) -> bool:
    """The reply mostly repeats the prompt: half or more of its word 3-grams are in it (a reply of fewer than three
    words: its words appear there in order)."""
    words, prompt_words = _words(text), _words(prompt)
    grams = _ngrams(words)
    if not grams:
        return bool(words) and f" {' '.join(words)} " in f" {' '.join(prompt_words)} "
    in_prompt = set(_ngrams(prompt_words))
    return sum(gram in in_prompt for gram in grams) / len(grams) >= MAX_PROMPT_OVERLAP


def rule_reason(text: str, prompt: str, real_reply: str, num_tokens: int, settings: SelfImproveSettings) -> str | None:
    """The first rule `text` (a generated reply of `num_tokens` tokens to `prompt`, the user message) fails, or None.
    `duplicate_candidate`, `no_reply_tokens` and the reward are judged by the caller."""
    if not text.strip():
        return "empty"
    if num_tokens < settings.min_reply_tokens:
        return "reply_under_min_tokens"
    if num_tokens > settings.max_reply_tokens:
        return "reply_over_max_tokens"
    if repeats_ngrams(text):
        return "repeated_ngrams"
    if copies_prompt(text, prompt):
        return "copies_prompt"
    if _normalised(text) == _normalised(real_reply):
        return "same_as_real_reply"
    return language_drop_reason(text, settings.languages)


# --- collapse guard (pure) -----------------------------------------------------------------------------------------
@dataclass
class CollapseGuard:
    """Which clients may still add synthetic examples. `observe` is called with each round's validation numbers of
    a client, in round order (round 0: the base model); the first round whose perplexity is higher, or whose
    preference accuracy is lower, than the client's previous observation stops the client for good. Missing numbers
    (None, NaN) are not compared."""

    stopped: dict[str, str] = field(default_factory=dict)  # client -> why it stopped
    _last: dict[str, tuple[int, float | None, float | None]] = field(default_factory=dict)

    def observe(self, client: str, round_number: int, validation_perplexity: float | None,
                preference_accuracy: float | None = None) -> str | None:
        """Record one round of `client`; returns the reason when this observation stops it."""
        ppl = _number(validation_perplexity)
        accuracy = _number(preference_accuracy)
        previous = self._last.get(client)
        self._last[client] = (round_number, ppl if ppl is not None else (previous[1] if previous else None),
                              accuracy if accuracy is not None else (previous[2] if previous else None))
        if client in self.stopped or previous is None:
            return None
        last_round, last_ppl, last_accuracy = previous
        reason = None
        if ppl is not None and last_ppl is not None and ppl > last_ppl:
            reason = (f"round {round_number}: validation perplexity rose from {last_ppl:.4g} (round {last_round}) "
                      f"to {ppl:.4g}")
        elif accuracy is not None and last_accuracy is not None and accuracy < last_accuracy:
            reason = (f"round {round_number}: validation preference accuracy fell from {last_accuracy:.4g} (round "
                      f"{last_round}) to {accuracy:.4g}")
        if reason:
            self.stopped[client] = reason
        return reason

    def allows(self, client: str) -> bool:
        return client not in self.stopped

    @classmethod
    def replay(cls, observations: Iterable[tuple[int, Mapping[str, float | None], Mapping[str, float | None]]]
               ) -> CollapseGuard:
        """The guard after `observations`: (round, {client: validation perplexity}, {client: validation preference
        accuracy}) in round order. Rebuilt from the run's history each time, so a resumed run stops the same clients."""
        guard = cls()
        for round_number, perplexities, accuracies in observations:
            for client in sorted(set(perplexities) | set(accuracies)):
                guard.observe(client, round_number, perplexities.get(client), accuracies.get(client))
        return guard


def _number(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


# --- sampling the prompts and generating -----------------------------------------------------------------------------
def seed_of(*parts) -> int:
    """A 63-bit seed from (SEED, round, client, ...): independent of PYTHONHASHSEED."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def synthetic_cap(num_real: int, max_fraction: float) -> int:
    """Most synthetic examples a client with `num_real` train examples may add in a round."""
    return int(math.floor(max_fraction * num_real + 1e-9))


def sample_prompts(examples: list[dict], client: str, round_number: int, settings: SelfImproveSettings) -> list[int]:
    """Positions (sorted) of the train examples whose prompts are answered this round: the cap's worth, drawn from
    (SEED, round, client)."""
    count = min(len(examples), synthetic_cap(len(examples), settings.max_fraction))
    rng = random.Random(seed_of(settings.seed, "self-improve-prompts", round_number, client))
    return sorted(rng.sample(range(len(examples)), count))


def sampled_replies(model, tokenizer, prompts: list[str], device: torch.device, max_new_tokens: int, seed: int,
                    batch_size: int = 8) -> list[str]:
    """Sampled replies (temperature 1, top-p TOP_P), laid out as `evaluation.evaluator.generate_replies` lays out
    its greedy ones (left padding, no special tokens added, decoded and stripped). The RNG is forked and seeded with
    `seed`, so the draw is the same for the same seed and the rest of the run's randomness is untouched."""
    model.eval()
    replies = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                        top_p=TOP_P, top_k=0, use_cache=True, pad_token_id=tokenizer.pad_token_id)
                new_tokens = output[:, encoded["input_ids"].shape[1]:]
                replies.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return replies


def generate_candidates(model, tokenizer, prompts: list[str], device: torch.device, settings: SelfImproveSettings,
                        client: str, round_number: int) -> list[list[str]]:
    """SELF_IMPROVE_CANDIDATES replies per prompt: the greedy one (the evaluator's `generate_replies`), then sampled
    ones, candidate k drawing from seed (SEED, round, client, k)."""
    per_candidate = [generate_replies(model, tokenizer, prompts, device, max_new_tokens=settings.max_new_tokens,
                                      batch_size=settings.batch_size)]
    for k in range(1, settings.candidates):
        per_candidate.append(sampled_replies(model, tokenizer, prompts, device, settings.max_new_tokens,
                                             seed_of(settings.seed, "self-improve", round_number, client, k),
                                             batch_size=settings.batch_size))
    return [list(replies) for replies in zip(*per_candidate)] if prompts else []


# --- the implicit reward -------------------------------------------------------------------------------------------
def reply_tokens(row: dict) -> int:
    """Reply tokens a row's log-probability sums over (`training.dpo.reply_target_count`; at least 1)."""
    return max(1, reply_target_count(row))


@torch.no_grad()
def implicit_rewards(model, rows: list[dict], device: torch.device, pad_id: int, batch_size: int = 8) -> list[float]:
    """Per-token implicit reward of each row's reply: [log π(y|x) − log π_base(y|x)] / |y|, π_base being `model`
    with its adapter disabled."""
    if not rows:
        return []
    model.eval()
    policy, base = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        policy.append(reply_logprobs(model, batch, device, pad_id).float().cpu())
        with model.disable_adapter():
            base.append(reply_logprobs(model, batch, device, pad_id).float().cpu())
    difference = torch.cat(policy) - torch.cat(base)
    return [float(d) / reply_tokens(row) for d, row in zip(difference.tolist(), rows)]


# --- the whole step ------------------------------------------------------------------------------------------------
@dataclass
class SelfImproveResult:
    """One client's synthetic examples for one round and what happened to every candidate."""

    examples: list[dict] = field(default_factory=list)  # SFT example dicts + "synthetic": true
    rows: list[dict] = field(default_factory=list)  # the examples tokenized, as the trainer takes them
    prompts: int = 0
    cap: int = 0
    generated: int = 0
    rejected: Counter = field(default_factory=Counter)
    stopped: str | None = None  # the collapse guard's reason, when it stopped this client
    real_reward: float | None = None  # mean implicit reward of the real replies of the sampled prompts
    kept_reward: float | None = None  # mean implicit reward of the kept candidates

    def metrics(self) -> dict:
        """The client's round metrics (history.json `rounds[].clients[].metrics`), keys prefixed METRIC_PREFIX:
        generated, kept, examples (trained on), cap, prompts, rejected_<reason> (every reason, 0 included), stopped
        (1.0 once the collapse guard stopped the client) with stop_reason, real_reward and kept_reward."""
        out = {"generated": self.generated, "kept": len(self.examples), "examples": len(self.rows), "cap": self.cap,
               "prompts": self.prompts, "stopped": 1.0 if self.stopped else 0.0,
               **{f"rejected_{reason}": int(self.rejected.get(reason, 0)) for reason in REJECT_REASONS}}
        if self.stopped:
            out["stop_reason"] = self.stopped
        if self.real_reward is not None:
            out["real_reward"] = self.real_reward
        if self.kept_reward is not None:
            out["kept_reward"] = self.kept_reward
        return {f"{METRIC_PREFIX}{key}": value for key, value in out.items()}

    def describe(self) -> str:
        if self.stopped:
            return f"stopped by the collapse guard ({self.stopped})"
        rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items())) or "none"
        return (f"{self.generated} replies generated for {self.prompts} prompts, {len(self.examples)} kept "
                f"(cap {self.cap}); rejected: {rejected}")


def synthetic_example(source: dict, reply: str, tokenizer, *, client: str, round_number: int, candidate: int,
                      reward: float, real_reward: float) -> dict:
    """A train.jsonl example dict for `reply` to `source`'s prompt (same keys, the reply replaced) plus
    `"synthetic": true` and where it came from."""
    messages = [*source["messages"][:-1], {"role": "assistant", "content": reply}]
    prompt, rendered_reply = render_chat(tokenizer, messages)
    return {**source, "id": f"{source['id']}~self-r{round_number}-c{candidate}", "author": None,
            "messages": messages, "prompt": prompt, "reply": rendered_reply, "synthetic": True,
            "source_id": source["id"], "client": client, "round": round_number, "candidate": candidate,
            "reward": reward, "real_reward": real_reward}


def improve(model, tokenizer, examples: list[dict], device: torch.device, settings: SelfImproveSettings, *,
            client: str, round_number: int, guard: CollapseGuard | None = None) -> SelfImproveResult:
    """`client`'s synthetic examples for round `round_number` from its real train `examples`, with the adapter the
    model holds now (the global adapter it received). Deterministic for (SEED, round, client) and the model."""
    result = SelfImproveResult(cap=synthetic_cap(len(examples), settings.max_fraction))
    if guard is not None and not guard.allows(client):
        result.stopped = guard.stopped[client]
        return result
    sources = [examples[i] for i in sample_prompts(examples, client, round_number, settings)]
    result.prompts = len(sources)
    if not sources:
        return result
    pad_id = tokenizer.pad_token_id
    prompts = [render_chat(tokenizer, source["messages"])[0] for source in sources]
    candidates = generate_candidates(model, tokenizer, prompts, device, settings, client, round_number)
    result.generated = sum(len(c) for c in candidates)

    # rule filters, then the rewards of the surviving candidates and of the real replies they must match
    real_rows = [tokenize_example(tokenizer, source["messages"], settings.max_seq_length) for source in sources]
    lengths = [len(ids) for ids in tokenizer([t for c in candidates for t in c],
                                             add_special_tokens=False)["input_ids"]]
    survivors: list[tuple[int, int, str, dict]] = []  # (prompt, candidate, text, row)
    position = 0
    for p, (source, texts) in enumerate(zip(sources, candidates)):
        seen: set[str] = set()
        for k, text in enumerate(texts):
            num_tokens, position = lengths[position], position + 1
            reason = rule_reason(text, source["messages"][0]["content"], source["messages"][-1]["content"],
                                 num_tokens, settings)
            row = None
            if reason is None:
                row = tokenize_example(tokenizer, [*source["messages"][:-1], {"role": "assistant", "content": text}],
                                       settings.max_seq_length)
                reason = "no_reply_tokens" if row is None or real_rows[p] is None else None
            if reason is None and _normalised(text) in seen:
                reason = "duplicate_candidate"
            if reason:
                result.rejected[reason] += 1
                continue
            seen.add(_normalised(text))
            survivors.append((p, k, text, row))
    scored = sorted({p for p, *_ in survivors})  # prompts with a candidate left: their real reply is the bar
    real_reward = dict(zip(scored, implicit_rewards(model, [real_rows[p] for p in scored], device, pad_id,
                                                    settings.batch_size)))
    rewards = implicit_rewards(model, [row for *_, row in survivors], device, pad_id, settings.batch_size)
    best: dict[int, tuple[float, int, str]] = {}
    for (p, k, text, _), reward in zip(survivors, rewards):
        if reward < real_reward[p]:
            result.rejected["below_real_reward"] += 1
        elif p in best and reward <= best[p][0]:
            result.rejected["not_best_for_prompt"] += 1
        else:
            if p in best:
                result.rejected["not_best_for_prompt"] += 1
            best[p] = (reward, k, text)
    for p in sorted(best)[:result.cap]:
        reward, k, text = best[p]
        result.examples.append(synthetic_example(sources[p], text, tokenizer, client=client,
                                                 round_number=round_number, candidate=k, reward=reward,
                                                 real_reward=real_reward[p]))
    result.rows = [tokenize_example(tokenizer, e["messages"], settings.max_seq_length) for e in result.examples]
    if real_reward:
        result.real_reward = sum(real_reward.values()) / len(real_reward)
    if best:
        result.kept_reward = sum(reward for reward, _, _ in best.values()) / len(best)
    return result


def observation(round_number: int, metrics) -> tuple[int, dict[str, float], dict[str, float]]:
    """(round, {client: validation perplexity}, {client: validation preference accuracy}) of one round's global
    metrics (`evaluation.evaluator.EvalMetrics`) for `CollapseGuard.replay`. Preference accuracy per client where
    the metrics have it (`validation_preference_per_client`), else the federation's validation preference accuracy
    for every client that has a perplexity; nothing where there are no validation pairs."""
    if metrics is None:
        return round_number, {}, {}
    perplexities = dict(metrics.validation_per_client or {})
    per_client = getattr(metrics, "validation_preference_per_client", None) or {}
    accuracies = {name: (values.get("preference_accuracy") if isinstance(values, Mapping) else values)
                  for name, values in per_client.items()}
    overall = getattr(metrics, "validation_preference_accuracy", None)
    if not accuracies and overall is not None:
        accuracies = dict.fromkeys(perplexities, overall)
    return round_number, perplexities, accuracies


def improve_site(site, received: Mapping[str, torch.Tensor], round_number: int, settings: SelfImproveSettings,
                 examples: list[dict], rounds: Iterable[tuple[int, object]]) -> dict:
    """SELF_IMPROVE for one client at the start of round `round_number`: generate and score with `received` (the
    global adapter it was sent) loaded, then its train rows this round are its own plus the kept synthetic ones
    (`site.data` becomes `WithSynthetic`). `examples`: its real train examples; `rounds`: (round, global metrics) of
    the rounds before, round 0 the base model, for the collapse guard. Returns the metrics to record
    (`SelfImproveResult.metrics`, and `self_improve_seconds`: generating and scoring took that long)."""
    from peft import set_peft_model_state_dict

    from fl_crew_reddit.training.peft_setup import active_adapter_for

    started = time.perf_counter()
    guard = CollapseGuard.replay(observation(number, metrics) for number, metrics in sorted(rounds,
                                                                                           key=lambda r: r[0]))
    with active_adapter_for(site.model, received) as adapter:
        set_peft_model_state_dict(site.model, received, adapter_name=adapter)
        result = improve(site.model, site.tokenizer, examples, site.device, settings, client=site.name,
                         round_number=round_number, guard=guard)
    site.data = WithSynthetic(site.data, result.rows)
    seconds = time.perf_counter() - started
    log.info("Round %d: %s self-improvement in %.1fs: %s", round_number, site.name, seconds, result.describe())
    return {**result.metrics(), f"{METRIC_PREFIX}seconds": seconds}


class WithSynthetic:
    """A site's data (`site.data.SiteData`) whose train rows this round are its own plus `synthetic` rows (appended,
    so the real rows keep their order); every other split and method is the wrapped data's."""

    def __init__(self, data, synthetic: list[dict]):
        self._data = data
        self.synthetic = list(synthetic)

    def train_rows(self, client: str, fit_config: Mapping) -> list[dict]:
        return [*self._data.train_rows(client, fit_config), *self.synthetic]

    def __getattr__(self, name: str):
        return getattr(self._data, name)

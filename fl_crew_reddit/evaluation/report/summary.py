"""What the report says about a run, computed from its RunHistory: numbers and choices, no formatting.

`summarize(history)` gives a ReportSummary; render.py writes it as Markdown / HTML, plot.py draws it. Every number
here is finite or None (`history.finite`), so neither has to check again.
"""
from __future__ import annotations

from collections import Counter

from pydantic import BaseModel

from fl_crew_reddit.evaluation.selection import best_round_record
from fl_crew_reddit.history import (
    AgentStep,
    BaselineRecord,
    EvalMetrics,
    RoundPrivacy,
    RoundRecord,
    RunHistory,
    finite,
)
from fl_crew_reddit.preprocessing.pipeline import ClientShard, PreprocessReport

SAMPLES_SHOWN = 3


class ModelScores(BaseModel):
    """The held-out scores of one model (the base model, or a round's global adapter)."""

    perplexity: float | None = None
    validation: float | None = None
    bleu: float | None = None
    rouge_l: float | None = None
    per_client: dict[str, float] = {}


class RoundSummary(BaseModel):
    number: int
    scores: ModelScores | None  # None: the round was not evaluated
    change: float | None  # test perplexity vs the base model, in percent
    is_best: bool
    mean_train_loss: float | None
    accepted: list[str]
    left_out: dict[str, list[str]]  # failed to train, or rejected at aggregation, with the reasons
    train_loss: dict[str, float | None]  # each client that trained
    seconds: float | None
    method: str | None
    bytes_down: int = 0  # serialized messages to the clients (Flower); 0 in-process
    bytes_up: int = 0  # serialized replies from the clients (Flower); 0 in-process
    update_file_bytes: int = 0  # the clients' adapter files


class Verdict(BaseModel):
    """Did federated training lower held-out perplexity: the round read (best on validation, else the last)."""

    base: float | None
    final: float | None
    rounds_evaluated: int
    best_round: int | None  # set when the round read was chosen on validation
    best_validation: float | None

    @property
    def improved(self) -> bool | None:
        return None if self.base is None or self.final is None else self.final < self.base


class BaselineSummary(BaseModel):
    name: str
    perplexity: float | None
    change: float | None
    best_round: int | None
    client_best_rounds: list[int]  # local_only: each client's own chunk
    validation_at_best: float | None
    description: str
    per_client: dict[str, float]


class ClipRow(BaseModel):
    label: str
    score: float
    reply: float | None
    post: float | None
    examples: int
    blank: float | None = None  # multimodal: replies generated with a blank image in place of the post's
    conditioned: bool = False  # the generated replies saw the post's images


class ImageRow(BaseModel):
    """Multimodal training: one evaluation's reply perplexity on held-out image rows, real vs blank image."""
    label: str
    real: float
    blank: float
    examples: int
    left_out: int  # test images left out (no features, over the limit, ...)


class SampleRow(BaseModel):
    id: str
    reference: str
    base: str | None
    generated: str


class ShardSummary(BaseModel):
    name: str
    subreddit_share: dict[str, float]  # percent of the client's examples
    examples: int
    tokens: int | None  # None: a run from before token counts
    train: int
    validation: int | None  # None: the run had no validation split
    test: int
    train_tokens: int


class SubredditSummary(BaseModel):
    name: str
    posts: int
    comments: int
    skipped: int


class DataSummary(BaseModel):
    collected: bool
    server: str | None
    subreddits: list[SubredditSummary]
    source_skipped: dict[str, int]  # records the source skipped, by reason, over all subreddits
    prepared: PreprocessReport | None  # counts, drops and image features as preprocessing reported them
    clients: list[ShardSummary]


class AttackRow(BaseModel):
    """One round of a run with simulated attackers: who attacked, what the screen and the rule did with them."""

    round: int
    attack: str
    attackers: list[str]
    accepted: list[str]  # attackers whose update the screen let in
    rejected: dict[str, list[str]]  # attackers the screen refused, with its reasons
    method: str | None
    backdoor_success: float | None = None
    sent_norms: dict[str, float] = {}  # attacker -> L2 norm of the update it sent (after its attack)
    trained_norms: dict[str, float] = {}  # attacker -> L2 norm of its honestly trained update
    clipped: list[str] = []  # attackers the DP clip / norm bound cut to clip_norm
    clip_norm: float | None = None


class PreferenceRow(BaseModel):
    """Held-out preference metrics of one model: the base model, a round's global adapter, or a baseline."""

    label: str
    accuracy: float | None
    margin: float | None
    pairs: int
    validation_accuracy: float | None = None
    per_client: dict[str, float] = {}  # client -> accuracy on its own test pairs


class PreferenceSummary(BaseModel):
    """TRAINING_OBJECTIVE and preference pairs: what the report's "Preference learning" section shows."""

    objective: str
    beta: float | None
    sft_weight: float | None = None  # DPO_SFT_WEIGHT (α of the chosen reply's NLL in the DPO loss); None: not recorded
    reference: str | None = None  # DPO_REFERENCE (global | after_sft); None: not recorded (global)
    dpo_learning_rate: float | None = None  # DPO_LEARNING_RATE (0: LEARNING_RATE); None: not recorded
    dpo_epochs: int | None = None  # DPO_EPOCHS (0: LOCAL_EPOCHS); None: not recorded
    loss_type: str | None = None  # DPO_LOSS_TYPE (sigmoid | ipo); None: not recorded (sigmoid)
    pairs: dict[str, dict[str, dict[str, int]]]  # client -> split -> kind -> pairs
    left_out: dict[str, dict[str, int]]  # client -> split -> pairs whose rows could not be built
    rows: list[PreferenceRow]
    trained: list[tuple[int, str, str, float | None, float | None]]  # (round, client, objective used, loss, acc)
    skipped: list[tuple[int, str, str]]  # (round, client, why it trained SFT instead of DPO)


class SelfImproveRow(BaseModel):
    """SELF_IMPROVE: one client's round (history `clients[].metrics`, keys `self_improve_*`)."""

    round: int
    client: str
    generated: int
    kept: int
    rejected: dict[str, int]  # reason -> candidates
    stopped: str | None  # why the collapse guard stopped this client (None: it still adds)
    real_reward: float | None
    kept_reward: float | None


class ReportSummary(BaseModel):
    run_id: str
    settings: dict
    verdict: Verdict
    base: ModelScores | None
    rounds: list[RoundSummary]
    best: RoundSummary | None
    client_names: list[str]
    baselines: list[BaselineSummary]
    client_comparison: dict[str, dict[str, float]]  # column (method) -> client -> own test perplexity
    clip_rows: list[ClipRow]
    clip_note: str | None  # why the CLIP score was not computed (no row has a score)
    image_rows: list[ImageRow] = []  # multimodal training: the image's contribution per evaluation
    analyses: list[tuple[int, str]]
    samples_round: int | None
    samples: list[SampleRow]
    data: DataSummary
    llm_steps: list[AgentStep]  # the steps an agent's LLM took or fell back from (direct mode: none)
    privacy: list[tuple[int, RoundPrivacy]] = []  # DP runs: each round's (ε, δ), noise and clipping
    secure_rounds: list[tuple[int, dict]] = []  # SECURE_AGGREGATION: each round's SecAgg+ parameters
    attacks: list[AttackRow] = []  # ATTACK: who attacked each round and what the screen and the rule did
    preferences: PreferenceSummary | None = None  # preference pairs or a DPO objective: the section's numbers
    self_improve: list[SelfImproveRow] = []  # SELF_IMPROVE: generated / kept / rejected per round and client


def change_percent(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def _scores(metrics: EvalMetrics) -> ModelScores:
    return ModelScores(perplexity=finite(metrics.perplexity), validation=finite(metrics.validation_perplexity),
                       bleu=finite(metrics.bleu), rouge_l=finite(metrics.rouge_l),
                       per_client={n: v for n, v in metrics.per_client.items() if finite(v) is not None})


def best_round(history: RunHistory) -> RoundRecord | None:
    """The round the run recorded as best on validation, else the one the rounds show; None without validation."""
    recorded = next((r for r in history.rounds if r.round == history.best_round), None)
    if recorded is not None and recorded.global_ is not None and finite(recorded.global_.perplexity) is not None:
        return recorded
    return best_round_record(history.rounds)


def _round(record: RoundRecord, base: float | None, best: RoundRecord | None) -> RoundSummary:
    scores = _scores(record.global_) if record.global_ is not None else None
    losses = [v for v in (finite(c.train_loss) for c in record.clients) if v is not None]
    left_out = record.left_out()
    accepted = (record.aggregation.accepted if record.aggregation else
                [c.name for c in record.clients if c.name not in left_out])
    return RoundSummary(
        number=record.round, scores=scores, change=change_percent(scores.perplexity if scores else None, base),
        is_best=record is best, mean_train_loss=sum(losses) / len(losses) if losses else None,
        accepted=accepted, left_out=left_out,
        train_loss={c.name: finite(c.train_loss) for c in record.clients},
        seconds=finite(record.seconds), method=record.aggregation.method if record.aggregation else None,
        **dict(zip(("bytes_down", "bytes_up", "update_file_bytes"), record.traffic(), strict=True)))


def _baseline(name: str, entry: BaselineRecord, base: float | None) -> BaselineSummary:
    at_best = {p.round: p.perplexity for p in entry.validation_per_round}.get(entry.best_round)
    return BaselineSummary(
        name=name, perplexity=finite(entry.perplexity), change=change_percent(finite(entry.perplexity), base),
        best_round=entry.best_round, validation_at_best=finite(at_best), description=entry.description,
        client_best_rounds=[c.best_round for c in entry.per_client.values() if c.best_round is not None],
        per_client={c: finite(v.own) for c, v in entry.per_client.items() if finite(v.own) is not None})


def _client_comparison(base: ModelScores | None, baselines: list[BaselineSummary],
                       best: RoundSummary | None) -> dict[str, dict[str, float]]:
    """Each client's own test perplexity per method; shown only when there is a baseline and two columns."""
    if not baselines:
        return {}
    columns = {"base": base.per_client if base else {}}
    columns.update({b.name: b.per_client for b in baselines})
    if best is not None:
        columns[f"federated (round {best.number})"] = best.scores.per_client
    return columns if sum(1 for values in columns.values() if values) >= 2 else {}


def _clip(history: RunHistory) -> tuple[list[ClipRow], str | None]:
    measured = [("base", history.base)] + [(str(r.round), r.global_) for r in history.rounds]
    measured = [(label, m) for label, m in measured if m is not None and (m.clip_score is not None or m.clip_note)]
    rows = [ClipRow(label=label, score=finite(m.clip_score), reply=finite(m.clip_score_reply),
                    post=finite(m.clip_score_post), examples=m.clip_examples, blank=finite(m.clip_score_blank),
                    conditioned=m.clip_image_conditioned)
            for label, m in measured if finite(m.clip_score) is not None]
    if rows or not measured:
        return rows, None
    return [], next((m.clip_note for _, m in reversed(measured) if m.clip_note), "no reason recorded")


def _image_rows(history: RunHistory) -> list[ImageRow]:
    measured = [("base", history.base)] + [(str(r.round), r.global_) for r in history.rounds]
    return [ImageRow(label=label, real=m.image_perplexity_real, blank=m.image_perplexity_blank,
                     examples=m.image_examples, left_out=sum(m.image_left_out.values()))
            for label, m in measured if m is not None and finite(m.image_perplexity_real) is not None
            and finite(m.image_perplexity_blank) is not None]


def _samples(history: RunHistory) -> tuple[int | None, list[SampleRow]]:
    """The last round's generated replies, next to the real reply and the base model's."""
    last = next((r for r in reversed(history.rounds) if r.global_ is not None and r.global_.samples), None)
    if last is None:
        return None, []
    base = {s["id"]: s["generated"] for s in history.base.samples} if history.base else {}
    return last.round, [SampleRow(id=s["id"], reference=s["reference"], base=base.get(s["id"]),
                                  generated=s["generated"]) for s in last.global_.samples[:SAMPLES_SHOWN]]


def _data(history: RunHistory) -> DataSummary:
    collection, data = history.collection, history.data
    subreddits = collection.subreddits if collection else []
    source_skipped: Counter[str] = Counter()
    for sub in subreddits:
        source_skipped.update(sub.skipped)
    return DataSummary(
        collected=collection is not None, server=collection.server if collection else None,
        subreddits=[SubredditSummary(name=s.subreddit, posts=s.num_posts, comments=s.num_comments,
                                     skipped=sum(s.skipped.values())) for s in subreddits],
        source_skipped=dict(source_skipped), prepared=data, clients=[_shard(c) for c in data.clients] if data else [])


def _shard(shard: ClientShard) -> ShardSummary:
    total = sum(shard.subreddits.values())
    return ShardSummary(
        name=shard.name, examples=shard.num_examples, tokens=shard.num_tokens or None, train=shard.num_train,
        validation=shard.num_validation if shard.validation_path else None, test=shard.num_test,
        train_tokens=shard.train_tokens,
        subreddit_share={sub: 100 * n / total for sub, n in shard.subreddits.items()} if total else {})


def _client_names(history: RunHistory) -> list[str]:
    """Every client the run knows, in order of appearance: shards first, then any that trained or were left out."""
    names = [c.name for c in history.data.clients] if history.data else []
    for record in history.rounds:
        names += [c.name for c in record.clients] + list(record.left_out())
    return list(dict.fromkeys(names))


def summarize(history: RunHistory) -> ReportSummary:
    base = _scores(history.base) if history.base is not None else None
    base_ppl = base.perplexity if base else None
    best_record = best_round(history)
    rounds = [_round(record, base_ppl, best_record) for record in history.rounds]
    best = next((r for r in rounds if r.is_best), None)
    evaluated = [r for r in rounds if r.scores is not None and r.scores.perplexity is not None]
    read = best or (evaluated[-1] if evaluated else None)  # without validation: the last round, never best on test
    baselines = [_baseline(name, entry, base_ppl) for name, entry in history.baselines.items()]
    clip_rows, clip_note = _clip(history)
    samples_round, samples = _samples(history)
    return ReportSummary(
        run_id=history.run_id, settings=history.settings, base=base, rounds=rounds, best=best,
        verdict=Verdict(base=base_ppl, final=read.scores.perplexity if read else None,
                        rounds_evaluated=len(evaluated), best_round=best.number if best else None,
                        best_validation=best.scores.validation if best else None),
        client_names=_client_names(history), baselines=baselines,
        client_comparison=_client_comparison(base, baselines, best), clip_rows=clip_rows, clip_note=clip_note,
        image_rows=_image_rows(history),
        analyses=[(r.round, r.analysis.strip()) for r in history.rounds if r.analysis and r.analysis.strip()],
        samples_round=samples_round, samples=samples, data=_data(history),
        llm_steps=[s for s in history.agent_steps if s.outcome in ("llm", "fallback")],
        privacy=[(r.round, r.privacy) for r in history.rounds if r.privacy is not None],
        secure_rounds=[(r.round, r.aggregation.secure_aggregation) for r in history.rounds
                       if r.aggregation is not None and r.aggregation.secure_aggregation],
        attacks=[_attack_row(r) for r in history.rounds if r.attack is not None],
        preferences=_preferences(history), self_improve=_self_improve(history))


def _preference_row(label: str, metrics: EvalMetrics) -> PreferenceRow:
    return PreferenceRow(label=label, accuracy=finite(metrics.preference_accuracy),
                         margin=finite(metrics.reward_margin), pairs=metrics.preference_pairs,
                         validation_accuracy=finite(metrics.validation_preference_accuracy),
                         per_client={name: finite(v.get("preference_accuracy"))
                                     for name, v in metrics.preference_per_client.items()
                                     if finite(v.get("preference_accuracy")) is not None})


def _preferences(history: RunHistory) -> PreferenceSummary | None:
    """The section's numbers; None for a run with no preference pairs and the SFT objective (nothing to say)."""
    objective = str(history.settings.get("training_objective") or "sft")
    measured = [("base", history.base)] + [(str(r.round), r.global_) for r in history.rounds]
    rows = [_preference_row(label, m) for label, m in measured if m is not None and m.preference_pairs]
    rows += [PreferenceRow(label=name, accuracy=finite(entry.preference_accuracy), margin=finite(entry.reward_margin),
                           pairs=0, per_client={c: finite(v.preference_accuracy) for c, v in entry.per_client.items()
                                                if finite(v.preference_accuracy) is not None})
             for name, entry in history.baselines.items() if entry.preference_accuracy is not None]
    trained, skipped = [], []
    for record in history.rounds:
        for client in record.clients:
            metrics = client.metrics
            if "objective_used" in metrics and objective != "sft":
                trained.append((record.round, client.name, str(metrics["objective_used"]),
                                finite(metrics.get("dpo_loss")), finite(metrics.get("train_preference_accuracy"))))
            if metrics.get("dpo_skipped"):
                skipped.append((record.round, client.name, str(metrics["dpo_skipped"])))
    if objective == "sft" and not history.preference_pairs and not rows:
        return None
    beta, sft_weight = history.settings.get("dpo_beta"), history.settings.get("dpo_sft_weight")
    reference, rate, epochs, loss_type = (history.settings.get(name) for name in (
        "dpo_reference", "dpo_learning_rate", "dpo_epochs", "dpo_loss_type"))
    return PreferenceSummary(objective=objective, beta=float(beta) if isinstance(beta, (int, float)) else None,
                             sft_weight=float(sft_weight) if isinstance(sft_weight, (int, float)) else None,
                             reference=reference if isinstance(reference, str) else None,
                             dpo_learning_rate=float(rate) if isinstance(rate, (int, float)) else None,
                             dpo_epochs=int(epochs) if isinstance(epochs, int) else None,
                             loss_type=loss_type if isinstance(loss_type, str) else None,
                             pairs=history.preference_pairs, left_out=history.preference_pairs_left_out, rows=rows,
                             trained=trained, skipped=skipped)


def _self_improve(history: RunHistory) -> list[SelfImproveRow]:
    prefix, rows = "self_improve_", []
    for record in history.rounds:
        for client in record.clients:
            m = client.metrics
            if f"{prefix}generated" not in m and not m.get(f"{prefix}stopped"):
                continue
            rejected = {key[len(prefix) + len("rejected_"):]: int(value) for key, value in m.items()
                        if key.startswith(f"{prefix}rejected_") and isinstance(value, (int, float)) and value}
            stopped = m.get(f"{prefix}stop_reason") if m.get(f"{prefix}stopped") else None
            rows.append(SelfImproveRow(round=record.round, client=client.name,
                                       generated=int(m.get(f"{prefix}generated", 0)),
                                       kept=int(m.get(f"{prefix}kept", 0)), rejected=rejected,
                                       stopped=str(stopped) if stopped else None,
                                       real_reward=finite(m.get(f"{prefix}real_reward")),
                                       kept_reward=finite(m.get(f"{prefix}kept_reward"))))
    return rows


def _attack_row(record: RoundRecord) -> AttackRow:
    aggregation = record.aggregation
    attackers = record.attack.attackers
    backdoor = (record.attack.backdoor or {}).get("success_rate")
    metrics = {client.name: client.metrics for client in record.clients if client.name in attackers}

    def norms(key: str) -> dict[str, float]:
        return {name: float(m[key]) for name, m in metrics.items() if isinstance(m.get(key), (int, float))}

    privacy = record.privacy
    return AttackRow(sent_norms=norms("attack_sent_norm"), trained_norms=norms("attack_honest_norm"),
                     clipped=[a for a in attackers if privacy and a in privacy.clipped],
                     clip_norm=privacy.clip_norm if privacy else None,
                     round=record.round, attack=record.attack.attack, attackers=attackers,
                     accepted=[a for a in attackers if aggregation and a in aggregation.accepted],
                     rejected={a: reasons for a, reasons in (aggregation.rejected if aggregation else {}).items()
                               if a in attackers},
                     method=aggregation.method if aggregation else None,
                     backdoor_success=finite(backdoor) if backdoor is not None else None)

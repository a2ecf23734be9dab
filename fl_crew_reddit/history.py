"""The typed run history: what history.json holds (one pydantic model shared by the flow, report, TensorBoard, CLI).

The workspace builds a RunHistory after every stage and writes it as `results/<run>/history.json`; the report, the
CLI summary, TensorBoard and resume read it back through `load_run_history`, which also reads the files older
versions wrote (`migrate`) and otherwise fails with one message naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from fl_crew_reddit.evaluation.evaluator import EvalMetrics
from fl_crew_reddit.preprocessing.pipeline import PreprocessReport
from fl_crew_reddit.reddit.collector import CollectionReport

__all__ = ["AgentStep", "BaselineClient", "BaselineRecord", "ClientRoundResult", "EvalMetrics", "HistoryFileError",
           "RoundAggregate", "RoundAttack", "RoundRecord", "RunHistory", "ValidationPoint", "as_run_history", "finite",
           "load_run_history", "migrate", "parse_run_history"]


class AgentStep(BaseModel):
    """One agent step of the Flow: who called which tool, and whether the LLM's call was used or fell back (why)."""

    round: int = Field(..., ge=0, description="0: collection, preprocessing and the base model; N: round N")
    role: str
    tool: str
    outcome: Literal["direct", "llm", "fallback"] = Field(
        ..., description="direct: no agent LLM; llm: the LLM's call was accepted; fallback: the direct call ran")
    reason: str | None = Field(None, description="why the step fell back to the direct call")
    arguments: dict = Field(default_factory=dict, description="the arguments the tool ran with")


class ClientRoundResult(BaseModel):
    """One client's local fit in one round: what the trainer sent back (the adapter stays in its folder)."""

    name: str
    num_examples: int
    train_loss: float
    metrics: dict
    adapter_path: str


class RoundAggregate(BaseModel):
    """What the aggregator did with a round's updates: the rule, who was accepted, who was rejected and why."""

    method: str
    accepted: list[str]
    rejected: dict[str, list[str]]
    adapter_path: str
    update_norms: dict[str, float] = Field(default_factory=dict, description="accepted client -> ||update - global||")
    lora_ranks: dict[str, int] = Field(default_factory=dict, description="CLIENT_LORA_RANKS: accepted client -> the "
                                                                      "LoRA rank it trained")
    discarded_energy: float | None = Field(None, description="mixed ranks: share of the averaged products' energy "
                                                             "the rank-LORA_R SVD discarded (0: exact)")
    secure_aggregation: dict | None = Field(None, description="SECURE_AGGREGATION: SecAgg+'s parameters and "
                                            "clients_in_sum (the server saw only their sum)")


class RoundPrivacy(BaseModel):
    """DP_MODE central / local: the privacy spent so far, from the accountant (server/privacy.py)."""

    mode: str
    epsilon: float = Field(description="ε spent after this round, at `delta`")
    delta: float
    noise_multiplier: float
    clip_norm: float
    clipped: list[str] = Field(default_factory=list, description="clients whose update was clipped this round")


class RoundAttack(BaseModel):
    """ATTACK: the simulated attack of a round (site/attacks.py), and for a backdoor how well the trigger works."""

    attack: str
    attackers: list[str] = Field(default_factory=list, description="the clients that attacked this round")
    backdoor: dict | None = Field(None, description="evaluation/backdoor.py: success_rate (greedy reply starts "
                                                    "with the target), likelihood_rate, control_rate, examples")


class RoundRecord(BaseModel):
    """One federated round: its clients, who was left out, the aggregation and the new global adapter's metrics."""

    round: int
    clients: list[ClientRoundResult] = Field(default_factory=list)
    skipped: dict[str, list[str]] = Field(default_factory=dict, description="client -> reasons it was left out")
    aggregation: RoundAggregate | None = None
    global_: EvalMetrics | None = Field(None, alias="global")
    seconds: float = 0.0
    analysis: str | None = Field(None, description="the evaluator agent's analysis (LLM-driven mode)")
    privacy: RoundPrivacy | None = None
    attack: RoundAttack | None = None

    model_config = {"populate_by_name": True}

    def traffic(self) -> tuple[int, int, int]:
        """(bytes sent down, bytes sent up, bytes of the clients' update files) this round: the serialized message
        sizes of a Flower round (0 in-process, where nothing crosses a network) and the adapters written."""
        down, up, files = (sum(int(c.metrics.get(key, 0) or 0) for c in self.clients)
                           for key in ("bytes_down", "bytes_up", "update_bytes"))
        return down, up, files

    def left_out(self) -> dict[str, list[str]]:
        """Clients left out of the round with their reasons: failed before aggregation, or rejected by it."""
        out = {name: list(reasons) for name, reasons in self.skipped.items()}
        for name, reasons in (self.aggregation.rejected if self.aggregation else {}).items():
            out.setdefault(name, [])
            out[name].extend(reason for reason in reasons if reason not in out[name])
        return out


class ValidationPoint(BaseModel):
    """A baseline's validation perplexity after one round-equivalent chunk of its steps."""

    round: int
    perplexity: float


class BaselineClient(BaseModel):
    """A baseline's numbers on one client (local_only: the client trained alone)."""

    own: float = Field(description="test perplexity on this client's own test split")
    union: float | None = Field(None, description="local_only: test perplexity on every client's test replies")
    steps: int | None = None
    best_round: int | None = Field(None, description="local_only: the chunk chosen on this client's validation split")
    validation_per_round: list[ValidationPoint] = Field(default_factory=list)
    preference_accuracy: float | None = Field(None, description="on this client's own test preference pairs")
    reward_margin: float | None = None


class BaselineRecord(BaseModel):
    """A comparison trained on the federated run's step budget, read at its best chunk on validation."""

    perplexity: float = Field(description="test perplexity of the checkpoint chosen on validation")
    per_client: dict[str, BaselineClient] = Field(default_factory=dict)
    description: str = ""
    best_round: int | None = Field(None, description="centralized: the chunk chosen on validation")
    validation_per_round: list[ValidationPoint] = Field(default_factory=list)
    steps: int | None = None
    preference_accuracy: float | None = Field(None, description="test preference accuracy of the chosen checkpoint "
                                                                "(local_only: the mean over clients on all test pairs)")
    reward_margin: float | None = None


class RunHistory(BaseModel):
    """Everything history.json holds, in its order. Older runs lack later keys and read as their defaults."""

    run_id: str
    settings: dict[str, Any] = Field(default_factory=dict, description="public settings: secrets as set / not set")
    collection: CollectionReport | None = None
    data: PreprocessReport | None = None
    base: EvalMetrics | None = Field(None, description="the base model before any training")
    rounds: list[RoundRecord] = Field(default_factory=list)
    best_round: int | None = Field(None, description="lowest validation perplexity; never chosen on test")
    best_adapter: str | None = None
    baselines: dict[str, BaselineRecord] = Field(default_factory=dict)
    agent_steps: list[AgentStep] = Field(default_factory=list)
    preference_pairs: dict[str, dict[str, dict[str, int]]] = Field(
        default_factory=dict, description="client -> split -> pair kind (votes, relevance) -> preference pairs in its "
                                          "files; empty where no client has any")
    preference_pairs_left_out: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="client -> split -> pairs whose rows could not be built (left out)")

    def as_json(self) -> dict:
        """The history.json form (plain dicts and lists, `global` by its JSON name)."""
        return self.model_dump(by_alias=True)

    def __getitem__(self, key: str) -> Any:
        """`history["base"]`: read access in the history.json form, for code written against the file."""
        return self.as_json()[key]


class HistoryFileError(ValueError):
    """A history file (or state) cannot be read as a run history; the message names it and says what is wrong."""


def finite(value: float | None) -> float | None:
    """The number, or None when it is missing, NaN or infinite: tables show —, plots and choices skip it."""
    return float(value) if value is not None and math.isfinite(value) else None


def migrate(raw: dict) -> dict:
    """Bring a history written by an older version to today's shape (a copy; the file is left as it was).

    Keys added later (validation, CLIP, update norms, best round, baselines, agent steps) read as their defaults.
    What needs rewriting: client shards from before per-client example counts (runs before validation splits)
    lack `num_examples`, which was their train + test examples.
    """
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
        return raw
    shards = [dict(shard) if isinstance(shard, dict) else shard for shard in data["clients"]]
    for shard in shards:
        if isinstance(shard, dict) and "num_examples" not in shard:
            shard["num_examples"] = sum(shard.get(split, 0) for split in ("num_train", "num_validation", "num_test"))
    return {**raw, "data": {**data, "clients": shards}}


def parse_run_history(raw: Any, source: str) -> RunHistory:
    """A RunHistory from history.json's parsed content; `source` names where it came from in the error."""
    if not isinstance(raw, dict):
        raise HistoryFileError(f"{source} does not hold a run history (expected a JSON object)")
    try:
        return RunHistory.model_validate(migrate(raw))
    except ValidationError as error:
        raise HistoryFileError(f"{source} is not a run history this version can read: {_problems(error)}") from None


def load_run_history(path: Path) -> RunHistory:
    """Read and check `path` (a history.json); HistoryFileError says which file and what is wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HistoryFileError(f"{path} cannot be read as JSON: {error}") from None
    return parse_run_history(raw, str(path))


def as_run_history(history: RunHistory | dict) -> RunHistory:
    """The typed history, given either it or its history.json form (as `workspace.history()` returns)."""
    return history if isinstance(history, RunHistory) else parse_run_history(history, "the history")


def _problems(error: ValidationError, shown: int = 3) -> str:
    """`rounds.1.global.perplexity: Input should be a valid number (got 'abc')`; the first few, then a count."""
    problems = []
    for item in error.errors()[:shown]:
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        got = f" (got {item['input']!r:.60})" if item["type"] != "missing" else ""
        problems.append(f"{where}: {item['msg']}{got}")
    more = error.error_count() - shown
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")

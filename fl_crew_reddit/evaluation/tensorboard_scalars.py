"""TensorBoard scalars of one run in `logs/tensorboard/<run>`; the step is the federated round (0: the base model).

Pure functions turn history records (as in history.json) into tag → value; `RunScalars` writes them with torch's
`SummaryWriter`. A round is written only after its state is saved. Every writer starts with `purge_step=0`, and a
resumed run writes its saved history again first: TensorBoard drops an earlier session's events from step 0 on, so
each step shows once, with no gap and no duplicate, however the run was stopped.

    tensorboard --logdir logs/tensorboard
"""
from __future__ import annotations

import math
from pathlib import Path

GENERATION_METRICS = ("bleu", "chrf", "rouge_1", "rouge_2", "rouge_l")


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _kept(tags: dict[str, object]) -> dict[str, float]:
    return {tag: float(value) for tag, value in tags.items() if _finite(value) is not None}


def metrics_scalars(metrics: dict) -> dict[str, float]:
    """Test and validation perplexity, overall and per client; BLEU / chrF / ROUGE when replies were generated."""
    tags: dict[str, object] = {"perplexity/test": metrics.get("perplexity"),
                               "perplexity/validation": metrics.get("validation_perplexity")}
    for name, value in (metrics.get("per_client") or {}).items():
        tags[f"perplexity_test_per_client/{name}"] = value
    for name, value in (metrics.get("validation_per_client") or {}).items():
        tags[f"perplexity_validation_per_client/{name}"] = value
    if metrics.get("samples"):  # no generated replies (EVAL_SAMPLES=0): the scores would be meaningless zeros
        tags.update({f"generation/{key}": metrics.get(key) for key in GENERATION_METRICS})
    return _kept(tags)


def round_scalars(record: dict) -> dict[str, float]:
    """One round: its global metrics, each client's train loss and update norm, client counts and seconds."""
    tags: dict[str, object] = dict(metrics_scalars(record.get("global") or {}))
    for client in record.get("clients") or []:
        tags[f"train_loss/{client['name']}"] = client.get("train_loss")
    aggregation = record.get("aggregation") or {}
    for name, norm in (aggregation.get("update_norms") or {}).items():
        tags[f"update_norm/{name}"] = norm
    tags["clients/accepted"] = len(aggregation.get("accepted") or [])
    tags["clients/rejected"] = len(aggregation.get("rejected") or {})
    tags["clients/left_out"] = len(record.get("skipped") or {})  # failed to train, or rejected
    tags["time/round_seconds"] = record.get("seconds")
    return _kept(tags)


def baseline_scalars(kind: str, entry: dict, last_round: int) -> list[tuple[str, float, int]]:
    """(tag, value, step): validation perplexity after each round-equivalent chunk, and the test perplexity of the
    checkpoint chosen on validation at its round (a mean over clients at the last round)."""
    points: list[tuple[str, object, int]] = []
    prefix = f"baseline/{kind}"
    for point in entry.get("validation_per_round") or []:
        points.append((f"{prefix}/validation_perplexity", point.get("perplexity"), point.get("round")))
    if entry.get("best_round") is not None:
        points.append((f"{prefix}/test_perplexity", entry.get("perplexity"), entry["best_round"]))
    else:
        points.append((f"{prefix}/test_perplexity_mean", entry.get("perplexity"), last_round))
    for client, values in (entry.get("per_client") or {}).items():
        if not isinstance(values, dict):
            continue
        for point in values.get("validation_per_round") or []:
            points.append((f"{prefix}/validation_perplexity/{client}", point.get("perplexity"), point.get("round")))
        step = values.get("best_round") or entry.get("best_round") or last_round
        points.append((f"{prefix}/test_perplexity_own/{client}", values.get("own"), step))
    return [(tag, float(value), int(step)) for tag, value, step in points
            if _finite(value) is not None and isinstance(step, int)]


class RunScalars:
    """The run's event files. Flushes after each write, so TensorBoard (and a crash) sees whole rounds."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def write_points(self, points: list[tuple[str, float, int]]) -> None:
        for tag, value, step in points:
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

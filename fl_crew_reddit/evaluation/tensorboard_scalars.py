"""TensorBoard scalars of one run in `logs/tensorboard/<run>`; the step is the federated round (0: the base model).

Pure functions turn typed history records (fl_crew_reddit/history.py) into tag → value; `RunScalars` writes them
with torch's `SummaryWriter`. A round is written only after its state is saved. Every writer starts with
`purge_step=0`, and a resumed run writes its saved history again first: TensorBoard drops an earlier session's
events from step 0 on, so each step shows once, with no gap and no duplicate, however the run was stopped.

    tensorboard --logdir logs/tensorboard
"""
from __future__ import annotations

import time
from pathlib import Path

from fl_crew_reddit.history import BaselineRecord, EvalMetrics, RoundRecord, finite

GENERATION_METRICS = ("bleu", "chrf", "rouge_1", "rouge_2", "rouge_l")


def _kept(tags: dict[str, float | None]) -> dict[str, float]:
    return {tag: value for tag, value in ((tag, finite(value)) for tag, value in tags.items()) if value is not None}


def metrics_scalars(metrics: EvalMetrics | None) -> dict[str, float]:
    """Test and validation perplexity, overall and per client; BLEU / chrF / ROUGE when replies were generated."""
    if metrics is None:
        return {}
    tags: dict[str, float | None] = {"perplexity/test": metrics.perplexity,
                                     "perplexity/validation": metrics.validation_perplexity}
    for name, value in metrics.per_client.items():
        tags[f"perplexity_test_per_client/{name}"] = value
    for name, value in metrics.validation_per_client.items():
        tags[f"perplexity_validation_per_client/{name}"] = value
    if metrics.samples:  # no generated replies (EVAL_SAMPLES=0): the scores would be meaningless zeros
        tags.update({f"generation/{key}": getattr(metrics, key) for key in GENERATION_METRICS})
    tags.update(preference_scalars(metrics))
    if metrics.image_examples:  # multimodal training: held-out image rows with the real vs a blank image
        tags["image/perplexity_real"] = metrics.image_perplexity_real
        tags["image/perplexity_blank"] = metrics.image_perplexity_blank
    if metrics.clip_examples and metrics.clip_image_conditioned:  # CLIP score of replies generated with the image
        tags.update({f"image/{key}": getattr(metrics, key)
                     for key in ("clip_score", "clip_score_blank", "clip_score_reply")})
    return _kept(tags)


def preference_scalars(metrics: EvalMetrics) -> dict[str, float | None]:
    """Held-out preference accuracy and reward margin (test and validation pairs, overall and per client); none
    where the run has no preference pairs."""
    tags: dict[str, float | None] = {}
    if metrics.preference_pairs:
        tags["preference/test_accuracy"] = metrics.preference_accuracy
        tags["preference/test_reward_margin"] = metrics.reward_margin
    if metrics.validation_preference_pairs:
        tags["preference/validation_accuracy"] = metrics.validation_preference_accuracy
        tags["preference/validation_reward_margin"] = metrics.validation_reward_margin
    for name, values in metrics.preference_per_client.items():
        tags[f"preference_test_accuracy_per_client/{name}"] = values.get("preference_accuracy")
        tags[f"preference_test_reward_margin_per_client/{name}"] = values.get("reward_margin")
    return tags


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """One round: its global metrics, each client's train loss and update norm, client counts and seconds."""
    tags: dict[str, float | None] = dict(metrics_scalars(record.global_))
    for client in record.clients:
        tags[f"train_loss/{client.name}"] = client.train_loss
        for key in ("dpo_loss", "train_preference_accuracy", "train_reward_margin"):
            if isinstance(client.metrics.get(key), (int, float)):  # DPO trained this round (training/dpo.py)
                tags[f"{key}/{client.name}"] = client.metrics[key]
    if any("dpo_loss" in c.metrics or "dpo_skipped" in c.metrics for c in record.clients):  # DPO was asked for
        tags["clients/dpo_skipped"] = sum(1 for client in record.clients if client.metrics.get("dpo_skipped"))
    aggregation = record.aggregation
    for name, norm in (aggregation.update_norms.items() if aggregation else ()):
        tags[f"update_norm/{name}"] = norm
    tags["clients/accepted"] = len(aggregation.accepted) if aggregation else 0
    tags["clients/rejected"] = len(aggregation.rejected) if aggregation else 0
    tags["clients/left_out"] = len(record.skipped)  # failed to train, or rejected
    tags["time/round_seconds"] = record.seconds
    down, up, files = record.traffic()
    if down or up:  # a Flower round: the serialized messages, down to and up from the clients
        tags["communication/bytes_down"], tags["communication/bytes_up"] = down, up
    if files:
        tags["communication/update_file_bytes"] = files
    return _kept(tags)


def baseline_scalars(kind: str, entry: BaselineRecord, last_round: int) -> list[tuple[str, float, int]]:
    """(tag, value, step): validation perplexity after each round-equivalent chunk, and the test perplexity of the
    checkpoint chosen on validation at its round (a mean over clients at the last round)."""
    points: list[tuple[str, float | None, int]] = []
    prefix = f"baseline/{kind}"
    for point in entry.validation_per_round:
        points.append((f"{prefix}/validation_perplexity", point.perplexity, point.round))
    if entry.best_round is not None:
        points.append((f"{prefix}/test_perplexity", entry.perplexity, entry.best_round))
    else:
        points.append((f"{prefix}/test_perplexity_mean", entry.perplexity, last_round))
    if entry.preference_accuracy is not None:  # the run has preference pairs
        step = entry.best_round if entry.best_round is not None else last_round
        points.append((f"{prefix}/test_preference_accuracy", entry.preference_accuracy, step))
        points.append((f"{prefix}/test_reward_margin", entry.reward_margin, step))
    for client, values in entry.per_client.items():
        for point in values.validation_per_round:
            points.append((f"{prefix}/validation_perplexity/{client}", point.perplexity, point.round))
        step = values.best_round or entry.best_round or last_round  # the chunk chosen for it, else the end
        points.append((f"{prefix}/test_perplexity_own/{client}", values.own, step))
    return [(tag, finite(value), step) for tag, value, step in points if finite(value) is not None]


def _file_second(path: Path) -> int | None:
    """The creation second in `events.out.tfevents.<second>.<host>.<pid>.<counter>`."""
    parts = path.name.split(".")
    return int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None


def _wait_until_a_new_file_sorts_last(log_dir: Path, max_wait_s: float = 2.0) -> None:
    """TensorBoard reads a run's event files in name order, and the purge that lets a resumed session win needs
    its file read last. Names sort by second first, then by pid and a counter that do not sort as numbers
    (".10" < ".9"), so a session opened in the same second as an earlier file waits for the next second."""
    seconds = [s for s in (_file_second(p) for p in log_dir.glob("events.out.tfevents.*")) if s is not None]
    deadline = time.monotonic() + max_wait_s
    while seconds and int(time.time()) <= max(seconds) and time.monotonic() < deadline:
        time.sleep(0.05)


class RunScalars:
    """The run's event files. Flushes after each write, so TensorBoard (and a crash) sees whole rounds."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir)
        _wait_until_a_new_file_sorts_last(self.log_dir)
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

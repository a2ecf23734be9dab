"""Best round chosen on validation (never on test) from given numbers, and TensorBoard scalars written, read back
with TensorBoard's own EventAccumulator, and not duplicated when a stopped run writes its history again."""
from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_crew_reddit.evaluation.selection import argmin_round, best_round_record
from fl_crew_reddit.evaluation.tensorboard_scalars import RunScalars, baseline_scalars, round_scalars
from fl_crew_reddit.history import BaselineRecord, RoundRecord


def _round(number: int, test: float, validation: float | None, aggregated: bool = True) -> RoundRecord:
    return RoundRecord.model_validate({
        "round": number, "skipped": {}, "seconds": 10.0 + number,
        "clients": [{"name": "client-0", "num_examples": 16, "train_loss": 2.0 - number / 10,
                     "metrics": {"steps": 8}, "adapter_path": f"/models/client-0/round-{number}"}],
        "aggregation": {"method": "fedavg", "accepted": ["client-0"], "rejected": {},
                        "adapter_path": f"/models/round-{number}",
                        "update_norms": {"client-0": 0.5 * number}} if aggregated else None,
        "global": {"perplexity": test, "validation_perplexity": validation, "per_client": {"client-0": test},
                   "validation_per_client": {"client-0": validation} if validation is not None else {},
                   "bleu": 1.0, "chrf": 2.0, "rouge_1": 0.1, "rouge_2": 0.01, "rouge_l": 0.09, "num_tokens": 90,
                   "samples": [{"id": "x", "reference": "a", "generated": "b"}]}})


def test_argmin_round_skips_missing_values_and_takes_the_earliest_tie():
    assert argmin_round([(1, 30.0), (2, 28.5), (3, 29.0)]) == 2
    assert argmin_round([(1, 30.0), (2, 28.5), (3, 28.5)]) == 2
    assert argmin_round([(1, None), (2, math.nan), (3, 31.0), (4, math.inf)]) == 3
    assert argmin_round([(1, None), (2, None)]) is None
    assert argmin_round([]) is None


def test_best_round_follows_validation_not_test():
    # Round 3 has the lowest test perplexity, round 2 the lowest validation perplexity: round 2 is chosen.
    rounds = [_round(1, 30.0, 31.0), _round(2, 29.0, 27.5), _round(3, 26.0, 28.0)]
    best = best_round_record(rounds)
    assert best.round == 2 and best.aggregation.adapter_path == "/models/round-2"
    # A round without an aggregated adapter cannot be chosen, whatever its numbers.
    assert best_round_record(rounds + [_round(4, 20.0, 20.0, aggregated=False)]).round == 2
    # Histories from before validation splits: no best round rather than a guess on test.
    assert best_round_record([_round(1, 30.0, None), _round(2, 29.0, None)]) is None


def test_round_scalars_cover_the_round():
    tags = round_scalars(_round(2, 29.0, 27.5).model_copy(update={"skipped": {"client-1": ["training failed"]}}))
    assert tags["perplexity/test"] == 29.0 and tags["perplexity/validation"] == 27.5
    assert tags["perplexity_test_per_client/client-0"] == 29.0
    assert tags["perplexity_validation_per_client/client-0"] == 27.5
    assert tags["train_loss/client-0"] == 1.8 and tags["update_norm/client-0"] == 1.0
    assert tags["generation/bleu"] == 1.0 and tags["generation/chrf"] == 2.0 and tags["generation/rouge_l"] == 0.09
    assert tags["clients/accepted"] == 1 and tags["clients/rejected"] == 0 and tags["clients/left_out"] == 1
    assert tags["time/round_seconds"] == 12.0
    no_samples = _round(2, 29.0, None)
    no_samples.global_.samples = []
    assert not any(tag.startswith("generation/") or tag == "perplexity/validation"
                   for tag in round_scalars(no_samples))


def test_baseline_scalars_put_test_at_the_chosen_round():
    entry = BaselineRecord.model_validate(
        {"perplexity": 25.0, "best_round": 2, "per_client": {"client-0": {"own": 24.0}},
         "validation_per_round": [{"round": 1, "perplexity": 27.0}, {"round": 2, "perplexity": 26.0}]})
    points = baseline_scalars("centralized", entry, last_round=3)
    assert ("baseline/centralized/test_perplexity", 25.0, 2) in points
    assert ("baseline/centralized/validation_perplexity", 26.0, 2) in points
    assert ("baseline/centralized/test_perplexity_own/client-0", 24.0, 2) in points


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_event_files_hold_the_tags_and_a_rewrite_replaces_instead_of_duplicating(tmp_path):
    # Prepare: a session that wrote rounds 0-2 and then stopped (as if killed after round 2's scalars).
    first = RunScalars(tmp_path)
    first.write({"perplexity/test": 40.0}, 0)
    for record in (_round(1, 30.0, 31.0), _round(2, 29.0, 27.5)):
        first.write(round_scalars(record), record.round)
    first.close()
    assert "perplexity/validation" in _scalars(tmp_path) and "update_norm/client-0" in _scalars(tmp_path)

    # Execute: the resumed session writes its saved history (rounds 0-1 only) again, then a new round 2.
    second = RunScalars(tmp_path)
    second.write({"perplexity/test": 40.0}, 0)
    second.write(round_scalars(_round(1, 30.0, 31.0)), 1)
    second.write(round_scalars(_round(2, 28.0, 26.0)), 2)
    second.close()

    # Assert: each step once, the resumed session's values win.
    scalars = _scalars(tmp_path)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert [(step, round(v, 4)) for step, v in scalars["perplexity/test"]] == [(0, 40.0), (1, 30.0), (2, 28.0)]
    assert [step for step, _ in scalars["train_loss/client-0"]] == [1, 2]


def test_a_session_opened_in_the_same_second_still_has_its_file_read_last(tmp_path):
    # Prepare: an earlier session's file from this second whose counter sorts after any small one (".9" > ".10").
    first = RunScalars(tmp_path)
    first.write({"perplexity/test": 40.0}, 0)
    first.close()
    (old,) = tmp_path.glob("events.out.tfevents.*")
    head, _counter = old.name.rsplit(".", 1)
    old.rename(tmp_path / f"{head}.999")

    # Execute: a new session in the same process writes step 0 again.
    second = RunScalars(tmp_path)
    second.write({"perplexity/test": 35.0}, 0)
    second.close()

    # Assert: TensorBoard reads the new file last, so its value wins.
    files = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert files[-1] != f"{head}.999"
    assert _scalars(tmp_path)["perplexity/test"] == [(0, 35.0)]

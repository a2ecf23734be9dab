"""The run report from a synthetic history (in the shape runs write it): files written, numbers and verdict in the
text, clear errors."""
from __future__ import annotations

import copy
import json
import struct

import pytest

from fl_crew_reddit.evaluation.report import (
    ReportError,
    build_report,
    markdown_report,
    render_html,
    report_blocks,
    resolve_run_dir,
    verdict,
)


def _client(name: str, loss: float) -> dict:
    return {"name": name, "num_examples": 32, "train_loss": loss, "metrics": {"train_loss": loss, "steps": 24},
            "adapter_path": f"/runs/models/local/{name}"}


def _samples(tag: str) -> list[dict]:
    return [{"id": f"c{i}", "reference": f"real reply {i}", "generated": f"{tag} reply {i}"} for i in range(4)]


HISTORY = {
    "run_id": "run-20260101-000000",
    "settings": {"base_llm_model": "embedded:SmolLM2-135M-Instruct", "lora_r": 8, "learning_rate": 0.0002,
                 "aggregation_method": "weighted_average", "subreddits": ["cooking", "gardening"],
                 "openai_api_key": "not set", "reddit_dump_dir": None},
    "collection": {"subreddits": [{"subreddit": "cooking", "num_posts": 10, "num_comments": 80,
                                   "path": "/runs/data/collected/cooking.json"}], "server": "x"},
    "data": {"num_comments": 160, "num_examples": 150, "dropped": {"deleted_or_removed": 7, "bot_or_moderator": 3},
             "examples_path": "/runs/data/preprocessed/examples.jsonl",
             "clients": [{"name": f"client-{i}", "subreddits": {sub: 50}, "num_train": 32, "num_test": 8,
                          "train_path": f"/runs/data/training/client-{i}/train.jsonl",
                          "test_path": f"/runs/data/training/client-{i}/test.jsonl",
                          "train_tokens": 3000 + i} for i, sub in enumerate(["cooking", "gardening", "python"])]},
    "base": {"perplexity": 40.0, "bleu": 0.5, "rouge_l": 0.05, "num_tokens": 900, "samples": _samples("base")},
    "rounds": [
        {"round": 1, "clients": [_client("client-0", 3.6), _client("client-1", 3.7), _client("client-2", 3.5)],
         "skipped": {}, "aggregation": {"method": "weighted_average", "accepted": ["client-0", "client-1", "client-2"],
                                        "rejected": {}, "adapter_path": "/runs/agg/1"},
         "global": {"perplexity": 32.0, "bleu": 1.25, "rouge_l": 0.081, "num_tokens": 900,
                    "samples": _samples("round-1")},
         "seconds": 150.4},
        {"round": 2, "clients": [_client("client-0", 3.1), _client("client-2", 9.9)],
         "skipped": {"client-1": ["training failed: out of memory"],
                     "client-2": ["update norm 512.0 exceeds MAX_UPDATE_NORM=100"]},
         "aggregation": {"method": "weighted_average", "accepted": ["client-0"],
                         "rejected": {"client-2": ["update norm 512.0 exceeds MAX_UPDATE_NORM=100"]},
                         "adapter_path": "/runs/agg/2"},
         "global": {"perplexity": 30.0, "bleu": 2.5, "rouge_l": 0.093, "num_tokens": 900,
                    "samples": _samples("round-2")},
         "seconds": 140.0},
    ],
}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write(tmp_path, history: dict):
    run = tmp_path / history["run_id"]
    run.mkdir()
    (run / "history.json").write_text(json.dumps(history), encoding="utf-8")
    return run


def test_build_report_writes_markdown_html_and_png(tmp_path):
    paths = build_report(_write(tmp_path, HISTORY))
    for path in (paths.md, paths.html, paths.png):
        assert path.is_file() and path.parent.name == HISTORY["run_id"]
    width, height = _png_size(paths.png.read_bytes())
    assert 800 <= width <= 1400 and 450 <= height <= 900
    page = paths.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page and "<table>" in page
    assert 'src="convergence.png"' not in page  # self-contained
    assert "![" in paths.md.read_text(encoding="utf-8")


def test_markdown_has_the_numbers_and_the_verdict():
    text = markdown_report(HISTORY)
    assert "# Federated run report: run-20260101-000000" in text
    assert "Federated training lowered held-out perplexity from 40.00 to 30.00 (−25.0%) over 2 rounds." in text
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "32.00" in row1 and "−20.0%" in row1 and "1.25" in row1 and "0.081" in row1 and "3.600" in row1
    assert "150" in row1
    assert "| lora_r | 8 |" in text and "| learning_rate | 0.0002 |" in text and "cooking, gardening" in text
    assert "| client-2 | r/python 100% | 40 | — | 32 | — | 8 | 3,002 |" in text
    assert "| deleted or removed | 7 |" in text
    assert "real reply 0" in text and "round-2 reply 0" in text and "base reply 0" in text
    assert "round-2 reply 3" not in text  # 3 samples at most
    assert "## Settings" in text and "## Data" in text and "## Rounds" in text


def test_skipped_and_rejected_clients_show_their_reasons():
    row2 = next(line for line in markdown_report(HISTORY).splitlines() if line.startswith("| 2 |"))
    assert "client-1: training failed: out of memory" in row2
    assert "client-2: update norm 512.0 exceeds MAX_UPDATE_NORM=100" in row2
    assert row2.count("MAX_UPDATE_NORM") == 1  # listed once though both `skipped` and `rejected` hold it
    accepted = row2.split("|")[8].strip()
    assert accepted == "client-0"


def test_verdict_when_perplexity_did_not_improve_or_nothing_ran():
    worse = copy.deepcopy(HISTORY)
    worse["rounds"][-1]["global"]["perplexity"] = 44.0
    line = verdict(worse)
    assert line.startswith("Federated training did not lower held-out perplexity") and "+10.0%" in line
    assert "round 1" not in line  # without validation numbers the last round is read, never the best on test
    assert 'class="verdict worse"' in render_html(report_blocks(worse))
    fresh = {k: v for k, v in HISTORY.items() if k != "rounds"}
    assert "No round has been evaluated yet" in verdict(fresh)
    assert "not been evaluated" in verdict({"run_id": "x"})
    markdown_report({"run_id": "x"})  # a history written before any stage still renders


def test_optional_per_client_and_baselines_are_shown_when_present(tmp_path):
    history = copy.deepcopy(HISTORY)
    history["base"]["per_client"] = {"client-0": 41.0, "client-1": 39.0}
    for record, shift in zip(history["rounds"], (0, 4)):
        record["global"]["per_client"] = {"client-0": 33.0 - shift, "client-1": 31.0 - shift}
    history["baselines"] = {"centralized": {"perplexity": 28.5, "per_client": {}, "description": "pooled"},
                            "local-only": {"perplexity": 34.0, "per_client": {}, "description": "alone"}}
    text = markdown_report(history)
    assert "| base | 41.00 | 39.00 |" in text and "| 2 | 29.00 | 27.00 |" in text
    assert "## Baselines" in text and "| centralized | 28.50 | −28.8% |" in text and "| local-only | 34.00 |" in text
    paths = build_report(_write(tmp_path, history))
    assert _png_size(paths.png.read_bytes())[0] >= 800


def test_missing_history_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="history.json is missing"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="no run folder"):
        build_report(tmp_path / "nope")
    (tmp_path / "history.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match="cannot be read as JSON"):
        build_report(tmp_path)


def test_resolve_run_dir_by_id_path_and_latest(tmp_path):
    run = _write(tmp_path, HISTORY)
    (tmp_path / "latest").write_text(run.name + "\n", encoding="utf-8")  # the no-symlink fallback
    assert resolve_run_dir(None, tmp_path) == run
    assert resolve_run_dir(run.name, tmp_path) == run
    assert resolve_run_dir(str(run), tmp_path / "elsewhere") == run
    with pytest.raises(ReportError, match="neither a run folder nor a run id"):
        resolve_run_dir("run-missing", tmp_path)


def test_cli_prints_paths_and_exits_2_on_a_missing_run(tmp_path, monkeypatch, capsys):
    from fl_crew_reddit.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(tmp_path))
    results = tmp_path / "results"
    results.mkdir()
    run = _write(results, HISTORY)
    (results / "latest").symlink_to(run.name, target_is_directory=True)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert str(run / "report.md") in out and str(run / "convergence.png") in out
    assert main(["report", "run-missing"]) == 2
    captured = capsys.readouterr()
    assert "run-missing" in captured.err and captured.err.count("\n") == 1


def test_round_analysis_from_the_evaluator_agent_is_shown():
    from fl_crew_reddit.evaluation.report import markdown_report

    history = {"run_id": "r", "base": {"perplexity": 40.0, "bleu": 0.5, "rouge_l": 0.05, "num_tokens": 90},
               "rounds": [{"round": 1, "global": {"perplexity": 30.0, "bleu": 1.0, "rouge_l": 0.1, "num_tokens": 90},
                           "clients": [], "skipped": {}, "analysis": "Perplexity fell 25%; client-2 lags."}]}
    text = markdown_report(history)
    assert "## Evaluator's analysis" in text and "Round 1: Perplexity fell 25%; client-2 lags." in text


def _with_validation() -> dict:
    """Round 2 is best on test (30.0) but round 1 on validation (29.0 vs 31.0): the report must read round 1."""
    history = copy.deepcopy(HISTORY)
    history["base"].update(validation_perplexity=41.0, per_client={"client-0": 42.0, "client-1": 38.0})
    for record, (validation, own) in zip(history["rounds"], ((29.0, (33.0, 31.0)), (31.0, (31.5, 29.5)))):
        record["global"].update(validation_perplexity=validation,
                                per_client={"client-0": own[0], "client-1": own[1]})
    history["best_round"], history["best_adapter"] = 1, "/runs/agg/1"
    history["baselines"] = {
        "local_only": {"perplexity": 34.0, "description": "each client alone",
                       "per_client": {"client-0": {"own": 35.0, "union": 34.5, "best_round": 2},
                                      "client-1": {"own": 33.0, "union": 33.5, "best_round": 1}}},
        "centralized": {"perplexity": 31.0, "best_round": 2, "description": "pooled",
                        "validation_per_round": [{"round": 1, "perplexity": 30.5}, {"round": 2, "perplexity": 30.1}],
                        "per_client": {"client-0": {"own": 32.0}, "client-1": {"own": 30.0}}}}
    return history


def test_report_reads_every_method_at_its_best_round_on_validation(tmp_path):
    history = _with_validation()
    line = verdict(history)
    assert line.startswith("Federated training lowered held-out perplexity from 40.00 to 32.00 (−20.0%) at round 1")
    assert "lowest validation perplexity (29.00)" in line
    text = markdown_report(history)
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    row2 = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert "29.00 (best)" in row1 and "(best)" not in row2 and "| base | 40.00 |  | 41.00 |" in text
    assert "| federated | 32.00 | −20.0% | round 1 | 29.00 |" in text
    assert "| centralized | 31.00 | −22.5% | round 2 | 30.10 |" in text
    assert "| local_only | 34.00 | −15.0% | each client's best: 2, 1 |" in text
    assert "| Client | base | local_only | centralized | federated (round 1) |" in text
    assert "| client-0 | 42.00 | 35.00 | 32.00 | 33.00 |" in text
    assert "| client-1 | 38.00 | 33.00 | 30.00 | 31.00 |" in text
    assert _png_size(build_report(_write(tmp_path, history)).png.read_bytes())[0] >= 800


def test_bytes_per_round_and_the_total_are_reported_for_flower_and_in_process_runs():
    from fl_crew_reddit.evaluation.tensorboard_scalars import round_scalars
    from fl_crew_reddit.history import RunHistory

    flower = copy.deepcopy(HISTORY)
    for record, (down, up) in zip(flower["rounds"], [(9_800_000, 9_700_000), (4_900_000, 4_800_000)]):
        for client in record["clients"]:
            client["metrics"].update(bytes_down=down, bytes_up=up, update_bytes=9_000_000)
    text = markdown_report(flower)
    assert "Communication per round (serialized Flower messages" in text
    assert "| 1 | 29.4 MB | 29.1 MB | 58.5 MB | 3 |" in text  # three clients in round 1
    assert "| 2 | 9.8 MB | 9.6 MB | 19.4 MB | 2 |" in text
    assert "| total | 39.2 MB | 38.7 MB | 77.9 MB |  |" in text
    scalars = round_scalars(RunHistory.model_validate(flower).rounds[0])
    assert scalars["communication/bytes_down"] == 29_400_000 and scalars["communication/bytes_up"] == 29_100_000

    in_process = copy.deepcopy(HISTORY)
    for record in in_process["rounds"]:
        for client in record["clients"]:
            client["metrics"]["update_bytes"] = 2_000_000
    text = markdown_report(in_process)
    assert "none over a network (in-process engine); the clients' updates were 10.0 MB of adapter files over " \
           "2 round(s), 5.0 MB per round" in text
    assert "communication/bytes_down" not in round_scalars(RunHistory.model_validate(in_process).rounds[0])
    assert "Communication" not in markdown_report(HISTORY)  # an old history without sizes: no section


def test_privacy_section_shows_secure_aggregation_and_the_epsilon_spent():
    history = copy.deepcopy(HISTORY)
    assert "## Privacy" not in markdown_report(history)  # nothing private to report
    history["rounds"][0]["aggregation"]["secure_aggregation"] = {"clients_in_sum": 3, "reconstruction_threshold": 2,
                                                                 "clipping_range": 100.0,
                                                                 "quantization_range": 536870912}
    for number, epsilon in ((0, 4.5), (1, 7.25)):
        history["rounds"][number]["privacy"] = {"mode": "local", "epsilon": epsilon, "delta": 1e-5,
                                                "noise_multiplier": 1.1, "clip_norm": 0.5, "clipped": ["client-0"]}
    report = markdown_report(history)
    assert report.count("## Privacy and security") == 1
    assert "Secure aggregation (Flower's SecAgg+) was on" in report and "| 1 | 3 | 2 |" in report
    assert "DP_MODE=local" in report and "ε = 7.250" in report
    assert "| 2 | 7.250 | 1e-05 | 1.1 | 0.5 | client-0 |" in report


def test_security_section_shows_attackers_and_what_the_screen_did():
    history = copy.deepcopy(HISTORY)
    history["rounds"][1]["attack"] = {"attack": "scale", "attackers": ["client-2"],
                                      "backdoor": {"success_rate": 0.25}}
    report = markdown_report(history)
    assert "## Privacy and security" in report and "Simulated attackers (ATTACK)" in report
    row = next(line for line in report.splitlines() if line.startswith("| 2 | scale |"))
    assert "client-2 | none | client-2: update norm 512.0 exceeds MAX_UPDATE_NORM=100 | weighted_average | 0.250" in row


def test_self_improvement_section_shows_generated_kept_rejected_and_the_guards_stops():
    history = copy.deepcopy(HISTORY)
    second = {client["name"]: client for client in history["rounds"][1]["clients"]}
    second["client-0"]["metrics"].update({
        "self_improve_generated": 16, "self_improve_kept": 2, "self_improve_stopped": 0.0,
        "self_improve_rejected_below_real_reward": 7, "self_improve_rejected_copies_prompt": 3,
        "self_improve_rejected_empty": 0, "self_improve_real_reward": 0.109, "self_improve_kept_reward": 0.081})
    second["client-2"]["metrics"].update({
        "self_improve_generated": 0, "self_improve_kept": 0, "self_improve_stopped": 1.0,
        "self_improve_stop_reason": "validation perplexity rose (33.1 -> 34.0)"})
    text = markdown_report(history)
    assert "## Self-improvement" in text and "wrote 16 replies" in text and "2 were kept" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 | client-0 |"))
    assert "| 16 | 2 | below_real_reward 7, copies_prompt 3 | 0.109 | 0.081 | — |" in row
    assert "empty" not in row  # reasons with no candidate are left out
    stopped = next(line for line in text.splitlines() if line.startswith("| 2 | client-2 |"))
    assert "validation perplexity rose (33.1 -> 34.0)" in stopped
    assert "Self-improvement" not in markdown_report(HISTORY)  # a run without SELF_IMPROVE: no section


def test_privacy_section_says_what_was_off_the_bytes_per_round_and_each_attackers_update():
    """Issue 12 item 6: the section names DP and SecAgg even when off, the bytes per round, and for each attacker
    what it sent (norm vs its honestly trained update) and whether the DP clip / norm bound cut it."""
    history = copy.deepcopy(HISTORY)
    history["settings"].update(update_compression="int8", attack="sign_flip")
    for record in history["rounds"]:
        for client in record["clients"]:
            client["metrics"]["update_bytes"] = 150_000
    second = {client["name"]: client for client in history["rounds"][1]["clients"]}
    second["client-2"]["metrics"].update(attacker=1.0, attack_honest_norm=0.5, attack_sent_norm=5.0)
    history["rounds"][1]["attack"] = {"attack": "scale", "attackers": ["client-2"]}
    section = markdown_report(history).split("## Privacy and security")[1]
    assert "Differential privacy: off" in section and "Secure aggregation: off" in section
    assert "375.0 kB of update files per round (in-process, mean over 2 round(s)" in section  # 3 and 2 clients
    assert "UPDATE_COMPRESSION=int8" in section
    row = next(line for line in section.splitlines() if line.startswith("| 2 | scale |"))
    assert "client-2: norm 5.00 sent, 0.50 trained" in row

    history["rounds"][1]["privacy"] = {"mode": "central", "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.1,
                                       "clip_norm": 0.5, "clipped": ["client-2"]}
    section = markdown_report(history).split("## Privacy and security")[1]
    assert "Differential privacy: DP_MODE=central" in section
    row = next(line for line in section.splitlines() if line.startswith("| 2 | scale |"))
    assert "client-2: norm 5.00 sent, 0.50 trained, clipped to 0.5" in row

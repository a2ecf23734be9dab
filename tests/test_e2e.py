"""The whole loop, for real, on tiny settings: MCP server subprocess → preprocessing → 3 LoRA trainers →
aggregation → evaluation, two rounds, through the CrewAI Flow and the manager users call.

One run (module fixture) and one test per promise it keeps, so a failure names the promise that broke.
"""
import json
from pathlib import Path

import pytest
from conftest import tiny_run_config

CLIENTS = ["client-0", "client-1", "client-2"]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """Two rounds with 3 clients on the snapshot; returns (config, result, rounds passed to on_round, history.json)."""
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("e2e-run"))
    rounds_seen = []
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, on_round=rounds_seen.append)
    history = json.loads(Path(result.history_path).read_text())
    return config, result, rounds_seen, history


def test_each_round_is_reported_to_the_callback_and_saved(run):
    _, result, rounds_seen, history = run
    assert [r["round"] for r in history["rounds"]] == [1, 2] == [r["round"] for r in rounds_seen]
    assert [r["global"]["perplexity"] for r in history["rounds"]] == result.perplexities()
    assert {"perplexity", "bleu", "rouge_l"} <= set(history["base"])


def test_every_sampled_client_trains_and_is_evaluated_each_round(run):
    _, _, _, history = run
    for record in history["rounds"]:
        assert [c["name"] for c in record["clients"]] == CLIENTS
        assert all(c["num_examples"] == 16 and c["train_loss"] > 0 for c in record["clients"])
        assert {"perplexity", "bleu", "rouge_l"} <= set(record["global"]) and record["seconds"] > 0
        assert set(record["global"]["per_client"]) == set(CLIENTS)
        assert record["skipped"] == {} and record["aggregation"]["accepted"] == CLIENTS


def test_clients_are_split_by_subreddit_and_drops_are_counted(run):
    _, _, _, history = run
    assert sorted(s for c in history["data"]["clients"] for s in c["subreddits"]) == [
        "cooking", "gardening", "learnpython"]
    dropped = history["data"]["dropped"]
    assert dropped["deleted_or_removed"] > 0 and dropped["bot_or_moderator"] > 0
    assert dropped["over_max_examples_per_client"] > 0 and history["data"]["max_train_examples"] == 16


def test_held_out_perplexity_falls_every_round(run):
    _, _, _, history = run
    perplexities = [history["base"]["perplexity"]] + [r["global"]["perplexity"] for r in history["rounds"]]
    assert perplexities[2] < perplexities[1] < perplexities[0]


def test_validation_splits_share_no_thread_with_train_or_test(run):
    _, _, _, history = run
    for shard in history["data"]["clients"]:
        splits = {name: {json.loads(line)["post_id"] for line in Path(shard[f"{name}_path"]).read_text().splitlines()}
                  for name in ("train", "validation", "test")}
        assert shard["num_validation"] >= 8 and all(splits.values())
        assert not (splits["train"] & splits["validation"] or splits["validation"] & splits["test"]
                    or splits["train"] & splits["test"])


def test_best_round_is_the_lowest_validation_perplexity(run):
    _, result, _, history = run
    validation = {r["round"]: r["global"]["validation_perplexity"] for r in history["rounds"]}
    assert history["base"]["validation_perplexity"] > 0 and all(v > 0 for v in validation.values())
    assert history["best_round"] == min(validation, key=validation.get) == result.best_round
    assert history["best_adapter"] == result.best_adapter == result.global_adapters[history["best_round"] - 1]


def test_tensorboard_has_one_step_per_round_with_the_promised_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, result, _, history = run
    events = EventAccumulator(str(Path(config.fl_crew_reddit_dir) / "logs" / "tensorboard" / result.run_id))
    events.Reload()
    assert {"perplexity/test", "perplexity/validation", "perplexity_test_per_client/client-0", "train_loss/client-2",
            "generation/bleu", "generation/chrf", "generation/rouge_l", "update_norm/client-1", "clients/accepted",
            "clients/rejected", "time/round_seconds"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("perplexity/test")] == [0, 1, 2]
    validation = [history["base"]["validation_perplexity"]] + [
        r["global"]["validation_perplexity"] for r in history["rounds"]]
    assert [e.value for e in events.Scalars("perplexity/validation")] == pytest.approx(validation, rel=1e-5)


def test_adapters_are_peft_folders_that_load_and_generate(run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, result, _, _ = run
    root = Path(config.fl_crew_reddit_dir)
    for client in CLIENTS:
        assert (root / "models" / "local" / result.run_id / client / "round-2" / "adapter_model.safetensors").is_file()
    assert len(result.global_adapters) == 2 and result.final_adapter == result.global_adapters[-1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.final_adapter)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I store basil?"}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_each_role_calls_its_tool_and_the_log_says_so(run):
    _, result, _, _ = run
    log_text = Path(result.log_path).read_text()
    for role, tool in (("Reddit Data Collector", "collect_reddit_data"),
                       ("Data Preprocessor", "preprocess_reddit_data"),
                       ("Model Trainer 1", "train_local_adapter"), ("Model Trainer 3", "train_local_adapter"),
                       ("Federated Aggregator", "aggregate_adapters"), ("Model Evaluator", "evaluate_model")):
        assert f"{role} calls {tool}" in log_text


def test_results_latest_points_at_the_newest_run(run):
    config, result, _, _ = run
    latest = Path(config.fl_crew_reddit_dir) / "results" / "latest"
    assert latest.resolve() == Path(result.history_path).parent.resolve()


def test_baselines_train_on_the_same_budget_and_are_reported(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"baselines": ["local_only", "centralized"], "eval_samples": 0,
                                            "local_epochs": 1, "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    history = json.loads(Path(result.history_path).read_text())
    baselines = history["baselines"]
    federated_steps = sum(c["metrics"]["steps"] for r in history["rounds"] for c in r["clients"])
    local = baselines["local_only"]
    assert set(local["per_client"]) == set(CLIENTS)
    assert all(v["steps"] * 3 == federated_steps for v in local["per_client"].values())
    assert str(federated_steps) in baselines["centralized"]["description"]
    for entry in baselines.values():
        assert entry["perplexity"] < history["base"]["perplexity"]
    # Each baseline is read at its best round-equivalent chunk on validation.
    central = baselines["centralized"]
    chunks = {p["round"]: p["perplexity"] for p in central["validation_per_round"]}
    assert sorted(chunks) == [1, 2] and central["best_round"] == min(chunks, key=chunks.get)
    for values in local["per_client"].values():
        chunks = {p["round"]: p["perplexity"] for p in values["validation_per_round"]}
        assert sorted(chunks) == [1, 2] and values["best_round"] == min(chunks, key=chunks.get)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(config.fl_crew_reddit_dir) / "logs" / "tensorboard" / result.run_id))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("baseline/centralized/test_perplexity")] == [
        (central["best_round"], pytest.approx(central["perplexity"], rel=1e-5))]
    assert {"baseline/local_only/test_perplexity_mean", "baseline/local_only/validation_perplexity/client-0",
            "baseline/centralized/validation_perplexity"} <= set(events.Tags()["scalars"])


def test_more_clients_than_trainers_are_sampled_and_served_in_turn(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"num_clients": 6, "num_trainers": 2, "fraction_fit": 0.5,
                                            "partition": "iid", "eval_samples": 0, "local_epochs": 1,
                                            "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    history = json.loads(Path(result.history_path).read_text())
    assert len(history["data"]["clients"]) == 6
    chosen = [[c["name"] for c in r["clients"]] for r in history["rounds"]]
    assert all(len(names) == 3 for names in chosen) and chosen[0] != chosen[1]
    log_text = Path(result.log_path).read_text()
    assert "Model Trainer 2 calls" in log_text and "Model Trainer 3" not in log_text


def test_an_sft_run_writes_pair_files_but_spends_no_time_scoring_them(run):
    """PREFERENCE_METRICS=auto: the preprocessor still writes each client's pairs (a later DPO run can use them),
    but an SFT run does not pay two forward passes per held-out pair every round."""
    config, _, _, history = run
    assert config.training_objective == "sft" and not config.scores_preferences
    assert sum(c["num_test_pairs"] + c["num_train_pairs"] for c in history["data"]["clients"]) > 0
    assert history["base"]["preference_accuracy"] is None and history["base"]["preference_pairs"] == 0
    assert all(r["global"]["preference_accuracy"] is None for r in history["rounds"])


def test_preference_metrics_resolve_from_the_objective_and_reach_the_sites_resolved(tmp_path):
    from fl_crew_reddit.config import load_config
    from fl_crew_reddit.federation.flower import model_settings

    def settings(**values):
        return load_config(_env_file=None, fl_crew_reddit_dir=tmp_path, **values)

    assert not settings().scores_preferences and settings(preference_metrics="on").scores_preferences
    assert settings(training_objective="sft_then_dpo").scores_preferences
    assert not settings(training_objective="dpo", preference_metrics="off").scores_preferences
    # a site builds its settings from these: "auto" would resolve there against the site's own (default) objective
    assert model_settings(settings(training_objective="dpo"))["preference_metrics"] == "on"
    assert model_settings(settings())["preference_metrics"] == "off"

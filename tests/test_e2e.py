"""The whole loop, for real, on tiny settings: MCP server subprocess → preprocessing → 3 LoRA trainers →
aggregation → evaluation, two rounds, through the CrewAI Flow and the manager users call."""
import json
from pathlib import Path

import pytest
import torch


@pytest.mark.e2e
def test_two_rounds_on_the_snapshot_with_a_tiny_model(tiny_config, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fl_crew_reddit import FLCrewRedditManager

    rounds_seen = []
    result = FLCrewRedditManager(tiny_config).run_federated_learning(num_rounds=2, on_round=rounds_seen.append)

    # The typed result and history.json agree and have every promised field.
    history = json.loads(Path(result.history_path).read_text())
    assert history["rounds"] == result.history["rounds"]
    assert {"perplexity", "bleu", "rouge_l"} <= set(history["base"])
    assert [r["round"] for r in history["rounds"]] == [1, 2] == [r["round"] for r in rounds_seen]
    for record in history["rounds"]:
        assert [c["name"] for c in record["clients"]] == ["client-0", "client-1", "client-2"]
        assert all(c["num_examples"] == 16 and c["train_loss"] > 0 for c in record["clients"])
        assert {"perplexity", "bleu", "rouge_l"} <= set(record["global"]) and record["seconds"] > 0
        assert set(record["global"]["per_client"]) == {"client-0", "client-1", "client-2"}
        assert record["skipped"] == {}
    # Clients are non-IID by subreddit, and drops are counted.
    assert sorted(s for c in history["data"]["clients"] for s in c["subreddits"]) == ["cooking", "gardening", "learnpython"]
    assert history["data"]["dropped"]["deleted_or_removed"] > 0 and history["data"]["dropped"]["bot_or_moderator"] > 0
    # Training helped: a random tiny model learns the Reddit replies fast.
    perplexities = [history["base"]["perplexity"]] + [r["global"]["perplexity"] for r in history["rounds"]]
    assert perplexities[2] < perplexities[1] < perplexities[0]

    # Each client has a validation split, disjoint by thread from its train and test splits; the best round is the
    # one with the lowest validation perplexity, and its adapter is kept in the results.
    for shard in history["data"]["clients"]:
        splits = {name: {json.loads(line)["post_id"] for line in Path(shard[f"{name}_path"]).read_text().splitlines()}
                  for name in ("train", "validation", "test")}
        assert shard["num_validation"] >= 8 and all(splits.values())
        assert not (splits["train"] & splits["validation"] or splits["validation"] & splits["test"])
    validation = {r["round"]: r["global"]["validation_perplexity"] for r in history["rounds"]}
    assert history["base"]["validation_perplexity"] > 0 and all(v > 0 for v in validation.values())
    assert history["best_round"] == min(validation, key=validation.get) == result.best_round
    assert history["best_adapter"] == result.best_adapter == result.global_adapters[history["best_round"] - 1]

    # TensorBoard: one step per round (0: the base model), with the promised tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(tiny_config.fl_crew_reddit_dir) / "logs" / "tensorboard" / result.run_id))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"perplexity/test", "perplexity/validation", "perplexity_test_per_client/client-0", "train_loss/client-2",
            "generation/bleu", "generation/chrf", "generation/rouge_l", "update_norm/client-1", "clients/accepted",
            "clients/rejected", "time/round_seconds"} <= tags
    assert [e.step for e in events.Scalars("perplexity/test")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("perplexity/validation")] == pytest.approx(
        [history["base"]["validation_perplexity"], validation[1], validation[2]], rel=1e-5)

    # Every adapter is in PEFT's own format and loads with PeftModel.from_pretrained.
    root = Path(tiny_config.fl_crew_reddit_dir)
    for client in ("client-0", "client-1", "client-2"):
        assert (root / "models" / "local" / result.run_id / client / "round-2" / "adapter_model.safetensors").is_file()
    assert len(result.global_adapters) == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, result.final_adapter)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I store basil?"}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    # The crew did the work: each role called its tool, the log says so, results/latest points here.
    log_text = Path(result.log_path).read_text()
    for role in ("Reddit Data Collector", "Data Preprocessor", "Model Trainer 1", "Model Trainer 3",
                 "Federated Aggregator", "Model Evaluator"):
        assert role in log_text
    assert (root / "results" / "latest").resolve() == Path(result.history_path).parent.resolve()
    assert torch.is_tensor(torch.zeros(1))


@pytest.mark.e2e
def test_baselines_train_on_the_same_budget_and_are_reported(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"baselines": ["local_only", "centralized"], "eval_samples": 0,
                                            "local_epochs": 1, "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    baselines = result.history["baselines"]
    federated_steps = sum(c["metrics"]["steps"] for r in result.history["rounds"] for c in r["clients"])
    local = baselines["local_only"]
    assert set(local["per_client"]) == {"client-0", "client-1", "client-2"}
    assert all(v["steps"] * 3 == federated_steps for v in local["per_client"].values())
    assert str(federated_steps) in baselines["centralized"]["description"]
    for entry in baselines.values():
        assert entry["perplexity"] < result.history["base"]["perplexity"]
    # Each baseline is read at its best round-equivalent chunk on validation.
    central = baselines["centralized"]
    chunks = {p["round"]: p["perplexity"] for p in central["validation_per_round"]}
    assert sorted(chunks) == [1, 2] and central["best_round"] == min(chunks, key=chunks.get)
    for values in local["per_client"].values():
        chunks = {p["round"]: p["perplexity"] for p in values["validation_per_round"]}
        assert sorted(chunks) == [1, 2] and values["best_round"] == min(chunks, key=chunks.get)
    assert result.history["best_round"] in (1, 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(config.fl_crew_reddit_dir) / "logs" / "tensorboard" / result.run_id))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("baseline/centralized/test_perplexity")] == [
        (central["best_round"], pytest.approx(central["perplexity"], rel=1e-5))]
    assert {"baseline/local_only/test_perplexity_mean", "baseline/local_only/validation_perplexity/client-0",
            "baseline/centralized/validation_perplexity"} <= set(events.Tags()["scalars"])


@pytest.mark.e2e
def test_more_clients_than_trainers_with_client_sampling(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"num_clients": 6, "num_trainers": 2, "fraction_fit": 0.5,
                                            "partition": "iid", "eval_samples": 0, "local_epochs": 1,
                                            "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    assert len(result.history["data"]["clients"]) == 6
    chosen = [[c["name"] for c in r["clients"]] for r in result.history["rounds"]]
    assert all(len(names) == 3 for names in chosen) and chosen[0] != chosen[1]
    log_text = Path(result.log_path).read_text()
    assert "Model Trainer 2 calls" in log_text and "Model Trainer 3" not in log_text

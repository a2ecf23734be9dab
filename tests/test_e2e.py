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

"""Byzantine clients on the real federated loop (tiny model): robust rules hold the global perplexity, FedAvg not.

8 IID clients, one round; client-6 and client-7 train honestly and then send global − 10·(local − global)
(sign-flipped, 10× scaled). The attack is injected by `benchmarks/robustness.py` (a LocalTrainer subclass patched
into the workspace for the run only); the norm screen is effectively off (MAX_UPDATE_NORM=1e9) so the rule itself
is what is tested.

Settings chosen for the tiny random model (measured, see docs/aggregation.md):
* LoRA also on `lm_head`: the random model's logits are RMSNorm(h)·Eᵀ with small random tied embeddings, so
  with the default all-linear targets (output head excluded) neither training nor an attack can move the held-out
  perplexity (≈ vocabulary size) by more than a few percent, and a 5% band would say nothing.
* lr 1e-3 with lora_alpha 64 (scale 16): a visible step while δA ≪ A (LoRA's near-linear regime, as for
  SmolLM2-135M at lr 5e-4). At lr ≥ 1e-2 the product term δB·δA, which flipping both factors does not flip,
  dominates and the "attack" can even lower FedAvg's perplexity.
"""
import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "robustness.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("robustness_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_robust_rules_keep_perplexity_under_sign_flipped_scaled_clients(tiny_config):
    bench = _benchmark()
    base = tiny_config.model_copy(update={
        "num_trainers": 8, "partition": "iid", "eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 32,
        "learning_rate": 1e-3, "lora_alpha": 64,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head"]})
    results = {name: bench.run_one(name, base, rounds=1)
               for name in ("clean_fedavg", "fedavg", "krum", "median", "trimmed_mean")}
    goals = bench.judge(results)
    table = {name: (round(r["final_perplexity"], 3), round(r["ratio_to_clean"], 4)) for name, r in results.items()}

    # Same data and starting point everywhere; the clean run learned something, so a 5% band is not vacuous.
    bases = {r["base_perplexity"] for r in results.values()}
    assert len(bases) == 1, table
    clean = results["clean_fedavg"]["final_perplexity"]
    assert clean < 0.95 * bases.pop(), table
    # The attack really happened and nothing was screened out: all 8 updates reached every rule.
    for name, run in results.items():
        assert run["accepted"] == [[f"client-{i}" for i in range(8)]] and run["rejected"] == [{}], (name, run)
        assert all(math.isfinite(p) for p in run["perplexities"])
    norms = results["fedavg"]["update_norms"][0]
    honest = max(norms[f"client-{i}"] for i in range(6))
    assert min(norms["client-6"], norms["client-7"]) > 5 * honest, norms
    assert results["clean_fedavg"]["update_norms"][0]["client-6"] < 2 * honest

    # The goals: robust rules within 5% of the clean run, attacked FedAvg more than 5% worse.
    assert results["fedavg"]["ratio_to_clean"] > 1.05, table
    for name in ("krum", "median", "trimmed_mean"):
        # within 5% of clean = at most 5% worse: Krum keeps one client's model, which on the tiny random model
        # can also land a few percent below the clean average
        assert results[name]["ratio_to_clean"] <= 1.05, (name, table)
    assert goals["all_met"], (goals, table)

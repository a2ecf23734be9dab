"""Byzantine clients on the real federated loop (tiny model): robust rules hold the global perplexity, FedAvg not.

8 IID clients, one round; 2 of them (ATTACKER_FRACTION=0.25, chosen from SEED by the product) train honestly and
then send global − 10·(local − global) (ATTACK=scale, ATTACK_SCALE=-10: sign-flipped, 10× scaled). The norm screen
is effectively off (MAX_UPDATE_NORM=1e9) so the rule itself is what is tested. The full attack × rule matrix on
the embedded model is `benchmarks/robustness.py` (docs/aggregation.md).

Settings chosen for the tiny random model (measured, see docs/aggregation.md):
* LoRA also on `lm_head`: the random model's logits are RMSNorm(h)·Eᵀ with small random tied embeddings, so
  with the default all-linear targets (output head excluded) neither training nor an attack can move the held-out
  perplexity (≈ vocabulary size) by more than a few percent, and a 5% band would say nothing.
* lr 1e-3 with lora_alpha 64 (scale 16): a visible step while δA ≪ A (LoRA's near-linear regime, as for
  SmolLM2-135M at lr 5e-4). At lr ≥ 1e-2 the product term δB·δA, which flipping both factors does not flip,
  dominates and the "attack" can even lower FedAvg's perplexity.
"""
import math

import pytest

from fl_crew_reddit.site.attacks import select_attackers

RUNS = {"clean_fedavg": ("fedavg", False), "fedavg": ("fedavg", True), "krum": ("krum", True),
        "median": ("median", True), "trimmed_mean": ("trimmed_mean", True)}


def _run(base, name: str) -> dict:
    from fl_crew_reddit import FLCrewRedditManager

    method, attacked = RUNS[name]
    config = base.model_copy(update={"aggregation_method": method, "num_byzantine": 2, "trimmed_mean_beta": 0.25,
                                     "attack": "scale" if attacked else "none",
                                     "attacker_fraction": 0.25 if attacked else 0.0})
    history = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id=f"robustness-{name}").history
    record = history["rounds"][0]
    return {"base": history["base"]["perplexity"], "final": record["global"]["perplexity"],
            "accepted": record["aggregation"]["accepted"], "rejected": record["aggregation"]["rejected"],
            "norms": record["aggregation"]["update_norms"],
            "attackers": (record.get("attack") or {}).get("attackers", [])}


@pytest.mark.e2e
def test_robust_rules_keep_perplexity_under_sign_flipped_scaled_clients(tiny_config):
    base = tiny_config.model_copy(update={
        "num_trainers": 8, "partition": "iid", "eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 32,
        "learning_rate": 1e-3, "lora_alpha": 64, "max_update_norm": 1e9, "attack_scale": -10.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head"]})
    results = {name: _run(base, name) for name in RUNS}
    clean = results["clean_fedavg"]["final"]
    ratios = {name: r["final"] / clean for name, r in results.items()}
    table = {name: (round(r["final"], 3), round(ratios[name], 4)) for name, r in results.items()}

    # Same data and starting point everywhere; the clean run learned something, so a 5% band is not vacuous.
    bases = {r["base"] for r in results.values()}
    assert len(bases) == 1, table
    assert clean < 0.95 * bases.pop(), table
    # The attack really happened and nothing was screened out: all 8 updates reached every rule.
    names = [f"client-{i}" for i in range(8)]
    attackers = select_attackers(base.seed, names, 0.25)
    assert len(attackers) == 2
    for name, run in results.items():
        assert run["accepted"] == names and run["rejected"] == {}, (name, run)
        assert run["attackers"] == (attackers if name != "clean_fedavg" else [])
        assert math.isfinite(run["final"])
    norms = results["fedavg"]["norms"]
    honest = max(norms[n] for n in names if n not in attackers)
    assert min(norms[n] for n in attackers) > 5 * honest, norms
    assert max(results["clean_fedavg"]["norms"][n] for n in attackers) < 2 * honest

    # The goals: robust rules within 5% of the clean run, attacked FedAvg more than 5% worse.
    assert ratios["fedavg"] > 1.05, table
    for name in ("krum", "median", "trimmed_mean"):
        # within 5% of clean = at most 5% worse: Krum keeps one client's model, which on the tiny random model
        # can also land a few percent below the clean average
        assert ratios[name] <= 1.05, (name, table)


def _benchmark():
    """benchmarks/robustness.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "robustness.py"
    spec = importlib.util.spec_from_file_location("robustness_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_attack_parameters_reach_each_rows_settings(tmp_path):
    """The targeted run's options: IPM's ε, the signed scale, the backdoor's boost / fraction / trigger / target and
    ATTACK_LOCAL_EPOCHS (on the backdoor row only), a client count with Krum's f = its attackers."""
    from fl_crew_reddit.config import FLCrewRedditConfig

    bench = _benchmark()
    args = bench.build_parser().parse_args(
        ["--ipm-epsilon", "4", "--attack-scale", "-10", "--backdoor-boost", "4", "--backdoor-fraction", "0.75",
         "--backdoor-local-epochs", "12", "--backdoor-paired", "--clients", "4", "--threads", "1"])
    base = FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=tmp_path, num_trainers=args.clients)
    backdoor = base.model_copy(update=bench.attack_settings("backdoor", args))
    ipm = base.model_copy(update=bench.attack_settings("ipm", args))
    clean = base.model_copy(update=bench.attack_settings("none", args))
    assert (backdoor.attack_local_epochs, backdoor.backdoor_boost, backdoor.backdoor_fraction) == (12, 4.0, 0.75)
    assert backdoor.backdoor_paired and bench.rule_strategy("fedavg", backdoor, None, 0.0).fit_config(
        1, ["client-0", "client-1", "client-2", "client-3"])["backdoor_paired"] is True
    assert not base.model_copy(update=bench.attack_settings(
        "backdoor", bench.build_parser().parse_args([]))).backdoor_paired  # off unless asked
    assert (ipm.attack_ipm_epsilon, ipm.attack_scale, ipm.attack_local_epochs) == (4.0, -10.0, 0)
    assert (clean.attack, clean.attacker_fraction) == ("none", 0.0)
    assert bench.num_byzantine(8) == 2 and bench.num_byzantine(4) == 1
    assert bench.rule_strategy("krum", ipm.model_copy(update={"num_trainers": 4}), None, 0.0).settings.num_byzantine \
        == 1
    with pytest.raises(ValueError, match="norm bound"):
        bench.rule_strategy("fedavg_norm_bound", ipm, None, 0.0)

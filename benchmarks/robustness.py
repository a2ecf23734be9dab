"""Byzantine clients on the real federated loop: does robust aggregation keep the global model healthy?

8 simulated clients (PARTITION=iid, snapshot data); `client-6` and `client-7` are Byzantine: after honest local
training they send `global + ATTACK_SCALE * (local - global)` for every adapter tensor (sign-flipped update,
10x scaled by default). The attack lives only here: `LocalTrainer` is swapped for a subclass inside
`fl_crew_reddit.workspace` for the duration of a run (`byzantine_clients`); the product code is not changed.

Each run goes through `FLCrewRedditManager.run_federated_learning` (collect -> preprocess -> train 8 clients ->
screen -> aggregate -> evaluate) with the same SEED, data and settings, one after the other in this process:

    clean_fedavg          no attackers, FedAvg                 (the reference)
    fedavg                attacked, FedAvg
    krum                  attacked, Krum, NUM_BYZANTINE=2
    multi_krum            attacked, multi-Krum, NUM_BYZANTINE=2 (m = n - f = 6)
    median                attacked, coordinate-wise median
    trimmed_mean          attacked, trimmed mean, TRIMMED_MEAN_BETA=0.25 (cuts 2 of 8 per end)
    fedavg_norm_screen    attacked, FedAvg, with the default MAX_UPDATE_NORM screen (100)

All runs except the last set MAX_UPDATE_NORM=1e9, so the update-norm screen accepts everything and what is
measured is the aggregation rule itself; the last run shows what the default screen alone does. Bulyan is not
run: with f=2 it needs n >= 4f+3 = 11 clients.

Goals: final global held-out perplexity of krum / median / trimmed_mean within 5% of clean_fedavg's, attacked
fedavg's more than 5% worse.

    .venv/bin/python benchmarks/robustness.py            # SmolLM2-135M (embedded), 2 rounds, 12 examples/client
    .venv/bin/python benchmarks/robustness.py --quick    # SmolLM2-135M, 1 round, 8 examples/client, no multi_krum
    .venv/bin/python benchmarks/robustness.py --runs clean_fedavg,fedavg,median --rounds 1

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fl_crew_reddit._quiet  # noqa: E402,F401  (CrewAI / Flower / HF offline defaults, before they load)
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402
from fl_crew_reddit.training.trainer import FitResult, LocalTrainer  # noqa: E402

ATTACKERS = ("client-6", "client-7")
ATTACK_SCALE = -10.0
NUM_TRAINERS = 8
NUM_BYZANTINE = 2
TRIMMED_MEAN_BETA = 0.25
NO_SCREEN = 1e9
TOLERANCE = 0.05
SEED = 42

# name -> (aggregation method, attacked, max_update_norm or None for the config default)
RUNS = {
    "clean_fedavg": ("fedavg", False, NO_SCREEN),
    "fedavg": ("fedavg", True, NO_SCREEN),
    "krum": ("krum", True, NO_SCREEN),
    "multi_krum": ("multi_krum", True, NO_SCREEN),
    "median": ("median", True, NO_SCREEN),
    "trimmed_mean": ("trimmed_mean", True, NO_SCREEN),
    "fedavg_norm_screen": ("fedavg", True, None),
}
ROBUST_GOAL = ("krum", "median", "trimmed_mean")  # must stay within TOLERANCE of clean_fedavg
FEDAVG_GOAL = "fedavg"  # must be worse than clean_fedavg by more than TOLERANCE


def say(message: str) -> None:
    print(f"[robustness] {message}", file=sys.stderr, flush=True)


# --- the attack (benchmark/test only) -------------------------------------------------------------------------
def update_norm(global_state: dict, state: dict) -> float:
    """‖state − global‖₂ over all keys, float64 (what the norm screen measures)."""
    return math.sqrt(sum(float(((state[k].double() - global_state[k].double()) ** 2).sum()) for k in global_state))


def flip_and_scale(global_state: dict, local_state: dict, scale: float) -> dict:
    """global + scale · (local − global) for every tensor, in float32, returned in each tensor's dtype."""
    return {key: (global_state[key].float() + scale * (value.float() - global_state[key].float())).to(value.dtype)
            for key, value in local_state.items()}


@contextlib.contextmanager
def byzantine_clients(attackers=ATTACKERS, scale: float = ATTACK_SCALE, log: list | None = None):
    """While active, the federated loop's clients named in `attackers` send flipped/scaled updates.

    Every client trains honestly (`LocalTrainer.fit` unchanged); only the returned adapter of an attacker is
    replaced. `log` (optional) receives {round, client, byzantine, honest_norm, sent_norm} per fit.
    """
    attackers = frozenset(attackers)

    class ByzantineTrainer(LocalTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.show_progress = False  # 8 clients x runs of bars would drown the progress lines

        def fit(self, global_adapter, config) -> FitResult:
            result = super().fit(global_adapter, config)
            honest = update_norm(global_adapter, result.state)
            byzantine = self.name in attackers
            if byzantine:
                result.state = flip_and_scale(global_adapter, result.state, scale)
            if log is not None:
                log.append({"round": int(config.get("round", 0)), "client": self.name, "byzantine": byzantine,
                            "honest_norm": honest,
                            "sent_norm": update_norm(global_adapter, result.state) if byzantine else honest})
            return result

    with mock.patch("fl_crew_reddit.site.app.LocalTrainer", ByzantineTrainer):  # the sites train the clients
        yield


@contextlib.contextmanager
def norm_log(log: list):
    """The same per-fit norm record for a clean run (no attackers)."""
    with byzantine_clients(attackers=(), log=log):
        yield


# --- one run --------------------------------------------------------------------------------------------------
def run_one(name: str, base: FLCrewRedditConfig, rounds: int, attack_scale: float = ATTACK_SCALE,
            attackers=ATTACKERS) -> dict:
    from fl_crew_reddit import FLCrewRedditManager

    method, attacked, max_norm = RUNS[name]
    update = {"aggregation_method": method, "num_byzantine": NUM_BYZANTINE, "trimmed_mean_beta": TRIMMED_MEAN_BETA}
    if max_norm is not None:
        update["max_update_norm"] = max_norm
    config = base.model_copy(update=update)
    fits: list[dict] = []
    started = time.perf_counter()
    context = byzantine_clients(attackers, attack_scale, fits) if attacked else norm_log(fits)
    with context:
        result = FLCrewRedditManager(config).run_federated_learning(num_rounds=rounds, run_id=f"robustness-{name}")
    rounds_out = result.history["rounds"]
    return {
        "method": method, "attacked": attacked, "max_update_norm": config.max_update_norm,
        "options": ({"num_byzantine": NUM_BYZANTINE} if method in ("krum", "multi_krum")
                    else {"beta": TRIMMED_MEAN_BETA} if method == "trimmed_mean" else {}),
        "base_perplexity": result.history["base"]["perplexity"],
        "perplexities": result.perplexities(),
        "final_perplexity": result.perplexities()[-1],
        "accepted": [r["aggregation"]["accepted"] for r in rounds_out],
        "rejected": [r["aggregation"]["rejected"] for r in rounds_out],
        "skipped": [r["skipped"] for r in rounds_out],
        "update_norms": [{f["client"]: round(f["sent_norm"], 4) for f in fits if f["round"] == r["round"]}
                         for r in rounds_out],
        "held_out_examples": sum(c["num_test"] for c in result.history["data"]["clients"]),
        "seconds": round(time.perf_counter() - started, 1),
    }


def judge(results: dict, tolerance: float = TOLERANCE) -> dict:
    """ratio = final / clean final per run, and the pass/fail of each goal that can be judged."""
    clean = results["clean_fedavg"]["final_perplexity"]
    goals = {}
    for name, run in results.items():
        run["ratio_to_clean"] = run["final_perplexity"] / clean
        if name == "clean_fedavg":
            continue
        if name in ("fedavg", "fedavg_norm_screen"):
            run["worse_than_clean_by_more_than_5pct"] = run["ratio_to_clean"] > 1 + tolerance
        else:
            # the goal is not to degrade: a robust rule may also end below the clean run (Krum keeps one client)
            run["within_5pct_of_clean"] = run["ratio_to_clean"] <= 1 + tolerance
    for name in ROBUST_GOAL:
        if name in results:
            goals[f"{name}_within_5pct_of_clean"] = results[name]["within_5pct_of_clean"]
    if FEDAVG_GOAL in results:
        goals["fedavg_degrades_more_than_5pct"] = results[FEDAVG_GOAL]["worse_than_clean_by_more_than_5pct"]
    complete = all(name in results for name in (*ROBUST_GOAL, FEDAVG_GOAL))
    goals["all_met"] = complete and all(goals.values())
    return goals


def quiet_logging() -> None:
    """stderr gets warnings and the flow's one-line progress records; the run's log file still gets everything."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name == "fl_crew_reddit.progress")
    logging.getLogger().addHandler(handler)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 8 examples per client")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 2; --quick: 1)")
    parser.add_argument("--examples", type=int, help="max examples per client (default 12; --quick: 8)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--model", default=None, help="BASE_LLM_MODEL (default: the embedded SmolLM2-135M)")
    parser.add_argument("--attack-scale", type=float, default=ATTACK_SCALE)
    parser.add_argument("--test-fraction", type=float, default=0.075,
                        help="TEST_FRACTION: 0.075 holds out ~6 examples per client (48 in all), 0.2 (the default "
                             "setting) 12 per client; evaluation time grows with it")
    parser.add_argument("--runs", help=f"comma-separated subset of {', '.join(RUNS)} "
                                       "(default: all; --quick: all but multi_krum)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 2)
    examples = args.examples or (8 if args.quick else 12)
    default_runs = [n for n in RUNS if not (args.quick and n == "multi_krum")]
    names = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else default_runs
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if "clean_fedavg" not in names:
        names.insert(0, "clean_fedavg")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_logging()

    results: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-robustness-") as folder:
        settings = {"fl_crew_reddit_dir": Path(folder), "num_trainers": NUM_TRAINERS, "partition": "iid",
                    "reddit_backend": "snapshot", "max_examples_per_client": examples, "local_epochs": 1,
                    "eval_samples": 0, "learning_rate": args.learning_rate, "seed": SEED,
                    "test_fraction": args.test_fraction}
        if args.model:
            settings["base_llm_model"] = args.model
        base = FLCrewRedditConfig(_env_file=None, **settings)
        say(f"model {base.base_llm_model}, {NUM_TRAINERS} clients (Byzantine: {', '.join(ATTACKERS)}, "
            f"update x {args.attack_scale:g}), {rounds} round(s), {examples} examples/client, "
            f"lr {args.learning_rate:g}")
        for name in names:
            say(f"run {name} ...")
            results[name] = run_one(name, base, rounds, args.attack_scale)
            held_out = results[name]["held_out_examples"]
            run = results[name]
            say(f"run {name}: perplexity per round {[round(p, 3) for p in run['perplexities']]} "
                f"(base {run['base_perplexity']:.3f}), accepted {run['accepted'][-1]}, {run['seconds']:.0f}s")
    goals = judge(results)
    for name, run in results.items():
        say(f"{name:>20}: final {run['final_perplexity']:.3f}  ratio {run['ratio_to_clean']:.4f}")
    say(f"goals: {goals}")
    report = {
        "benchmark": "robustness", "quick": args.quick, "model": base.base_llm_model, "rounds": rounds,
        "num_trainers": NUM_TRAINERS, "byzantine_clients": list(ATTACKERS), "attack_scale": args.attack_scale,
        "partition": "iid", "reddit_backend": "snapshot", "max_examples_per_client": examples, "local_epochs": 1,
        "learning_rate": args.learning_rate, "seed": SEED, "eval_samples": 0, "test_fraction": args.test_fraction,
        "held_out_examples": held_out, "tolerance": TOLERANCE,
        "norm_screen": (f"max_update_norm={NO_SCREEN:g} (screen off) in every run except fedavg_norm_screen, "
                        f"which uses the default {FLCrewRedditConfig.model_fields['max_update_norm'].default:g}"),
        "bulyan": f"not run: needs n >= 4f+3 = {4 * NUM_BYZANTINE + 3} clients, have {NUM_TRAINERS}",
        "runs": results, "goals": goals, "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg()[0]},
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()

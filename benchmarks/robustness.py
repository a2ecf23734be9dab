"""Attacks × aggregation rules on the real federated loop: held-out perplexity relative to the clean run, and
backdoor success.

8 simulated clients (PARTITION=iid, snapshot data). The attackers are the product's (ATTACK, ATTACKER_FRACTION=0.25:
2 of 8, chosen from SEED by `site/attacks.select_attackers`): real clients that train honestly on their own data (or
on their poisoned data) and then attack, exactly as in a run with those settings. Attacks (site/attacks.py):

    none            the clean reference
    sign_flip       −Δ                        scale           ATTACK_SCALE · Δ (10)
    gaussian_noise  N(0, (10·RMS(Δ))²)        label_flip      replies shuffled across threads (own train split)
    alie            Δ − z·|Δ|, z = z_max(8, 2) = 0.32          ipm    −ε·Δ, ε = ATTACK_IPM_EPSILON (0.5)
    backdoor        trigger → fixed reply on half of the attacker's examples, update boosted BACKDOOR_BOOST (4×)

Rules (each sees exactly the same client updates of a round; the update-norm screen is off, MAX_UPDATE_NORM=1e9,
so what is measured is the rule):

    fedavg, median, trimmed_mean (beta 0.25: 2 of 8 per end), krum and multi_krum (NUM_BYZANTINE = attackers: 2),
    fedavg_norm_bound      FedAvg of updates clipped to a norm bound B (Sun et al. 2019's norm bounding; the
                           central-DP clipping path with no noise). B = the median update norm of the clean run's
                           round 1 (chosen before any attack is seen).
    fedavg_norm_bound_dp   the same plus central Gaussian noise, DP_NOISE_MULTIPLIER σ (DP-FedAvg; "weak DP" at
                           the default σ: see the JSON's dp entry for the ε the accountant gives). Backdoor row only
                           unless --dp-all.

Round 1 of every attack is trained once and aggregated by every rule (the controlled comparison: identical
updates); with --rounds R > 1 each rule then continues its own chain (its global adapter, its clients' training).

Goals (issue 12, 25% attackers): for every attack some robust rule within 5% of clean perplexity; backdoor success
≤ 5% with norm bound and DP; FedAvg broken (> 5% worse than clean) by some attack.

    .venv/bin/python benchmarks/robustness.py --quick   # 1 round, 8 examples/client, MAX_SEQ_LENGTH 128,
                                                        # no multi_krum, 16 backdoor prompts
    .venv/bin/python benchmarks/robustness.py           # 2 rounds, 12 examples/client
    .venv/bin/python benchmarks/robustness.py --quick --attacks none,scale --rules fedavg,median
    # the targeted run of docs/aggregation.md: FedAvg broken by IPM at ε 10, a backdoor that implants (attackers
    # training 20 local epochs, boost n/m) and the norm bound stopping it
    .venv/bin/python benchmarks/robustness.py --quick --threads 1 --attacks ipm,backdoor --ipm-epsilon 10 \
        --rules fedavg,median,trimmed_mean,krum,fedavg_norm_bound \
        --backdoor-rules fedavg,median,fedavg_norm_bound,fedavg_norm_bound_dp --backdoor-local-epochs 20

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fl_crew_reddit._quiet  # noqa: E402,F401  (CrewAI / Flower / HF offline defaults, before they load)
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402

NUM_TRAINERS = 8
ATTACKER_FRACTION = 0.25
TRIMMED_MEAN_BETA = 0.25
NO_SCREEN = 1e9
TOLERANCE = 0.05
BACKDOOR_GOAL = 0.05
SEED = 42
ATTACKS = ("none", "sign_flip", "scale", "gaussian_noise", "label_flip", "alie", "ipm", "backdoor")
RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "fedavg_norm_bound", "fedavg_norm_bound_dp")
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "fedavg_norm_bound", "fedavg_norm_bound_dp")


def say(message: str) -> None:
    print(f"[robustness] {message}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    """stderr gets warnings only; the library's own progress lines would drown the matrix."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    logging.getLogger().addHandler(handler)


def num_byzantine(num_clients: int) -> int:
    """Krum's f: the number of attackers ATTACKER_FRACTION picks among `num_clients` (2 of 8)."""
    from fl_crew_reddit.site.attacks import num_attackers

    return max(1, num_attackers(ATTACKER_FRACTION, num_clients))


def rule_strategy(rule: str, config: FLCrewRedditConfig, norm_bound: float | None, dp_noise: float):
    """The server strategy of `rule` (the product's FederatedStrategy with that rule's settings)."""
    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

    settings = dataclasses.replace(StrategySettings.from_config(config), max_update_norm=NO_SCREEN,
                                   num_byzantine=num_byzantine(config.num_trainers),
                                   trimmed_mean_beta=TRIMMED_MEAN_BETA)
    if rule.startswith("fedavg_norm_bound"):
        if norm_bound is None:
            raise ValueError("the norm bound comes from the clean run: run attack none first")
        settings = dataclasses.replace(settings, aggregation_method="fedavg", dp_mode="central",
                                       dp_clip_norm=norm_bound, dp_noise_multiplier=dp_noise if rule.endswith("dp")
                                       else 0.0)
    else:
        settings = dataclasses.replace(settings, aggregation_method=rule)
    return FederatedStrategy(settings, noise_secret=SEED)


class Matrix:
    """One workspace (model, data) for every cell; each attack swaps in its settings and strategy."""

    def __init__(self, base: FLCrewRedditConfig, root: Path):
        from fl_crew_reddit.runs import RunPaths
        from fl_crew_reddit.workspace import FederatedWorkspace

        self.base = base
        self.ws = FederatedWorkspace(base, RunPaths(root.resolve(), "robustness-matrix").create())
        _ = self.ws.model
        self.ws.site = self._quiet_site  # no progress bar per client and cell
        self.ws.collect()
        self.ws.preprocess()
        self.initial = {k: v.clone() for k, v in self.ws.global_adapter.items()}
        self.test_examples = self._test_examples()

    def _quiet_site(self, client: str):
        from fl_crew_reddit.site import Site

        ws = self.ws
        return Site(client, ws._site_data(client), ws.model, ws.tokenizer, ws.device,
                    mixed_precision=ws.config.mixed_precision, show_progress=False)

    def _test_examples(self) -> list[dict]:
        from fl_crew_reddit.preprocessing.pipeline import read_jsonl

        examples = [e for shard in self.ws.data.clients for e in read_jsonl(Path(shard.test_path))]
        random.Random(f"{SEED}-backdoor").shuffle(examples)
        return examples

    def train(self, config: FLCrewRedditConfig, global_adapter: dict, round_number: int):
        """Every client trains `round_number` from `global_adapter` under `config` (its attack): the updates, each
        client's record, the attackers."""
        from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings
        from fl_crew_reddit.training.adapter_files import load_client_update

        ws = self.ws
        ws.config = config
        ws.strategy = FederatedStrategy(StrategySettings.from_config(config))
        ws.global_adapter = global_adapter
        ws.start_round(round_number)
        records = [ws.train_client(name, round_number) for name in ws.select_clients(round_number)]
        updates = [ClientUpdate(r.name, load_client_update(Path(r.adapter_path)), r.num_examples) for r in records]
        return updates, records, ws.strategy.attackers(ws.client_names)

    def evaluate(self, adapter: dict, backdoor: bool) -> dict:
        from peft import set_peft_model_state_dict

        from fl_crew_reddit.evaluation.backdoor import backdoor_success
        from fl_crew_reddit.evaluation.evaluator import evaluate

        ws, cfg = self.ws, self.base
        set_peft_model_state_dict(ws.model, adapter)
        metrics = evaluate(ws.model, ws.tokenizer, ws._client_split("test"), [], ws.device,
                           mixed_precision=cfg.mixed_precision)
        out = {"perplexity": metrics.perplexity, "held_out_tokens": metrics.num_tokens}
        if backdoor:
            out["backdoor"] = backdoor_success(ws.model, ws.tokenizer, self.test_examples, cfg.backdoor_trigger,
                                               cfg.backdoor_target, ws.device, max_seq_length=cfg.max_seq_length,
                                               max_examples=self.backdoor_examples,
                                               mixed_precision=cfg.mixed_precision)
        return out

    backdoor_examples = 32


def update_norm(global_state: dict, state: dict) -> float:
    return math.sqrt(sum(float(((state[k].double() - global_state[k].double()) ** 2).sum()) for k in state))


def attack_settings(attack: str, args) -> dict:
    """The settings of one row: its attack and the CLI's attack parameters; ATTACK_LOCAL_EPOCHS on the backdoor row
    only (the other attackers train like everyone, so IPM's and ALIE's own-update estimates stay honest-sized)."""
    return {"attack": attack, "attacker_fraction": 0.0 if attack == "none" else ATTACKER_FRACTION,
            "attack_scale": args.attack_scale, "attack_ipm_epsilon": args.ipm_epsilon,
            "backdoor_boost": args.backdoor_boost, "backdoor_fraction": args.backdoor_fraction,
            "attack_local_epochs": args.backdoor_local_epochs if attack == "backdoor" else 0,
            "backdoor_paired": args.backdoor_paired}


def run_attack(matrix: Matrix, attack: str, rules: list[str], rounds: int, norm_bound: float | None,
               dp_noise: float, args) -> dict:
    """One row of the matrix: round 1 trained once, aggregated by every rule; later rounds per rule."""
    config = matrix.base.model_copy(update=attack_settings(attack, args))
    backdoor = attack == "backdoor"
    started = time.perf_counter()
    updates, records, attackers = matrix.train(config, matrix.initial, 1)
    norms = {u.name: round(update_norm(matrix.initial, u.state), 4) for u in updates}
    say(f"  {attack}: attackers {attackers}, update norms {norms} ({time.perf_counter() - started:.0f}s)")
    row = {"attackers": attackers, "update_norms_round_1": norms, "train_loss_round_1":
           {r.name: round(r.train_loss, 4) for r in records}, "rules": {}}
    for rule in rules:
        if rule == "fedavg_norm_bound_dp" and not (attack in ("backdoor", "none") or args.dp_all):
            continue
        began = time.perf_counter()
        strategy = rule_strategy(rule, config, norm_bound, dp_noise)
        outcome = strategy.aggregate(matrix.initial, updates, round_number=1)
        perplexities, current = [], outcome.new_global
        result = matrix.evaluate(current, (backdoor or (attack == "none" and rule == "fedavg")) and rounds == 1)
        perplexities.append(result["perplexity"])
        for round_number in range(2, rounds + 1):
            chain, _, _ = matrix.train(config, current, round_number)
            current = rule_strategy(rule, config, norm_bound, dp_noise).aggregate(
                current, chain, round_number=round_number).new_global
            result = matrix.evaluate(current, (backdoor or (attack == "none" and rule == "fedavg"))
                                     and round_number == rounds)
            perplexities.append(result["perplexity"])
        cell = {"perplexities": [round(p, 4) for p in perplexities], "final_perplexity": perplexities[-1],
                "accepted": outcome.accepted, "clipped_round_1": outcome.dp_clipped,
                "seconds": round(time.perf_counter() - began, 1)}
        if "backdoor" in result:
            cell["backdoor"] = result["backdoor"]
        row["rules"][rule] = cell
        extra = (f", backdoor success {result['backdoor']['success_rate']:.3f} likelihood "
                 f"{result['backdoor']['likelihood_rate']:.3f}") if "backdoor" in result else ""
        say(f"  {attack} × {rule}: perplexity {[round(p, 3) for p in perplexities]}{extra}")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def judge(matrix: dict, base_perplexity: float, tolerance: float = TOLERANCE) -> dict:
    """ratio to clean per cell (clean = attack none × fedavg), the share of the clean run's gain over the base model
    the cell lost (`gain_lost`: 0 = as good as clean, 1 = no better than the base model, > 1 = worse than it), and
    each goal. With few training steps the clean run is only a few percent better than the base model, so the 5%
    band alone can be met by a model that learned nothing: `gain_lost` says how much learning survived."""
    clean = matrix["none"]["rules"]["fedavg"]["final_perplexity"]
    gain = base_perplexity - clean
    goals: dict = {"robust_rule_within_5pct": {}, "fedavg_broken_by": [], "backdoor_at_most_5pct": {},
                   "clean_gain_over_base": round(base_perplexity / clean - 1, 4)}
    for attack, row in matrix.items():
        for cell in row["rules"].values():
            cell["ratio_to_clean"] = round(cell["final_perplexity"] / clean, 4)
            cell["gain_lost"] = round((cell["final_perplexity"] - clean) / gain, 3) if gain > 0 else None
        if attack == "none":
            continue
        within = [rule for rule, cell in row["rules"].items()
                  if rule in ROBUST and cell["ratio_to_clean"] <= 1 + tolerance]
        goals["robust_rule_within_5pct"][attack] = within
        if "fedavg" in row["rules"] and row["rules"]["fedavg"]["ratio_to_clean"] > 1 + tolerance:
            goals["fedavg_broken_by"].append(attack)
    if "backdoor" in matrix:
        for rule, cell in matrix["backdoor"]["rules"].items():
            if "backdoor" in cell:
                goals["backdoor_at_most_5pct"][rule] = cell["backdoor"]["success_rate"] <= BACKDOOR_GOAL
    attacks = [a for a in matrix if a != "none"]
    bounded = [goals["backdoor_at_most_5pct"].get(r) for r in ("fedavg_norm_bound", "fedavg_norm_bound_dp")]
    goals["met"] = {
        "every_attack_has_a_robust_rule": all(goals["robust_rule_within_5pct"][a] for a in attacks),
        "backdoor_defended_with_norm_bound_and_dp": ("backdoor" in matrix and bounded[1] is True),
        "fedavg_broken": bool(goals["fedavg_broken_by"]),
    }
    return goals


def table(matrix: dict) -> str:
    rules = [r for r in RULES if any(r in row["rules"] for row in matrix.values())]
    lines = ["| attack | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for attack, row in matrix.items():
        cells = []
        for rule in rules:
            cell = row["rules"].get(rule)
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell['ratio_to_clean']:.3f}" + (f" [{cell['gain_lost']:+.2f}]" if cell.get("gain_lost")
                                                         is not None else "")
            if "backdoor" in cell and attack == "backdoor":
                text += f" (bd {cell['backdoor']['success_rate']:.2f} / {cell['backdoor']['likelihood_rate']:.2f})"
            cells.append(text)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 8 examples per client")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 2; --quick: 1)")
    parser.add_argument("--examples", type=int, help="max examples per client (default 12; --quick: 8)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--model", default=None, help="BASE_LLM_MODEL (default: the embedded SmolLM2-135M)")
    parser.add_argument("--attacks", help=f"comma-separated subset of {', '.join(ATTACKS)} (none is always run)")
    parser.add_argument("--rules", help=f"comma-separated subset of {', '.join(RULES)}")
    parser.add_argument("--attack-scale", type=float, default=10.0)
    parser.add_argument("--ipm-epsilon", type=float, default=0.5)
    parser.add_argument("--backdoor-boost", type=float, default=4.0,
                        help="BACKDOOR_BOOST: 4 = n/m, the attackers' updates replace the average (Bagdasaryan)")
    parser.add_argument("--backdoor-fraction", type=float, default=0.5)
    parser.add_argument("--backdoor-trigger", help="BACKDOOR_TRIGGER (default: the setting's)")
    parser.add_argument("--backdoor-target", help="BACKDOOR_TARGET (default: the setting's)")
    parser.add_argument("--backdoor-local-epochs", type=int, default=0,
                        help="ATTACK_LOCAL_EPOCHS of the backdoor row: the backdoor attackers' local epochs (0: "
                             "--local-epochs like everyone); the other attackers train like everyone, so that "
                             "IPM's and ALIE's own-update estimates stay honest-sized")
    parser.add_argument("--backdoor-paired", action="store_true",
                        help="BACKDOOR_PAIRED: the triggered examples are copies next to the attackers' clean ones "
                             "(same prompt, real reply; with the trigger, the target): a trigger-specific implant")
    parser.add_argument("--clients", type=int, default=NUM_TRAINERS,
                        help=f"NUM_TRAINERS (default {NUM_TRAINERS}; 25%% of them attack, Krum's f the same)")
    parser.add_argument("--backdoor-examples", type=int, help="triggered held-out prompts scored (default 32; "
                                                              "--quick: 16)")
    parser.add_argument("--max-seq-length", type=int, help="MAX_SEQ_LENGTH (default 256; --quick: 128)")
    parser.add_argument("--dp-noise", type=float, default=0.0,
                        help="DP_NOISE_MULTIPLIER of fedavg_norm_bound_dp (0: noise whose norm on the mean is "
                             "half the norm bound, 'weak DP')")
    parser.add_argument("--backdoor-rules", help="the backdoor row's rules (default: --rules); each of its cells "
                                                 "also generates replies to score the backdoor, the slow part")
    parser.add_argument("--dp-all", action="store_true", help="run fedavg_norm_bound_dp on every attack")
    parser.add_argument("--clean-rules", action="store_true", help="also run every rule on the clean row")
    parser.add_argument("--test-fraction", type=float, default=0.075)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 2)
    examples = args.examples or (8 if args.quick else 12)
    attacks = ["none"] + [a.strip() for a in (args.attacks or ",".join(ATTACKS)).split(",")
                          if a.strip() and a.strip() != "none"]
    default_rules = [r for r in RULES if not (args.quick and r == "multi_krum")]
    rules = [r.strip() for r in (args.rules or ",".join(default_rules)).split(",") if r.strip()]
    if "fedavg" not in rules:
        rules.insert(0, "fedavg")
    backdoor_rules = [r.strip() for r in args.backdoor_rules.split(",") if r.strip()] if args.backdoor_rules \
        else rules
    if "fedavg" not in backdoor_rules:
        backdoor_rules.insert(0, "fedavg")
    bad = sorted(set(attacks) - set(ATTACKS)) + sorted(set(rules + backdoor_rules) - set(RULES))
    if bad:
        parser.error(f"unknown attacks / rules {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_logging()
    Matrix.backdoor_examples = args.backdoor_examples or (16 if args.quick else 32)
    max_seq_length = args.max_seq_length or (128 if args.quick else 256)

    started = time.perf_counter()
    matrix: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fl-robustness-") as folder:
        settings = {"fl_crew_reddit_dir": Path(folder), "num_trainers": args.clients, "partition": "iid",
                    "reddit_backend": "snapshot", "max_examples_per_client": examples,
                    "local_epochs": args.local_epochs, "eval_samples": 0, "learning_rate": args.learning_rate,
                    "seed": SEED, "test_fraction": args.test_fraction, "max_update_norm": NO_SCREEN,
                    "max_seq_length": max_seq_length}
        if args.model:
            settings["base_llm_model"] = args.model
        settings.update({key: value for key, value in (("backdoor_trigger", args.backdoor_trigger),
                                                       ("backdoor_target", args.backdoor_target)) if value})
        base = FLCrewRedditConfig(_env_file=None, **settings)
        say(f"model {base.base_llm_model}, {args.clients} clients ({ATTACKER_FRACTION:g} attack), {rounds} "
            f"round(s), {examples} examples/client, lr {args.learning_rate:g}; attacks {attacks}; rules {rules}")
        matrix_obj = Matrix(base, Path(folder))
        dims = sum(v.numel() for v in matrix_obj.initial.values())
        base_eval = matrix_obj.evaluate(matrix_obj.initial, backdoor=False)
        say(f"base perplexity {base_eval['perplexity']:.3f}, {dims:,} adapter values")
        norm_bound, dp_noise, dp = None, args.dp_noise, None
        for attack in attacks:
            say(f"attack {attack} ...")
            if attack != "none" and norm_bound is None:
                clean_norms = sorted(matrix["none"]["update_norms_round_1"].values())
                norm_bound = float(clean_norms[len(clean_norms) // 2])
                dp_noise = dp_noise or 0.5 * args.clients / math.sqrt(dims)
                dp = privacy_of(norm_bound, dp_noise, rounds, args.clients)
                say(f"norm bound {norm_bound:.4f} (median clean update norm), DP noise multiplier {dp_noise:.3g}: {dp}")
            # the clean row: FedAvg is the reference; the other rules on clean data only with --clean-rules
            clean_rules = rules if args.clean_rules else ["fedavg"]
            row_rules = clean_rules if attack == "none" else backdoor_rules if attack == "backdoor" else rules
            matrix[attack] = run_attack(matrix_obj, attack, [r for r in row_rules
                                                             if attack != "none" or
                                                             not r.startswith("fedavg_norm_bound")],
                                        rounds, norm_bound, dp_noise, args)
        matrix_obj.ws.close()
    goals = judge(matrix, base_eval["perplexity"])
    say("ratio to clean [share of the clean gain lost] (backdoor row: success rate greedy / likelihood)\n"
        + table(matrix))
    say(f"goals: {goals}")
    report = {
        "benchmark": "robustness_matrix", "quick": args.quick, "model": base.base_llm_model, "rounds": rounds,
        "num_trainers": args.clients, "attacker_fraction": ATTACKER_FRACTION, "partition": "iid",
        "max_examples_per_client": examples, "max_seq_length": max_seq_length,
        "local_epochs": args.local_epochs, "learning_rate": args.learning_rate,
        "seed": SEED, "test_fraction": args.test_fraction, "tolerance": TOLERANCE,
        "attack_settings": {"attack_scale": args.attack_scale, "attack_ipm_epsilon": args.ipm_epsilon,
                            "backdoor_boost": args.backdoor_boost, "backdoor_fraction": args.backdoor_fraction,
                            "backdoor_local_epochs": args.backdoor_local_epochs,
                            "backdoor_paired": args.backdoor_paired,
                            "backdoor_trigger": base.backdoor_trigger, "backdoor_target": base.backdoor_target},
        "rule_settings": {"num_byzantine": num_byzantine(args.clients), "trimmed_mean_beta": TRIMMED_MEAN_BETA,
                          "max_update_norm": NO_SCREEN, "norm_bound": norm_bound, "dp_noise_multiplier": dp_noise},
        "dp": dp, "adapter_values": dims, "base": base_eval,
        "clean_perplexity": matrix["none"]["rules"]["fedavg"]["final_perplexity"],
        "matrix": matrix, "goals": goals, "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg()[0]},
    }
    print(json.dumps(report), flush=True)
    return report


def privacy_of(clip_norm: float, noise_multiplier: float, rounds: int, num_clients: int = NUM_TRAINERS) -> dict | str:
    """The ε the project's accountant (server/privacy.py) gives the DP cell: every client every round."""
    try:
        from fl_crew_reddit.server.privacy import make_plan

        plan = make_plan(mode="central", clip_norm=clip_norm, noise_multiplier=noise_multiplier, target_epsilon=None,
                         delta=1e-5, num_clients=num_clients, clients_per_round=num_clients, rounds=rounds)
        return {"epsilon": plan.epsilon(rounds), "delta": 1e-5, "noise_multiplier": noise_multiplier,
                "clip_norm": clip_norm}
    except Exception as error:  # the accountant refuses (ε = ∞ at tiny noise): say so in the JSON
        return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    main()

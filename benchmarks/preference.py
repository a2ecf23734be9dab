"""Does federated preference learning (DPO) help? Base vs local-only vs centralized vs federated, on real Reddit.

Six subreddits of ../shared/data/reddit-2015 as six clients (one subreddit each), read through the dump backend and
the MCP server and preprocessed by the product (FederatedWorkspace.collect / preprocess), with relevance preference
pairs (PREF_PAIR_KINDS=relevance: a thread's real reply chosen over a reply to another thread of the same
subreddit; the dump's scores are placeholders, so it has no votes pairs). The embedded SmolLM2-135M, LoRA on all
linear layers. Training is the product's `LocalTrainer` and `aggregation.aggregate`, run here directly so that
rounds common to two methods are trained once:

- base: no adapter (its implicit reward is 0 for every reply: preference accuracy 0.5 by definition);
- federated SFT: TRAINING_OBJECTIVE=sft, FedAvg (the perplexity yardstick: "SFT alone");
- federated DPO: the preference objective (default sft_then_dpo: each client's SFT steps, then DPO steps on its
  pairs, the received global adapter as the reference), FedAvg;
- local-only: each client trains the same objective alone, for exactly its federated steps (its round-1 fit is
  the federated round-1 fit, which the trainer makes deterministic: it is reused);
- centralized: all clients' training rows and pairs pooled in one trainer, one pass a round, for as many rounds.

Every method is read after its last round on the TEST split: preference accuracy and reward margin over the union of
the clients' test pairs (`training.dpo` metrics: implicit reward β(log π − log π_base)), and reply perplexity over
the union of their test replies. Local-only models are read on their own client's test split and averaged. Prints
progress to stderr and one JSON object as the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fl_crew_reddit._quiet  # noqa: F401,E402

DUMP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "reddit-2015"
SUBREDDITS = ["books", "history", "programming", "gadgets", "Sports", "weather"]
STARTED = time.perf_counter()


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f}s] {message}", file=sys.stderr, flush=True)


def prepare(args, workdir: Path):
    """The product's data path: collect the six subreddits from the dump, preprocess into client splits and pairs."""
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = FLCrewRedditConfig(
        _env_file=None, reddit_backend="dump", reddit_dump_dir=args.dump_dir, subreddits=SUBREDDITS,
        num_trainers=len(SUBREDDITS), posts_per_subreddit=args.posts, max_examples_per_client=args.examples,
        local_epochs=args.epochs, eval_samples=0, seed=args.seed, fl_crew_reddit_dir=workdir,
        learning_rate=args.lr, test_fraction=args.test_fraction, max_seq_length=args.max_seq_length,
        training_objective=args.objective, dpo_beta=args.beta, dpo_sft_weight=args.sft_weight,
        min_preference_pairs=args.min_pairs,
        pref_pair_kinds=["relevance"], baselines=[])
    workspace = FederatedWorkspace(config, RunPaths(workdir.resolve(), "preference-bench").create())
    _ = workspace.model
    workspace.collect()
    workspace.preprocess()
    return workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, 8 examples and 1 epoch per client, 192-token rows")
    parser.add_argument("--dump-dir", type=Path, default=DUMP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--objective", choices=["dpo", "sft_then_dpo"], default="sft_then_dpo")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO_BETA")
    parser.add_argument("--sft-weight", type=float, default=None,
                        help="DPO_SFT_WEIGHT: α of the SFT term on the chosen reply during DPO (0: plain DPO; "
                             "default: the product's default)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dpo-reference", choices=["global", "after_sft"], default=None,
                        help="DPO_REFERENCE: the DPO reference log-probs from the received global adapter or from the "
                             "policy after the fit's SFT steps (default: the product's default)")
    parser.add_argument("--dpo-lr", type=float, default=None,
                        help="DPO_LEARNING_RATE: the DPO phase's learning rate (0: --lr; default: the product's)")
    parser.add_argument("--dpo-epochs", type=int, default=None,
                        help="DPO_EPOCHS: passes over the pairs per fit (0: the local epochs; default: the product's)")
    parser.add_argument("--loss-type", choices=["sigmoid", "ipo"], default=None,
                        help="DPO_LOSS_TYPE: DPO's sigmoid loss or IPO's squared one (default: the product's)")
    parser.add_argument("--arms", choices=["all", "sft_dpo", "dpo", "sft"], default="all",
                        help="for sweeps of the DPO settings: sft_dpo = only base, federated SFT and federated DPO "
                             "(the local-only and centralized arms and their goal are left out); dpo = base and "
                             "federated DPO (the SFT arm does not depend on the DPO settings: compare with the "
                             "--sft-perplexity an sft_dpo run of the same mode, seed and lr printed); sft = base "
                             "and federated SFT only (e.g. with --sft-epochs)")
    parser.add_argument("--sft-epochs", type=int, default=None,
                        help="local epochs of the federated SFT arm (default: the mode's, as federated DPO's SFT "
                             "phase); twice them gives SFT alone the step budget of sft_then_dpo")
    parser.add_argument("--sft-perplexity", type=float,
                        help="with --arms dpo: the federated SFT test perplexity to compare with")
    parser.add_argument("--min-pairs", type=int, default=4, help="MIN_PREFERENCE_PAIRS")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is several times faster while other work "
                             "shares the cores (OpenMP threads then wait on each other)")
    args = parser.parse_args()
    if args.arms == "dpo" and not args.sft_perplexity:
        parser.error("--arms dpo needs --sft-perplexity (the federated SFT perplexity of an sft_dpo run)")
    if args.threads:  # numba's parallel kernels (aggregation) share torch's OpenMP runtime: both get the count
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args.sft_weight is None:
        from fl_crew_reddit.config import FLCrewRedditConfig

        args.sft_weight = FLCrewRedditConfig.model_fields["dpo_sft_weight"].default
    from fl_crew_reddit.config import FLCrewRedditConfig

    for arg, field in (("dpo_reference", "dpo_reference"), ("dpo_lr", "dpo_learning_rate"),
                       ("dpo_epochs", "dpo_epochs"), ("loss_type", "dpo_loss_type")):
        if getattr(args, arg) is None:
            setattr(args, arg, FLCrewRedditConfig.model_fields[field].default)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.examples, args.epochs, args.posts, args.max_seq_length = (8, 1, 60, 192) if args.quick else (16, 2, 200, 256)
    args.sft_epochs = args.sft_epochs or args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(args, Path(tmp))
    print(json.dumps(summary))


def run(args, workdir: Path) -> dict:
    import torch

    from fl_crew_reddit.aggregation import aggregate
    from fl_crew_reddit.evaluation.evaluator import held_out_nll
    from fl_crew_reddit.server.evaluation import combine_preferences
    from fl_crew_reddit.training.dpo import implicit_reward_metrics, pair_logprobs
    from fl_crew_reddit.training.trainer import LocalTrainer, autocast_context

    say(f"collecting and preprocessing {len(SUBREDDITS)} subreddits ({args.posts} posts each)")
    workspace = prepare(args, workdir)
    model, tokenizer, device = workspace.model, workspace.tokenizer, workspace.device
    pad_id = tokenizer.pad_token_id
    clients = workspace.client_names
    data = {name: workspace._site_data(name) for name in clients}
    train = {name: data[name].rows("train") for name in clients}
    pairs = {name: data[name].pair_rows("train") for name in clients}
    test = {name: data[name].rows("test") for name in clients}
    test_pairs = {name: data[name].pair_rows("test") for name in clients}
    subreddit = {shard.name: next(iter(shard.subreddits)) for shard in workspace.data.clients}
    say("data: " + ", ".join(f"{subreddit[n]} {len(train[n])} train / {len(pairs[n])} pairs / {len(test[n])} test "
                             f"/ {len(test_pairs[n])} test pairs" for n in clients))
    initial = {k: v.clone() for k, v in workspace.global_adapter.items()}
    mixed = workspace.config.mixed_precision

    def set_adapter(state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)

    def logprobs(rows_by_client: dict, use_adapter: bool = True) -> dict:
        from contextlib import nullcontext

        model.eval()
        out = {}
        with autocast_context(device, mixed), (nullcontext() if use_adapter else model.disable_adapter()):
            for name, rows in rows_by_client.items():
                out[name] = pair_logprobs(model, rows, device, pad_id, batch_size=8)
        return out

    say("base log-probs of the test pairs (adapter disabled), once for every method")
    base_logps = logprobs(test_pairs, use_adapter=False)

    def score(state: dict, names: list[str]) -> dict:
        """Test preference metrics (per client and over the union of their pairs) and test perplexity."""
        set_adapter(state)
        policy = logprobs({n: test_pairs[n] for n in names})
        per_client = {n: implicit_reward_metrics(policy[n], base_logps[n], args.beta) for n in names}
        sums = [held_out_nll(model, test[n], pad_id, device, mixed_precision=mixed) for n in names]
        nll, count = sum(s[0] for s in sums), sum(s[1] for s in sums)
        union = combine_preferences(per_client)
        return {"preference_accuracy": union["preference_accuracy"], "reward_margin": union["reward_margin"],
                "pairs": union["pairs"], "perplexity": math.exp(nll / count),
                "per_client": {subreddit[n]: {"preference_accuracy": per_client[n]["preference_accuracy"],
                                              "perplexity": math.exp(s[0] / s[1])}
                               for n, s in zip(names, sums)}}

    def fit_config(round_number: int, objective: str) -> dict:
        config = dict(workspace.fit_config(round_number))
        if objective == "sft":
            config["local_epochs"] = args.sft_epochs
        config.update(objective=objective, dpo_beta=args.beta, dpo_sft_weight=args.sft_weight,
                      dpo_reference=args.dpo_reference, dpo_learning_rate=args.dpo_lr, dpo_epochs=args.dpo_epochs,
                      dpo_loss_type=args.loss_type, min_pairs=args.min_pairs)
        return config

    def trainer(name: str, rows: list, pair_rows: list) -> LocalTrainer:
        return LocalTrainer(name, model, tokenizer, rows, device, mixed_precision=mixed, show_progress=False,
                            pair_rows=pair_rows)

    def federated(objective: str, keep_round_one: bool = False) -> tuple[dict, dict, dict]:
        """FedAvg rounds; (global state, steps per client, round-1 states per client if asked)."""
        state, steps, first, skipped = initial, dict.fromkeys(clients, 0), {}, {}
        for round_number in range(1, args.rounds + 1):
            results = {}
            for name in clients:
                results[name] = trainer(name, train[name], pairs[name]).fit(state, fit_config(round_number, objective))
                steps[name] += results[name].metrics["steps"]
                if "dpo_skipped" in results[name].metrics:
                    skipped[f"{subreddit[name]} round {round_number}"] = results[name].metrics["dpo_skipped"]
                metrics = results[name].metrics
                say(f"{objective} round {round_number} {subreddit[name]}: {metrics['steps']} steps, "
                    f"train loss {metrics['train_loss']:.3f}"
                    + (f", dpo loss {metrics['dpo_loss']:.3f}, train pref acc "
                       f"{metrics['train_preference_accuracy']:.2f}, chosen nll {metrics['dpo_chosen_nll']:.3f}, "
                       f"first dpo loss {metrics['dpo_first_loss']:.3f}"
                       if "dpo_loss" in metrics else ""))
            if keep_round_one and round_number == 1:
                first = {name: results[name].state for name in clients}
            state = aggregate("fedavg", [results[n].state for n in clients], [results[n].num_examples for n in clients])
            if args.threads:  # numba's parallel kernels set the OpenMP thread count of the process back to theirs
                torch.set_num_threads(args.threads)
        return state, {"steps": steps, "dpo_skipped": skipped}, first

    seconds = {}
    started = time.perf_counter()
    base = score(initial, clients)
    seconds["base"] = time.perf_counter() - started
    say(f"base: perplexity {base['perplexity']:.2f}, preference accuracy {number(base['preference_accuracy'])}")

    if args.arms == "dpo":
        sft = {"perplexity": args.sft_perplexity, "given": "--sft-perplexity (not trained in this run)"}
    else:
        started = time.perf_counter()
        sft_state, sft_info, _ = federated("sft")
        sft = score(sft_state, clients) | sft_info
        seconds["federated_sft"] = time.perf_counter() - started
        say(f"federated SFT: perplexity {sft['perplexity']:.2f}, preference accuracy "
            f"{number(sft['preference_accuracy'])}")
    run_settings = {"mode": "quick" if args.quick else "full", "arms": args.arms, "seed": args.seed,
                    "rounds": args.rounds, "lr": args.lr, "examples_per_client": args.examples,
                    "sft_local_epochs": args.sft_epochs}
    if args.arms == "sft":
        return run_settings | {"base": base, "federated_sft": sft, "seconds": seconds,
                               "total_seconds": time.perf_counter() - STARTED}

    started = time.perf_counter()
    dpo_state, dpo_info, round_one = federated(args.objective, keep_round_one=True)
    fl = score(dpo_state, clients) | dpo_info
    seconds["federated_dpo"] = time.perf_counter() - started
    say(f"federated {args.objective}: perplexity {fl['perplexity']:.2f}, "
        f"preference accuracy {number(fl['preference_accuracy'])}")

    fl_client_accuracy = [v["preference_accuracy"] for v in fl["per_client"].values()
                          if v["preference_accuracy"] is not None]
    fl["preference_accuracy_client_mean"] = statistics.mean(fl_client_accuracy)
    goals = {"fl_accuracy_minus_base_points": 100 * (fl["preference_accuracy"] - base["preference_accuracy"]),
             "met": {"fl accuracy >= base + 10 points":
                     fl["preference_accuracy"] >= base["preference_accuracy"] + 0.10}}
    if sft["perplexity"]:
        goals["fl_ppl_vs_sft"] = fl["perplexity"] / sft["perplexity"]
        goals["met"]["fl perplexity <= 1.05 x federated SFT"] = fl["perplexity"] <= 1.05 * sft["perplexity"]
    summary = {**run_settings,
               "objective": args.objective, "beta": args.beta, "sft_weight": args.sft_weight,
               "dpo_reference": args.dpo_reference, "dpo_lr": args.dpo_lr, "dpo_epochs": args.dpo_epochs,
               "loss_type": args.loss_type, "local_epochs": args.epochs, "posts_per_subreddit": args.posts,
               "max_seq_length": args.max_seq_length, "pair_kinds": ["relevance"], "threads": args.threads or None,
               "data": {subreddit[n]: {"train": len(train[n]), "train_pairs": len(pairs[n]), "test": len(test[n]),
                                       "test_pairs": len(test_pairs[n])} for n in clients},
               "base": base, "federated_sft": sft, "federated_dpo": fl, "goals": goals, "seconds": seconds}
    if args.arms == "all":  # the local-only and centralized arms, same objective and settings as federated DPO
        started = time.perf_counter()
        local = {}
        for name in clients:  # round 1 is the federated round-1 fit of this client (same start, seed, round, data)
            state = round_one[name]
            for round_number in range(2, args.rounds + 1):
                state = trainer(name, train[name], pairs[name]).fit(state,
                                                                    fit_config(round_number, args.objective)).state
            local[name] = score(state, [name])
            say(f"local-only {subreddit[name]}: perplexity {local[name]['perplexity']:.2f}, preference accuracy "
                f"{number(local[name]['preference_accuracy'])} ({local[name]['pairs']} test pairs)")
        seconds["local_only"] = time.perf_counter() - started

        started = time.perf_counter()
        pooled = trainer("centralized", [r for n in clients for r in train[n]],
                         [p for n in clients for p in pairs[n]])
        state, central_steps = initial, 0
        for round_number in range(1, args.rounds + 1):
            result = pooled.fit(state, fit_config(round_number, args.objective))
            state, central_steps = result.state, central_steps + result.metrics["steps"]
        central = score(state, clients) | {"steps": central_steps}
        seconds["centralized"] = time.perf_counter() - started
        say(f"centralized: perplexity {central['perplexity']:.2f}, preference accuracy "
            f"{number(central['preference_accuracy'])}")

        local_accuracy = [local[n]["preference_accuracy"] for n in clients
                          if local[n]["preference_accuracy"] is not None]
        summary["local_only"] = {
            "preference_accuracy_mean": statistics.mean(local_accuracy),
            "perplexity_mean": statistics.mean(local[n]["perplexity"] for n in clients),
            "per_client": {subreddit[n]: {k: local[n][k] for k in ("preference_accuracy", "perplexity")}
                           for n in clients}}
        summary["centralized"] = central
        goals["fl_client_mean_minus_local_mean_points"] = 100 * (fl["preference_accuracy_client_mean"]
                                                                 - summary["local_only"]["preference_accuracy_mean"])
        goals["met"]["fl accuracy >= local-only mean (client means)"] = (
            fl["preference_accuracy_client_mean"] >= summary["local_only"]["preference_accuracy_mean"])
    return summary | {"total_seconds": time.perf_counter() - STARTED,
                      # other work on the machine slows the seconds, not the scores
                      "load_average_at_end": os.getloadavg()}


if __name__ == "__main__":
    main()

"""Does federated training help? Base vs local-only vs centralized vs federated on real Reddit threads.

Six subreddits of ../shared/data/reddit-2015 as six clients (one subreddit each), the embedded SmolLM2-135M,
LoRA on all linear layers. Local-only and centralized train on the same optimizer-step budget as the federated
run (see FederatedWorkspace.train_baseline). Every method is read at its own best round (for the baselines, the
best round-equivalent chunk of their steps) on the validation split, and reported with the TEST perplexity of that
checkpoint: held-out threads, overall (all clients' test splits) and on each client's own split. The test split
never chooses. Prints progress to stderr and one JSON object as the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_crew_reddit import FLCrewRedditManager  # noqa: E402
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402

DUMP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "reddit-2015"
SUBREDDITS = ["books", "history", "programming", "gadgets", "Sports", "weather"]


def one_run(seed: int, args, workdir: Path) -> dict:
    config = FLCrewRedditConfig(
        reddit_backend="dump", reddit_dump_dir=args.dump_dir, subreddits=SUBREDDITS, num_trainers=len(SUBREDDITS),
        posts_per_subreddit=args.posts, max_examples_per_client=args.examples, local_epochs=args.epochs,
        eval_samples=0, seed=seed, baselines=["local_only", "centralized"], fl_crew_reddit_dir=workdir,
        learning_rate=args.lr, aggregation_method=args.method, test_fraction=args.test_fraction,
        dp_mode=args.dp_mode, dp_target_epsilon=args.dp_epsilon if args.dp_mode != "off" else None,
        dp_clip_norm=args.dp_clip, dp_delta=args.dp_delta)
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=args.rounds)
    history = result.history
    if history["best_round"] is None:
        raise RuntimeError(f"run {result.run_id} recorded no best round: no validation perplexity was measured")
    best = next(r for r in history["rounds"] if r["round"] == history["best_round"])["global"]
    local, central = history["baselines"]["local_only"], history["baselines"]["centralized"]
    names = {c["name"]: next(iter(c["subreddits"])) for c in history["data"]["clients"]}
    per_client = {
        names[client]: {"base": history["base"]["per_client"][client], "fl": best["per_client"][client],
                        "local": local["per_client"][client]["own"], "central": central["per_client"][client]["own"]}
        for client in names}
    return {"seed": seed, "base_ppl": history["base"]["perplexity"], "fl_ppl": best["perplexity"],
            "fl_best_round": history["best_round"],
            "fl_ppl_per_round": [r["global"]["perplexity"] for r in history["rounds"]],
            "fl_validation_ppl_per_round": [r["global"]["validation_perplexity"] for r in history["rounds"]],
            "local_ppl_mean": local["perplexity"], "central_ppl": central["perplexity"],
            "dp": [r["privacy"] for r in history["rounds"]] if args.dp_mode != "off" else None,
            "central_best_round": central["best_round"],
            "local_best_rounds": {names[c]: v["best_round"] for c, v in local["per_client"].items()},
            "per_client": per_client, "seconds": result.seconds}


def goals(run: dict) -> dict:
    worst = max(v["fl"] / v["local"] for v in run["per_client"].values())
    return {"fl_vs_central": run["fl_ppl"] / run["central_ppl"],
            "fl_vs_local_mean": run["fl_ppl"] / run["local_ppl_mean"],
            "worst_client_fl_vs_local": worst,
            "met": {"fl <= 1.02 x central": run["fl_ppl"] <= 1.02 * run["central_ppl"],
                    "fl <= 0.97 x local mean": run["fl_ppl"] <= 0.97 * run["local_ppl_mean"],
                    "each client fl <= 1.02 x its local": worst <= 1.02}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 rounds, 12 examples and 1 epoch per client (under 10 minutes here)")
    parser.add_argument("--dump-dir", type=Path, default=DUMP)
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--test-fraction", type=float,
                        help="TEST_FRACTION (default 0.2: 12 held-out replies per client)")
    parser.add_argument("--dp-mode", choices=["off", "central", "local"], default="off",
                        help="client-level DP for the federated run (the baselines stay non-private)")
    parser.add_argument("--dp-epsilon", type=float, default=8.0, help="DP_TARGET_EPSILON over the rounds")
    parser.add_argument("--dp-clip", type=float, default=0.5, help="DP_CLIP_NORM")
    parser.add_argument("--dp-delta", type=float, default=1e-5, help="DP_DELTA")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.rounds = args.rounds or (2 if args.quick else 3)
    # full: three seeds, 3 rounds of 8 local steps (24 per client in all), sized so that all four
    # methods of all three seeds fit in about an hour on the project's 2-core CPU
    args.examples, args.epochs, args.posts = (12, 1, 60) if args.quick else (16, 2, 200)
    args.test_fraction = args.test_fraction or 0.2
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run = one_run(seed, args, Path(tmp))
        run["goals"] = goals(run)
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    keys = ("base_ppl", "local_ppl_mean", "central_ppl", "fl_ppl")
    summary = {key: statistics.mean(r[key] for r in runs) for key in keys}
    summary["per_client"] = {sub: {k: statistics.mean(r["per_client"][sub][k] for r in runs)
                                   for k in ("base", "local", "central", "fl")} for sub in runs[0]["per_client"]}
    summary.update(mode="quick" if args.quick else "full", seeds=args.seeds, rounds=args.rounds,
                   test_fraction=args.test_fraction,
                   examples_per_client=args.examples, local_epochs=args.epochs, lr=args.lr, method=args.method,
                   dp_mode=args.dp_mode, dp_epsilon=args.dp_epsilon if args.dp_mode != "off" else None,
                   dp_clip=args.dp_clip if args.dp_mode != "off" else None,
                   goals=goals(summary), runs=runs)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

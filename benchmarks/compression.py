"""Compressed updates: how many bytes does each client send per round, and what does it cost in held-out perplexity?

One federated run per UPDATE_COMPRESSION kind (none, fp16, int8, nf4, topk, sign), each through
`FLCrewRedditManager.run_federated_learning` (collect -> preprocess -> train -> compress on the client ->
decompress, screen and aggregate on the server -> evaluate) with the same SEED, data, clients and rounds, one after
the other in this process, on the embedded SmolLM2-135M with LoRA on all linear layers (the defaults).

Per kind:
  bytes_per_client_round   the file that travels in-process (update.safetensors, or the whole adapter for none):
                           the `update_bytes` of the history, averaged over clients and rounds
  flower_bytes_up          the same update packed as a Flower reply's arrays (`pack_adapter`, serialized as Flower
                           sends it; without the reply's few metrics)
  final_perplexity         held-out (test) reply perplexity of the global adapter after the last round
  bytes_ratio              none's bytes / this kind's bytes;  perplexity_cost  final / none's final − 1

Goal (issue 12): some kind sends >= 10x fewer bytes at <= 2% perplexity cost (NVFlare's 4-bit message quantization
sends 14% of the bytes).

    .venv/bin/python benchmarks/compression.py            # 3 clients, 3 rounds, 16 examples/client
    .venv/bin/python benchmarks/compression.py --quick    # 3 clients, 2 rounds, 8 examples/client
    .venv/bin/python benchmarks/compression.py --kinds none,topk --topk-fraction 0.02

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fl_crew_reddit._quiet  # noqa: E402,F401  (CrewAI / Flower / HF offline defaults, before they load)
from fl_crew_reddit.aggregation.compression import COMPRESSIONS, ERROR_FEEDBACK_KINDS  # noqa: E402
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402

NUM_TRAINERS = 3
SEED = 42
BYTES_GOAL = 10.0
PERPLEXITY_GOAL = 0.02


def say(message: str) -> None:
    print(f"[compression] {message}", file=sys.stderr, flush=True)


def flower_bytes(folder: Path) -> int:
    """Bytes of what a client in `folder` sent, packed as the arrays of a Flower reply and serialized."""
    from safetensors.torch import load_file

    from fl_crew_reddit.federation.flower import pack_adapter, serialized_bytes
    from fl_crew_reddit.training.adapter_files import update_file

    return serialized_bytes(pack_adapter(load_file(str(update_file(folder)))))


def run_one(kind: str, base: FLCrewRedditConfig, rounds: int) -> dict:
    from fl_crew_reddit import FLCrewRedditManager

    config = base.model_copy(update={"update_compression": kind})
    started = time.perf_counter()
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=rounds, run_id=f"compression-{kind}")
    history = result.history
    clients = [c for r in history["rounds"] for c in r["clients"]]
    sizes = [int(c["metrics"]["update_bytes"]) for c in clients]
    wire = [flower_bytes(Path(c["adapter_path"])) for c in clients]
    return {
        "base_perplexity": history["base"]["perplexity"],
        "perplexities": result.perplexities(),
        "final_perplexity": result.perplexities()[-1],
        "bytes_per_client_round": statistics.mean(sizes),
        "flower_bytes_up": statistics.mean(wire),
        "compression_ratio_of_tensors": (statistics.mean(c["metrics"]["compression_ratio"] for c in clients)
                                         if kind != "none" else 1.0),
        "error_feedback_norm_last": ([c["metrics"]["error_feedback_norm"] for c in history["rounds"][-1]["clients"]]
                                     if kind in ERROR_FEEDBACK_KINDS else None),
        "accepted": [r["aggregation"]["accepted"] for r in history["rounds"]],
        "rejected": [r["aggregation"]["rejected"] for r in history["rounds"]],
        "held_out_examples": sum(c["num_test"] for c in history["data"]["clients"]),
        "seconds": round(time.perf_counter() - started, 1),
    }


def judge(results: dict) -> dict:
    reference = results["none"]
    for run in results.values():
        run["bytes_ratio"] = reference["bytes_per_client_round"] / run["bytes_per_client_round"]
        run["flower_bytes_ratio"] = reference["flower_bytes_up"] / run["flower_bytes_up"]
        run["perplexity_cost"] = run["final_perplexity"] / reference["final_perplexity"] - 1
        run["meets_goal"] = run["bytes_ratio"] >= BYTES_GOAL and run["perplexity_cost"] <= PERPLEXITY_GOAL
    met = [name for name, run in results.items() if run["meets_goal"]]
    return {"kinds_meeting_goal": met, "goal_met": bool(met),
            "goal": f">= {BYTES_GOAL:g}x fewer bytes per client per round at <= {100 * PERPLEXITY_GOAL:g}% "
                    "perplexity cost"}


def quiet_logging() -> None:
    """stderr gets warnings and the flow's one-line progress records; the run's log file still gets everything."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name == "fl_crew_reddit.progress")
    logging.getLogger().addHandler(handler)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 8 examples per client")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 3; --quick: 2)")
    parser.add_argument("--examples", type=int, help="max examples per client (default 16; --quick: 8)")
    parser.add_argument("--kinds", default=",".join(COMPRESSIONS), help="comma-separated UPDATE_COMPRESSION kinds")
    parser.add_argument("--topk-fraction", type=float, default=0.05, help="TOPK_FRACTION (default 0.05)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--model", default=None, help="BASE_LLM_MODEL (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    rounds = args.rounds or (2 if args.quick else 3)
    examples = args.examples or (8 if args.quick else 16)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(COMPRESSIONS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(COMPRESSIONS)}")
    if "none" not in kinds:
        kinds.insert(0, "none")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_logging()

    results: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-compression-") as folder:
        settings = {"fl_crew_reddit_dir": Path(folder), "num_trainers": NUM_TRAINERS, "partition": "iid",
                    "reddit_backend": "snapshot", "max_examples_per_client": examples, "local_epochs": 1,
                    "eval_samples": 0, "learning_rate": args.learning_rate, "seed": SEED,
                    "test_fraction": args.test_fraction, "topk_fraction": args.topk_fraction}
        if args.model:
            settings["base_llm_model"] = args.model
        base = FLCrewRedditConfig(_env_file=None, **settings)
        say(f"model {base.base_llm_model}, LoRA r={base.lora_r} on {','.join(base.lora_target_modules)}, "
            f"{NUM_TRAINERS} clients, {rounds} round(s), {examples} examples/client, kinds {kinds}, "
            f"TOPK_FRACTION={args.topk_fraction:g}")
        for kind in kinds:
            say(f"run {kind} ...")
            run = results[kind] = run_one(kind, base, rounds)
            say(f"run {kind}: {run['bytes_per_client_round']:.0f} bytes per client per round (Flower reply "
                f"{run['flower_bytes_up']:.0f}), perplexity per round {[round(p, 3) for p in run['perplexities']]} "
                f"(base {run['base_perplexity']:.3f}), {run['seconds']:.0f}s")
    goals = judge(results)
    for name, run in results.items():
        say(f"{name:>5}: {run['bytes_per_client_round'] / 1e6:.3f} MB/client/round ({run['bytes_ratio']:.1f}x fewer), "
            f"final perplexity {run['final_perplexity']:.3f} ({100 * run['perplexity_cost']:+.2f}%)")
    say(f"goals: {goals}")
    report = {
        "benchmark": "compression", "quick": args.quick, "model": base.base_llm_model, "lora_r": base.lora_r,
        "lora_target_modules": base.lora_target_modules, "rounds": rounds, "num_trainers": NUM_TRAINERS,
        "partition": "iid", "reddit_backend": "snapshot", "max_examples_per_client": examples, "local_epochs": 1,
        "learning_rate": args.learning_rate, "seed": SEED, "test_fraction": args.test_fraction,
        "topk_fraction": args.topk_fraction, "held_out_examples": results["none"]["held_out_examples"],
        "runs": results, "goals": goals, "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg()[0]},
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()

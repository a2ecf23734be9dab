"""Clients of different capacity on the real loop: LoRA ranks 4 / 8 / 16 in one federation (CLIENT_LORA_RANKS).

Three runs through `FLCrewRedditManager.run_federated_learning`, same SEED, data and hyper-parameters, all with
AGGREGATION_METHOD=svd_exact:

    all16    LORA_R=16, every client at rank 16
    mixed    LORA_R=16, CLIENT_LORA_RANKS=4,8,16: client-0 trains rank 4, client-1 rank 8, client-2 rank 16; the
             server averages the products s(r)·B·A and re-factors at rank 16, each client gets the global adapter
             truncated to its rank (aggregation/mixed_rank.py)
    all4     LORA_R=4, every client at rank 4 (a federation sized to its smallest client)

For every round: the global held-out perplexity, the bytes each client sent, and the share of the averaged
products' energy the rank-16 SVD discarded (history `aggregation.discarded_energy`; 0: exact).

    .venv/bin/python benchmarks/mixed_ranks.py            # embedded SmolLM2-135M, 3 clients, 3 rounds
    .venv/bin/python benchmarks/mixed_ranks.py --quick    # 2 rounds, 8 examples per client, 1 epoch

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fl_crew_reddit._quiet  # noqa: E402,F401  (CrewAI / Flower / HF offline defaults, before they load)
from fl_crew_reddit import FLCrewRedditManager  # noqa: E402
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402

VARIANTS = {"all16": {"lora_r": 16},
            "mixed": {"lora_r": 16, "client_lora_ranks": {"client-0": 4, "client-1": 8, "client-2": 16}},
            "all4": {"lora_r": 4}}


def say(message: str) -> None:
    print(f"[mixed_ranks] {message}", file=sys.stderr, flush=True)


def run_variant(name: str, base: FLCrewRedditConfig, rounds: int) -> dict:
    config = base.model_copy(update=VARIANTS[name])
    began = time.perf_counter()
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=rounds, run_id=f"ranks-{name}")
    records = result.history["rounds"]
    return {
        "settings": VARIANTS[name],
        "base_perplexity": result.history["base"]["perplexity"],
        "perplexities": result.perplexities(),
        "final_perplexity": result.perplexities()[-1],
        "bytes_sent": {c["name"]: c["metrics"]["update_bytes"] for c in records[-1]["clients"]},
        "discarded_energy": [r["aggregation"].get("discarded_energy") for r in records],
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 8 examples per client, 1 local epoch")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model", default="", help="BASE_LLM_MODEL (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rounds = args.rounds or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"base_llm_model": args.model} if args.model else {}
        base = FLCrewRedditConfig(
            _env_file=None, fl_crew_reddit_dir=Path(tmp), num_trainers=3, seed=0, eval_samples=0,
            learning_rate=5e-4, aggregation_method="svd_exact", max_examples_per_client=8 if args.quick else 24,
            local_epochs=1 if args.quick else 2, tensorboard=False, **overrides)
        results = {}
        for name in args.variants.split(","):
            say(f"{name} ...")
            results[name] = run_variant(name, base, rounds)
            say(f"{name}: {json.dumps(results[name])}")
    reference = results.get("all16")
    summary = {"mode": "quick" if args.quick else "full", "rounds": rounds, "runs": results}
    if reference:
        summary["final_perplexity_vs_all16"] = {name: round(r["final_perplexity"] / reference["final_perplexity"], 4)
                                                for name, r in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

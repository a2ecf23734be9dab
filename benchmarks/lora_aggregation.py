"""Exact LoRA aggregation on the real loop: plain factor averaging vs svd_exact vs FFA-LoRA, same run settings.

Three runs through `FLCrewRedditManager.run_federated_learning`, same SEED, data and hyper-parameters:

    plain       AGGREGATION_METHOD=fedavg: avg(B), avg(A) separately (what FlowerTune / OpenFedLLM do)
    svd_exact   AGGREGATION_METHOD=svd_exact: avg(B·A) re-factored to rank r by a truncated SVD
    ffa         FFA_LORA=true, fedavg: A frozen at its shared initialisation, only B trained and sent

For every round it records the global held-out perplexity, the seconds the aggregation step took (reading the
updates, screening them, combining, writing the global adapter), the bytes each client sent, and the relative
error of the new global adapter's products against the exact average of the clients' products,
||avg_k(B_k·A_k) − B'·A'||_F / ||avg_k(B_k·A_k)||_F (0 means the aggregate is the exact mean update).

    .venv/bin/python benchmarks/lora_aggregation.py            # embedded SmolLM2-135M, 3 clients, 3 rounds
    .venv/bin/python benchmarks/lora_aggregation.py --quick    # 2 rounds, 8 examples per client, 1 epoch

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

from safetensors.torch import load_file  # noqa: E402

import fl_crew_reddit._quiet  # noqa: E402,F401  (CrewAI / Flower / HF offline defaults, before they load)
from fl_crew_reddit import FLCrewRedditManager  # noqa: E402
from fl_crew_reddit import workspace as workspace_module  # noqa: E402
from fl_crew_reddit.aggregation import lora_product_error  # noqa: E402
from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402

VARIANTS = {"plain": {"aggregation_method": "fedavg"},
            "svd_exact": {"aggregation_method": "svd_exact"},
            "ffa": {"aggregation_method": "fedavg", "ffa_lora": True}}


def say(message: str) -> None:
    print(f"[lora_aggregation] {message}", file=sys.stderr, flush=True)


def round_product_error(record: dict) -> float:
    """Each client folder holds its whole adapter (under FFA-LoRA: the global A with its own B), so the exact
    mean of the clients' products can be formed the same way for every variant."""
    accepted = set(record["aggregation"]["accepted"])
    clients = [c for c in record["clients"] if c["name"] in accepted]
    states = [load_file(str(Path(c["adapter_path"]) / "adapter_model.safetensors")) for c in clients]
    new_global = load_file(str(Path(record["aggregation"]["adapter_path"]) / "adapter_model.safetensors"))
    return lora_product_error(states, [c["num_examples"] for c in clients], new_global)


def run_variant(name: str, base: FLCrewRedditConfig, rounds: int) -> dict:
    config = base.model_copy(update=VARIANTS[name])
    aggregation_seconds: list[float] = []
    original = workspace_module.FederatedWorkspace.aggregate

    def timed_aggregate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            aggregation_seconds.append(time.perf_counter() - started)

    workspace_module.FederatedWorkspace.aggregate = timed_aggregate
    try:
        began = time.perf_counter()
        result = FLCrewRedditManager(config).run_federated_learning(num_rounds=rounds, run_id=f"lora-{name}")
    finally:
        workspace_module.FederatedWorkspace.aggregate = original
    records = result.history["rounds"]
    errors = [round_product_error(r) for r in records]
    return {
        "settings": VARIANTS[name],
        "base_perplexity": result.history["base"]["perplexity"],
        "perplexities": result.perplexities(),
        "final_perplexity": result.perplexities()[-1],
        "aggregation_seconds": [round(s, 3) for s in aggregation_seconds],
        "bytes_sent_per_client": sorted({c["metrics"]["update_bytes"] for r in records for c in r["clients"]}),
        "product_rel_error": errors,
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
            fl_crew_reddit_dir=Path(tmp), num_trainers=3, seed=0, eval_samples=0, learning_rate=5e-4,
            max_examples_per_client=8 if args.quick else 24, local_epochs=1 if args.quick else 2,
            tensorboard=False, **overrides)
        results = {}
        for name in args.variants.split(","):
            say(f"{name} ...")
            results[name] = run_variant(name, base, rounds)
            say(f"{name}: {json.dumps(results[name])}")
    plain = results.get("plain")
    summary = {"mode": "quick" if args.quick else "full", "rounds": rounds, "runs": results}
    if plain:
        summary["final_perplexity_vs_plain"] = {name: round(r["final_perplexity"] / plain["final_perplexity"], 4)
                                                for name, r in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""What running on Flower's Deployment Engine costs: seconds per round and bytes per round, in-process against
local-flower (a real SuperLink and one SuperNode per client on 127.0.0.1, TLS + node authentication), with the
same settings and SEED, one run after the other in this process.

Both runs go through `FLCrewRedditManager.run_federated_learning` (collect -> preprocess -> rounds -> report) on the
embedded model and snapshot data. Reported per engine: the seconds of each round (`history.rounds[k].seconds`: train
+ aggregate + evaluate; for Flower also the ServerApp's start and the messages), the one-off start of the
federation (SuperLink, SuperNodes, site workers: the first round's extra time), and the serialized bytes sent down
and up per round (the train messages and their replies, as Flower serializes them). The in-process engine sends
nothing; its bytes are the adapter files the trainers write. Goal (issue 11): Flower's round time <= 1.10x the
in-process one at the embedded defaults.

    .venv/bin/python benchmarks/federation_overhead.py            # embedded defaults (3 clients, 3 epochs), 2 rounds
    .venv/bin/python benchmarks/federation_overhead.py --quick    # 1 epoch, 8 examples per client, 2 rounds

Progress goes to stderr; the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(engine: str, root: Path, rounds: int, overrides: dict) -> dict:
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.config import FLCrewRedditConfig

    config = FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=root / engine, federation=engine, seed=42,
                                baselines=[], **overrides)
    started = time.perf_counter()
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=rounds, run_id=engine)
    seconds = time.perf_counter() - started
    history = result.history
    per_round = []
    for record in history.rounds:
        down = sum(int(c.metrics.get("bytes_down", 0)) for c in record.clients)
        up = sum(int(c.metrics.get("bytes_up", 0)) for c in record.clients)
        files = sum(int(c.metrics.get("update_bytes", 0)) for c in record.clients)
        per_round.append({"round": record.round, "seconds": round(record.seconds, 2), "bytes_down": down,
                          "bytes_up": up, "update_file_bytes": files, "clients": len(record.clients),
                          "perplexity": record.global_.perplexity if record.global_ else None})
    return {"engine": engine, "total_seconds": round(seconds, 1), "rounds": per_round,
            "base_perplexity": history.base.perplexity if history.base else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 local epoch, 8 examples per client")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    overrides = {"eval_samples": 0}
    if args.quick:
        overrides.update(local_epochs=1, max_examples_per_client=8)
    with tempfile.TemporaryDirectory(prefix="fl-overhead-") as folder:
        root = Path(folder)
        os.chdir(root)
        results = {}
        for engine in ("inprocess", "local-flower"):
            print(f"[federation_overhead] {engine}: {args.rounds} rounds ...", file=sys.stderr, flush=True)
            results[engine] = run(engine, root, args.rounds, overrides)
            print(f"[federation_overhead] {engine}: {results[engine]}", file=sys.stderr, flush=True)
    inprocess, flower = results["inprocess"]["rounds"], results["local-flower"]["rounds"]
    later = [f["seconds"] / i["seconds"] for i, f in zip(inprocess[1:], flower[1:], strict=True) if i["seconds"]]
    summary = {
        "benchmark": "federation_overhead", "quick": args.quick, "rounds": args.rounds, "settings": overrides,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "inprocess": results["inprocess"], "local_flower": results["local-flower"],
        "round_time_ratio_first": round(flower[0]["seconds"] / inprocess[0]["seconds"], 3),
        "round_time_ratio_later": round(sum(later) / len(later), 3) if later else None,
        "same_perplexity": all(abs(i["perplexity"] - f["perplexity"]) <= 1e-6 * i["perplexity"]
                               for i, f in zip(inprocess, flower, strict=True)),
        "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in flower) // max(1, len(flower)),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

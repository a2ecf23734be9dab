"""Scale on one machine: the in-process federation with 100 / 1,000 / 10,000 clients, FRACTION_FIT=0.01.

Client data stays on disk (one folder of train / validation / test jsonl per client, the preprocessor's layout); the
workspace tokenizes a client's training rows only when the client is sampled, and the held-out evaluation streams
over the clients' files. This measures what that costs: peak resident memory and seconds per round, each client
count in a fresh process.

Data: real chat examples built with `build_examples` from 2015 Reddit threads (../shared/data/reddit-2015, read
through `DumpBackend`; 300 posts per subreddit, the language check off for speed). Every client gets the same
amount of data, 12 consecutive examples of that pool in thread order, dealt cyclically from offset 12 x client
index: 2 test, 2 validation, 8 train. So the total data grows with the number of clients (at 10,000 clients each
real example is used by ~15 clients): only the per-client cost is synthetic, the text is real.

Model: a tiny random Llama (hidden 64, 2 layers, a 1k BPE vocabulary trained on the pool), the same shape as the
tests' model, so the figures are the federation's own overhead, not a language model's compute (--model PATH uses
a real local model instead). Each round: 1 % of the clients sampled (MIN_FIT_CLIENTS=2: 2 of 100), each trains
MAX_LOCAL_STEPS optimizer steps; aggregation (weighted average); evaluation = perplexity on every client's test and
validation split (the union, as in every run) plus EVAL_SAMPLES generated replies; the round's state and
history.json saved. That is the Flow's round, without the agents. The held-out evaluation reads every client's
held-out files, so its time grows with the data (here with the clients); memory does not.

    .venv/bin/python benchmarks/scale.py            # 100, 1,000 and 10,000 clients, 2 rounds each
    .venv/bin/python benchmarks/scale.py --quick    # 100 and 1,000 clients
    .venv/bin/python benchmarks/scale.py --clients 50 200 --rounds 1

Progress goes to stderr; the last stdout line is one JSON object with every figure: per client count, peak RSS
(ru_maxrss of that process), RSS once the model is loaded and the clients indexed, seconds per round (mean over the
rounds; split into training and evaluation; CPU seconds of the process, less sensitive to other load on the machine),
the base-model evaluation, how many clients' training files were read (the sampled ones only) and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA_ROOT = REPO.parent / "shared" / "data" / "reddit-2015"
SUBREDDITS = ["books", "history", "programming", "gadgets", "Sports", "weather"]
POSTS_PER_SUBREDDIT = 300
MAX_SEQ_LENGTH = 128
PER_CLIENT = {"test": 2, "validation": 2, "train": 8}
FRACTION_FIT = 0.01


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- parent: model, example pool, client shards ------------------------------------------------------------------
def prepare(work: Path, model: str | None) -> tuple[Path, Path]:
    """(model folder, example pool file), made once per work folder."""
    from transformers import AutoTokenizer

    from fl_crew_reddit.preprocessing.pipeline import QualityRules, build_examples, write_jsonl

    model_dir = Path(model) if model else work / "tiny-model"
    pool = work / "pool.jsonl"
    if pool.is_file() and (model_dir / "config.json").is_file():
        return model_dir, pool
    started = time.perf_counter()
    from fl_crew_reddit.reddit.backends import DumpBackend
    from fl_crew_reddit.training.tiny_model import build_tiny_llama

    collected = DumpBackend(DATA_ROOT).threads(SUBREDDITS, POSTS_PER_SUBREDDIT)
    if not model:
        texts = [p["title"] + "\n" + (p.get("selftext") or "") for b in collected for p in b["posts"]]
        build_tiny_llama(model_dir, texts + [c["body"] for b in collected for c in b["comments"]])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = build_examples(collected, tokenizer, MAX_SEQ_LENGTH, QualityRules(languages=frozenset())).examples
    examples.sort(key=lambda e: (e["post_id"], e["id"]))  # thread order: neighbours share a thread
    for example in examples:
        example["image_paths"] = []
    write_jsonl(pool, examples)
    say(f"example pool: {len(examples)} examples from {sum(len(b['comments']) for b in collected)} comments "
        f"in {time.perf_counter() - started:.0f}s")
    return model_dir, pool


def write_shards(folder: Path, num_clients: int, pool: list[dict]) -> Path:
    """Client shards in the preprocessor's layout (<client>/{train,validation,test}.jsonl) and the PreprocessReport
    a run would hold for them; returns the report's file."""
    from collections import Counter

    from fl_crew_reddit.preprocessing.pipeline import ClientShard, PreprocessReport, write_jsonl

    report_file = folder / "report.json"
    if report_file.is_file():
        return report_file
    per_client = sum(PER_CLIENT.values())
    shards = []
    for index in range(num_clients):
        start = index * per_client
        mine = [pool[(start + k) % len(pool)] for k in range(per_client)]
        splits, offset = {}, 0
        for split, count in PER_CLIENT.items():
            splits[split], offset = mine[offset:offset + count], offset + count
        client_dir = folder / f"client-{index}"
        for split, rows in splits.items():
            write_jsonl(client_dir / f"{split}.jsonl", rows)
        shards.append(ClientShard(
            name=f"client-{index}", subreddits=dict(Counter(e["subreddit"] for e in mine).most_common()),
            num_train=len(splits["train"]), num_test=len(splits["test"]),
            num_validation=len(splits["validation"]), train_path=str(client_dir / "train.jsonl"),
            test_path=str(client_dir / "test.jsonl"), validation_path=str(client_dir / "validation.jsonl"),
            train_tokens=sum(e["num_tokens"] for e in splits["train"]), num_examples=per_client,
            num_tokens=sum(e["num_tokens"] for e in mine)))
    report = PreprocessReport(num_comments=0, num_examples=per_client * num_clients, dropped={}, partition="scale",
                              clients=shards, examples_path="", max_train_examples=PER_CLIENT["train"])
    report_file.write_text(report.model_dump_json(), encoding="utf-8")
    return report_file


# --- child: one client count ------------------------------------------------------------------------------------
def run_child(args) -> dict:
    import torch

    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.preprocessing.pipeline import PreprocessReport
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.site import data as site_data
    from fl_crew_reddit.workspace import FederatedWorkspace

    torch.set_num_threads(args.threads)
    train_reads: set[str] = set()
    read_jsonl = site_data.read_jsonl

    def counting_read(path):
        if Path(path).name == "train.jsonl":
            train_reads.add(str(path))
        return read_jsonl(path)

    site_data.read_jsonl = counting_read
    root = Path(args.work) / f"run-{args.child}"
    config = FLCrewRedditConfig(
        _env_file=None, base_llm_model=args.model, fl_crew_reddit_dir=root, device="cpu", mixed_precision="no",
        num_clients=args.child, num_trainers=1, fraction_fit=FRACTION_FIT, min_fit_clients=2, local_epochs=1,
        max_local_steps=args.steps, batch_size=4, lora_r=4, lora_alpha=8, max_seq_length=MAX_SEQ_LENGTH,
        eval_samples=2, support_multimodal=False, tensorboard=False, seed=7, aggregation_method="weighted_average")
    report = PreprocessReport.model_validate_json(Path(args.report).read_text(encoding="utf-8"))
    workspace = FederatedWorkspace(config, RunPaths(root.resolve(), "scale").create())
    _ = workspace.model
    started = time.perf_counter()
    workspace.use_data(report)
    index_s = time.perf_counter() - started
    del report
    setup_rss = rss_mb()
    started = time.perf_counter()
    base = workspace.evaluate_base()
    base_s = time.perf_counter() - started
    rounds = []
    for round_number in range(1, args.rounds + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        workspace.start_round(round_number)
        selected = workspace.select_clients(round_number)
        workspace.dispatch_training(round_number, selected)
        for client in selected:
            workspace.train_client(client, round_number)
        workspace.aggregate(round_number)
        trained = time.perf_counter()
        metrics = workspace.evaluate_round(round_number)
        evaluated = time.perf_counter()
        workspace.save_state(round_number, args.rounds)
        workspace.save_history()
        done = time.perf_counter()
        rounds.append({"seconds": done - started, "cpu_s": time.process_time() - cpu_started,
                       "train_s": trained - started, "evaluate_s": evaluated - trained,
                       "save_s": done - evaluated, "sampled": len(selected), "perplexity": metrics.perplexity,
                       "held_out_tokens": metrics.num_tokens})
        rounds[-1] = {k: round(v, 2) if isinstance(v, float) else v for k, v in rounds[-1].items()}
        say(f"{args.child} clients, round {round_number}: {len(selected)} sampled, {done - started:.1f}s "
            f"(train {trained - started:.1f}s, evaluate {evaluated - trained:.1f}s), perplexity "
            f"{metrics.perplexity:.1f}, RSS {rss_mb():.0f} MiB")
    workspace.close()
    mean = lambda key: sum(r[key] for r in rounds) / len(rounds)  # noqa: E731
    return {"clients": args.child, "sampled_per_round": rounds[0]["sampled"],
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_index_mb": round(setup_rss, 1),
            "seconds_per_round": round(mean("seconds"), 2), "cpu_s_per_round": round(mean("cpu_s"), 2),
            "train_s_per_round": round(mean("train_s"), 2),
            "evaluate_s_per_round": round(mean("evaluate_s"), 2), "save_s_per_round": round(mean("save_s"), 2),
            "index_clients_s": round(index_s, 2), "base_evaluation_s": round(base_s, 2),
            "held_out_tokens": base.num_tokens, "train_files_read": len(train_reads),
            "clients_sampled_total": sum(r["sampled"] for r in rounds), "rounds": len(rounds),
            "load_average_1min": round(os.getloadavg()[0], 2), "per_round": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 clients only")
    parser.add_argument("--clients", type=int, nargs="+", help="client counts (default 100 1000 10000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="MAX_LOCAL_STEPS per sampled client")
    parser.add_argument("--model", help="a local model folder instead of the tiny random Llama")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 for the tiny model, whose ops are too "
                                                    "small to share out; every core with --model)")
    parser.add_argument("--work-dir", help="keep the model, pool and shards here (default: a temporary folder)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    threads = args.threads or (1 if not args.model else os.cpu_count() or 1)
    sizes = args.clients or ([100, 1000] if args.quick else [100, 1000, 10000])
    with tempfile.TemporaryDirectory(prefix="scale-") as temporary:
        work = Path(args.work_dir or temporary).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir, pool_file = prepare(work, args.model)
        from fl_crew_reddit.preprocessing.pipeline import read_jsonl

        pool = read_jsonl(pool_file)
        results = []
        for size in sizes:
            started = time.perf_counter()
            report = write_shards(work / f"clients-{size}", size, pool)
            say(f"{size} client shards on disk in {time.perf_counter() - started:.1f}s")
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(size), "--report", str(report), "--work", str(work),
                 "--model", str(model_dir), "--rounds", str(args.rounds), "--steps", str(args.steps),
                 "--threads", str(threads)],
                stdout=subprocess.PIPE, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["process_s"] = round(time.perf_counter() - started, 1)
            results.append(result)
            say(f"{size} clients: peak RSS {result['peak_rss_mb']:.0f} MiB, {result['seconds_per_round']:.1f}s "
                "per round")
    print(json.dumps({"benchmark": "scale", "fraction_fit": FRACTION_FIT, "per_client_examples": PER_CLIENT,
                      "model": "tiny random Llama (hidden 64, 2 layers)" if not args.model else args.model,
                      "max_local_steps": args.steps, "torch_threads": threads,
                      "cpus": os.cpu_count(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

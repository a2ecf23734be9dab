"""Training throughput: our LocalTrainer against a plain Hugging Face `Trainer` + PEFT with padded batches.

Both runs use the same process, the same base model (the embedded SmolLM2-135M-Instruct unless --model says
otherwise), the same LoRA config (r=8, alpha 16, dropout 0.05, all-linear, same initial adapter), the same data
(chat examples built with `build_examples` from real 2015 Reddit threads read through `DumpBackend`), batch size 4,
peak lr 2e-4 with warmup + cosine, AdamW, gradient clipping at 1.0, bf16 autocast where the CPU has native bf16,
and the same number of optimizer steps. They run one after the other, ours first.

Throughput = non-pad tokens (attention-mask ones) per second over the timed steps: from the end of warm-up step 2
to the end of the last step, identically for both. `real_token_fraction` = non-pad tokens / positions computed.
`final_loss` = mean per-step training loss over the last quarter of the steps (both: mean NLL of reply tokens);
`held_out_loss` = the same NLL of the trained model on 32 held-out examples, the same ones for both.

    .venv/bin/python benchmarks/train_throughput.py            # 60 steps each
    .venv/bin/python benchmarks/train_throughput.py --quick    # 24 steps each
    .venv/bin/python benchmarks/train_throughput.py --steps 30
    .venv/bin/python benchmarks/train_throughput.py --steps 16 --ablation   # + ours without each technique

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_baseline import padded_reply_data  # noqa: E402  (beside this script)

from fl_crew_reddit.config import EMBEDDED_MODEL, FLCrewRedditConfig  # noqa: E402
from fl_crew_reddit.preprocessing.pipeline import build_examples  # noqa: E402
from fl_crew_reddit.reddit.backends import DumpBackend  # noqa: E402
from fl_crew_reddit.training import batching as batching_module  # noqa: E402
from fl_crew_reddit.training import trainer as trainer_module  # noqa: E402
from fl_crew_reddit.training.batching import collate, reply_token_nll, tokenize_all  # noqa: E402
from fl_crew_reddit.training.model_loading import load_base_model  # noqa: E402
from fl_crew_reddit.training.peft_setup import build_peft_model  # noqa: E402
from fl_crew_reddit.training.trainer import LocalTrainer, bf16_autocast_supported, snapshot_adapter  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "reddit-2015"
WARMUP_STEPS = 2
PROBE_ROWS = 32
BATCH_SIZE = 4
LEARNING_RATE = 2e-4
CPU = torch.device("cpu")


def say(message: str) -> None:
    print(f"[train_throughput] {message}", file=sys.stderr, flush=True)


def load_rows(root: Path, subreddits: list[str], posts_per_subreddit: int, tokenizer, max_seq_length: int):
    """Reddit threads → chat examples (build_examples) → token rows (input_ids + reply_mask)."""
    collected = DumpBackend(root).threads(subreddits, posts_per_subreddit)
    examples = build_examples(collected, tokenizer, max_seq_length).examples
    return tokenize_all(tokenizer, examples, max_seq_length)


def fresh_model(config: FLCrewRedditConfig, initial_adapter=None):
    """Base model + LoRA, with the given initial adapter so both runs start from the very same weights."""
    from peft import set_peft_model_state_dict

    base, tokenizer = load_base_model(config, CPU)
    torch.manual_seed(0)
    model = build_peft_model(base, config)
    if initial_adapter is not None:
        set_peft_model_state_dict(model, initial_adapter)
    return model, tokenizer


@torch.no_grad()
def probe_loss(model, tokenizer, probe_rows: list[dict], bf16: bool) -> float:
    """Mean reply-token NLL of the trained model on held-out rows (dropout off): the same yardstick for both."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(probe_rows), 8):
        batch = collate(probe_rows[start:start + 8], tokenizer.pad_token_id, CPU)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            nll, n = reply_token_nll(model, batch)
        total, count = total + float(nll), count + n
    model.train()
    return round(total / count, 4)


def progress(name: str, records: list[dict], steps: int, start_time: float) -> None:
    step = records[-1]
    previous = records[-2]["time"] if len(records) > 1 else start_time
    say(f"{name} step {len(records)}/{steps}: loss {step['loss']:.3f}, {step['tokens']} tokens "
        f"({step['positions']} positions) in {step['time'] - previous:.2f} s; load {os.getloadavg()[0]:.2f}")


def summarise(steps: list[dict], start_time: float) -> dict:
    """Figures over the timed window: end of step WARMUP_STEPS → end of the last step."""
    timed = steps[WARMUP_STEPS:] if len(steps) > WARMUP_STEPS else steps
    t0 = steps[WARMUP_STEPS - 1]["time"] if len(steps) > WARMUP_STEPS else start_time
    seconds = timed[-1]["time"] - t0
    tokens = sum(s["tokens"] for s in timed)
    positions = sum(s["positions"] for s in timed)
    tail = [s["loss"] for s in steps[-max(1, len(steps) // 4):]]
    return {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2), "timed_steps": len(timed),
            "tokens": tokens, "final_loss": round(sum(tail) / len(tail), 4),
            "first_loss": round(steps[0]["loss"], 4), "real_token_fraction": round(tokens / positions, 3),
            "total_seconds": round(steps[-1]["time"] - start_time, 2)}


def run_ours(model, tokenizer, rows, steps: int, mixed_precision: str, initial_adapter) -> dict:
    records: list[dict] = []

    def on_step(info: dict) -> None:
        records.append(info)
        progress("ours", records, steps, started)

    trainer = LocalTrainer("bench", model, tokenizer, rows, CPU, mixed_precision=mixed_precision,
                           show_progress=False, on_step=on_step)
    config = {"local_epochs": -(-steps * BATCH_SIZE // len(rows)) + 1, "batch_size": BATCH_SIZE,
              "learning_rate": LEARNING_RATE, "max_steps": steps, "seed": 0, "round": 1, "proximal_mu": 0.0}
    started = time.perf_counter()
    trainer.fit(initial_adapter, config)
    return summarise(records, started)


def run_hf_trainer(model, tokenizer, rows, steps: int, bf16: bool, out_dir: Path) -> dict:
    """The plain recipe: padded batches (longest in batch), random sampler, labels −100 on prompt and padding."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    dataset, collate, batch_sizes = padded_reply_data(rows, tokenizer)
    records: list[dict] = []
    started = [0.0]

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            tokens, positions = batch_sizes[len(records)]
            records.append({"step": state.global_step, "tokens": tokens, "positions": positions,
                            "time": time.perf_counter(), "loss": float("nan")})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and records:
                records[-1]["loss"] = float(logs["loss"])
                progress("hf_trainer", records, steps, started[0])

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH_SIZE, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0.1,  # v5: a float < 1 is a ratio
        weight_decay=0.0, max_grad_norm=1.0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        bf16=bf16, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                      callbacks=[StepTimer()])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines; stdout keeps the JSON only
        trainer.train()
    return summarise(records, started[0])


def full_vocabulary_nll(model, batch):
    """Ablation: the plain causal-LM loss (logits and loss at every position), as a sum and count."""
    labels = batch["input_ids"].masked_fill(~batch["reply_mask"], -100)
    mask = None if batching_module.is_right_padded(batch["attention_mask"]) else batch["attention_mask"]
    loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=labels).loss
    count = int(batch["reply_mask"][:, 1:].sum())
    return loss * count, count


def random_batches(rows, batch_size, rng):
    """Ablation: shuffled batches without grouping by length (what a random sampler gives)."""
    order = rows[:]
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def fast_path_without(*parts: str):
    return lambda model, device, bf16: ORIGINAL_FAST_PATH(model, device, bf16, **{part: False for part in parts})


ABLATIONS = {
    # name: (module, attribute to replace, replacement); each run leaves one technique out of ours
    "without_geometric_dropout": ("trainer", "cpu_training_fast_path", fast_path_without("geometric_dropout")),
    "without_bf16_frozen_weights": ("trainer", "cpu_training_fast_path", fast_path_without("bf16_frozen_weights")),
    "without_fp32_attention": ("trainer", "cpu_training_fast_path", fast_path_without("fp32_attention")),
    "without_cpu_fast_path": ("trainer", "cpu_training_fast_path",  # the three above together
                              fast_path_without("geometric_dropout", "bf16_frozen_weights", "fp32_attention")),
    "without_maskless_causal_attention": ("batching", "is_right_padded", lambda mask: False),
    "without_reply_only_logits": ("trainer", "reply_token_nll", full_vocabulary_nll),
    "without_length_grouping": ("trainer", "length_grouped_batches", random_batches),
}
ORIGINAL_FAST_PATH = trainer_module.cpu_training_fast_path


def run_ablations(model, tokenizer, rows, steps: int, mixed_precision: str, initial_adapter,
                  repeats: int) -> dict:
    """Ours in full and without each technique, round-robin `repeats` times; tokens/s of every run."""
    modules = {"trainer": trainer_module, "batching": batching_module}
    variants = {"ours": None, **ABLATIONS}
    out: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, change in variants.items():
            module, attribute, replacement = (modules[change[0]], change[1], change[2]) if change else (None, "", None)
            original = getattr(module, attribute) if module else None
            if module:
                setattr(module, attribute, replacement)
            try:
                say(f"ablation {name} ({repeat + 1}/{repeats})")
                run = run_ours(model, tokenizer, rows, steps, mixed_precision, initial_adapter)
                out[name].append(run["tokens_per_s"])
            finally:
                if module:
                    setattr(module, attribute, original)
            say(f"ablation {name}: {out[name][-1]} tokens/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="24 steps each (fewer give a noisy ratio: the batches differ in length)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps for each trainer (default 60)")
    parser.add_argument("--data", type=Path, default=DATA_ROOT, help="reddit dump root (Pushshift layout)")
    parser.add_argument("--subreddits", default="books,history,programming")
    parser.add_argument("--posts-per-subreddit", type=int, default=120)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--model", default="embedded", help="BASE_LLM_MODEL (default: embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablation", action="store_true",
                        help="also run ours without each of its techniques (leave-one-out), same steps, round-robin")
    parser.add_argument("--repeats", type=int, default=2, help="round-robin repeats of the ablation (default 2)")
    args = parser.parse_args()
    steps = args.steps or (24 if args.quick else 60)
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "fl_crew_reddit.reddit.backends"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    bf16 = bool(bf16_autocast_supported(CPU))
    config = FLCrewRedditConfig(base_llm_model=args.model, device="cpu", lora_r=8, lora_alpha=16, lora_dropout=0.05,
                                lora_target_modules=["all-linear"], max_seq_length=args.max_seq_length,
                                batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, use_quantization=False)

    began = time.perf_counter()
    model, tokenizer = fresh_model(config)
    initial_adapter = snapshot_adapter(model)
    rows = load_rows(args.data, args.subreddits.split(","), args.posts_per_subreddit, tokenizer, args.max_seq_length)
    random.Random(0).shuffle(rows)
    probe, rows = rows[:PROBE_ROWS], rows[PROBE_ROWS:]
    mean_tokens = sum(len(r["input_ids"]) for r in rows) / len(rows)
    say(f"{len(rows)} training examples (+{len(probe)} held out), mean {mean_tokens:.0f} tokens; "
        f"bf16={bf16}, threads={torch.get_num_threads()}; set-up {time.perf_counter() - began:.1f} s")

    ours = run_ours(model, tokenizer, rows, steps, "bf16" if bf16 else "no", initial_adapter)
    ours["held_out_loss"] = probe_loss(model, tokenizer, probe, bf16)
    say(f"ours: {ours}")
    ablation = run_ablations(model, tokenizer, rows, steps, "bf16" if bf16 else "no", initial_adapter,
                             args.repeats) if args.ablation else None
    del model
    model, _ = fresh_model(config, initial_adapter)
    with tempfile.TemporaryDirectory() as tmp:
        hf = run_hf_trainer(model, tokenizer, rows, steps, bf16, Path(tmp))
    hf["held_out_loss"] = probe_loss(model, tokenizer, probe, bf16)
    say(f"hf_trainer: {hf}")

    result = {"model": EMBEDDED_MODEL if args.model in ("", "embedded", EMBEDDED_MODEL) else args.model,
              "steps": steps, "batch_size": BATCH_SIZE, "examples": len(rows),
              "subreddits": args.subreddits.split(","), "max_seq_length": args.max_seq_length,
              "ours": ours, "hf_trainer": hf, "ratio": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
              "bf16": bf16, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "wall_seconds": round(time.perf_counter() - began, 1)}
    if ablation:
        result["ablation_tokens_per_s"] = ablation
        result["ablation_median_speedup"] = {
            name.removeprefix("without_"): round(statistics.median(ablation["ours"]) / statistics.median(runs), 2)
            for name, runs in ablation.items() if name != "ours"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

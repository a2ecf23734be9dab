"""GPU training throughput: our LocalTrainer against a plain Hugging Face `Trainer` + PEFT with padded batches,
side by side on one GPU, for three model shapes and two modes.

Shapes (random weights from configs, made on the GPU and saved once; speed and memory do not depend on the
values): SmolLM2-135M (Llama, 30 layers × 576), SmolLM2-1.7B (Llama, 24 × 2048) and Mistral-7B (32 × 4096,
GQA 32/8, 14336 MLP) with SmolLM2's 49,152-token vocabulary. Modes: LoRA on bf16 weights (r 16, alpha 32) and
QLoRA on nf4 weights with double quantisation (r 32, alpha 64), both on all linear layers, dropout 0.05.

Both trainers train the same rows (pre-tokenised reddit-2015 chat examples, `--rows`) with AdamW (fused),
lr 2e-4, clipping 1.0, bf16, gradient checkpointing for the 1.7B and 7B shapes (both). At each batch size B the
baseline takes B examples padded to the longest; ours takes a token budget of B × the mean example length,
packed without padding, so both see about the same tokens per optimizer step. Ours also runs with the automatic
budget (TOKENS_PER_BATCH=0: from free memory), which is what it does by default on CUDA.

tokens/s counts real (non-pad) tokens over the timed steps (after warm-up, ending with a device sync).
MFU = 6 · N · tokens/s / 989 TFLOP/s (H100/H200 SXM dense bf16, datasheet), N = the weights every token goes
through (decoder linear layers + output layer, not the input embedding); `mfu_attention` adds causal attention,
12 · layers · (heads × head_dim) · mean context per token. Recomputation under gradient checkpointing is not
counted (the usual convention), nor the cheaper backward of frozen weights.

    python3 benchmarks/gpu_throughput.py --rows rows.json --tokenizer tok/ --work /tmp/models --out results/
    python3 benchmarks/gpu_throughput.py ... --smoke      # 135M only, few steps, plus correctness checks
    .venv/bin/python benchmarks/gpu_throughput.py --make-rows  # first, on the CPU machine: .gpu/rows.json
    .venv/bin/python benchmarks/gpu_throughput.py --dry-run   # tiny shapes on the CPU: checks the script itself

The last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_baseline import padded_reply_data  # noqa: E402  (beside this script)

from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402
from fl_crew_reddit.training.batching import collate, pack, reply_token_nll  # noqa: E402
from fl_crew_reddit.training.model_loading import load_base_model  # noqa: E402
from fl_crew_reddit.training.packing import default_backend, packed_attention_enabled  # noqa: E402
from fl_crew_reddit.training.peft_setup import build_peft_model  # noqa: E402
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter  # noqa: E402

PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM datasheet
SHAPES = {
    "135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "1.7b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": True,
             "rope_theta": 130000.0},
    "7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
           "rope_theta": 1000000.0, "sliding_window": None},
}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 10000.0}
MODES = {"lora_bf16": {"quant": False, "r": 16, "alpha": 32}, "qlora_nf4": {"quant": True, "r": 32, "alpha": 64}}
# (size, mode, batch sizes compared with HF, steps per timed run, extra runs of ours alone): in this order, the
# most telling first, so that a run cut short by its time limit still has them.
PLAN = [("135m", "lora_bf16", [8, 64], 30, ["auto"]), ("135m", "qlora_nf4", [8, 64], 20, ["auto"]),
        ("7b", "lora_bf16", [16], 10, ["auto", "auto_no_checkpointing"]), ("7b", "qlora_nf4", [16], 10, ["auto"]),
        ("1.7b", "lora_bf16", [16], 10, ["auto"]), ("1.7b", "qlora_nf4", [16], 10, []),
        ("135m", "lora_bf16", [], 30, ["auto_compiled"])]
WARMUP_STEPS = 2


def say(message: str) -> None:
    print(f"[gpu_throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shape_config(size: str, tokenizer, dry_run: bool):
    from transformers import AutoConfig

    spec = dict(TINY if dry_run else SHAPES[size])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=4096,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, **spec)


def materialise(size: str, tokenizer_dir: Path, work: Path, device: torch.device, dry_run: bool) -> Path:
    """Random-init model of the shape, saved once (bf16) with the tokenizer; later runs load it like real weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / size
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(shape_config(size, tokenizer, dry_run), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    say(f"made and saved the {size} shape ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) in "
        f"{time.perf_counter() - started:.1f} s")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # this (parent) process keeps no GPU memory from the children
    return folder


def flops_per_token(config, rows) -> tuple[float, float]:
    """(6·N, causal attention) model FLOPs per trained token; N = decoder linear weights + output layer."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * config.intermediate_size
    n = layers * per_layer + config.vocab_size * h
    lengths = [len(r["input_ids"]) for r in rows]
    mean_context = sum(x * (x + 1) / 2 for x in lengths) / sum(lengths)
    return 6.0 * n, 12.0 * layers * heads * head_dim * mean_context


def settings(model_dir: Path, mode: str, size: str, device: torch.device, dry_run: bool) -> FLCrewRedditConfig:
    spec = MODES[mode]
    return FLCrewRedditConfig(
        _env_file=None, base_llm_model=str(model_dir), device=device.type, use_quantization=spec["quant"],
        quantization_bits=4, lora_r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.05,
        lora_target_modules=["all-linear"], max_seq_length=512, learning_rate=2e-4,
        gradient_checkpointing=size != "135m" and not dry_run)


def fresh(config: FLCrewRedditConfig, device: torch.device):
    base, tokenizer = load_base_model(config, device)
    torch.manual_seed(0)
    return build_peft_model(base, config), tokenizer


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def run_ours(config, device, rows, steps: int, tokens_per_batch: int, compile_mode: str = "off",
             extra: dict | None = None) -> dict:
    release(device)
    model, tokenizer = fresh(config, device)
    total_tokens = sum(len(r["input_ids"]) for r in rows)
    budget = tokens_per_batch or 32768
    epochs = math.ceil((steps + WARMUP_STEPS) * budget / total_tokens) + 1
    fit = {"local_epochs": epochs, "batch_size": 8, "learning_rate": 2e-4, "seed": 0, "round": 1,
           "tokens_per_batch": tokens_per_batch, "compile": compile_mode, "log_every": 1000, **(extra or {})}
    trainer = LocalTrainer("gpu", model, tokenizer, rows, device, show_progress=False)
    start = snapshot_adapter(model)
    began = time.perf_counter()
    trainer.fit(start, {**fit, "max_steps": WARMUP_STEPS})  # kernels, allocator, compilation
    warm_s = time.perf_counter() - began
    plan, _, packed, _, _ = trainer.plan({**fit, "max_steps": steps})
    result = trainer.fit(start, {**fit, "max_steps": steps})
    metrics = result.metrics
    out = {"tokens_per_s": round(metrics["tokens_per_s"], 1), "peak_gib": peak_gib(device),
           "steps": metrics["steps"], "seconds": round(metrics["seconds"], 2), "tokens": metrics["tokens"],
           "tokens_per_step": round(metrics["tokens"] / metrics["steps"]), "warmup_s": round(warm_s, 1),
           "packed": packed, "positions_per_step": round(sum(sum(len(r["input_ids"]) for r in b)
                                                             for s in plan for b in s) / len(plan)),
           "train_loss": round(metrics["train_loss"], 4), "compile": compile_mode}
    del trainer, model
    return out


def run_hf(config, device, rows, steps: int, batch_size: int, out_dir: Path) -> dict:
    """The plain recipe (as in train_throughput.py): labels −100 on prompt and padding, padded to the longest."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    release(device)
    model, tokenizer = fresh(config, device)
    dataset, collate_hf, sizes = padded_reply_data(rows, tokenizer)

    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=steps + WARMUP_STEPS,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0,
        report_to=[], save_strategy="no", logging_steps=steps + WARMUP_STEPS, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", optim="adamw_torch_fused", dataloader_num_workers=0, disable_tqdm=True,
        seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_hf,
                      callbacks=[StepTimer()])
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    timed = sizes[WARMUP_STEPS:len(marks)]
    seconds = marks[-1] - marks[WARMUP_STEPS - 1]
    tokens = sum(t for t, _ in timed)
    out = {"tokens_per_s": round(tokens / seconds, 1), "peak_gib": peak_gib(device), "steps": len(timed),
           "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_step": round(tokens / len(timed)),
           "real_token_fraction": round(tokens / sum(p for _, p in timed), 3)}
    del trainer, model
    return out


def correctness(config, device, rows) -> dict:
    """Packed (this device's kernel) vs padded loss and gradients on one batch, and host syncs per fit: the same
    fit at 4 and 12 steps must wait for the GPU the same number of times (no sync inside a step)."""
    release(device)
    model, tokenizer = fresh(config, device)
    model.eval()  # dropout off: the two layouts must compute the same function
    batch_rows = rows[:8]
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        nll_padded, count = reply_token_nll(model, collate(batch_rows, tokenizer.pad_token_id, device))
        grad_padded = torch.autograd.grad(nll_padded, params)
        with packed_attention_enabled(model):
            backend = None if device.type == "cuda" else "sdpa"
            nll_packed, _ = reply_token_nll(model, pack(batch_rows, device), backend=backend)
            grad_packed = torch.autograd.grad(nll_packed, params)
    grad_error = max(float((a - b).norm() / (b.norm() + 1e-12)) for a, b in zip(grad_packed, grad_padded))
    out = {"packed_attention": default_backend(device), "padded_loss": round(float(nll_padded) / count, 5),
           "packed_loss": round(float(nll_packed) / count, 5),
           "max_relative_grad_error": round(grad_error, 5)}
    model.train()
    if device.type == "cuda":
        trainer = LocalTrainer("sync", model, tokenizer, rows, device, show_progress=False)
        start = snapshot_adapter(model)
        counts = {}
        for steps in (4, 12):
            fit = {"local_epochs": 2, "batch_size": 8, "learning_rate": 2e-4, "seed": 0, "round": 1,
                   "tokens_per_batch": 4096, "log_every": 1000, "max_steps": steps}
            trainer.fit(start, fit)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.fit(start, fit)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
        out["syncs_per_fit"] = counts
    del model
    return out


def child(args) -> None:
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows = json.loads(Path(args.rows).read_text())
    if args.dry_run:
        rows = rows[:200]
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    size, mode, batches, steps, extras = PLAN[int(args.only)]
    if args.smoke or args.dry_run:
        batches, steps = batches[:1], 6
    model_dir = Path(args.work) / size
    config = settings(model_dir, mode, size, device, args.dry_run)
    from transformers import AutoConfig

    six_n, attention = flops_per_token(AutoConfig.from_pretrained(model_dir), rows)

    def add_mfu(result: dict) -> dict:
        if "tokens_per_s" in result:
            result["mfu"] = round(six_n * result["tokens_per_s"] / (PEAK_TFLOPS * 1e12), 4)
            result["mfu_attention"] = round((six_n + attention) * result["tokens_per_s"] / (PEAK_TFLOPS * 1e12), 4)
        return result

    def emit(record: dict) -> None:
        line = json.dumps({"size": size, "mode": mode, **record})
        print(line, flush=True)
        if args.out:
            with (args.out / "results.jsonl").open("a") as handle:
                handle.write(line + "\n")

    if (args.smoke or args.dry_run or args.check) and batches:
        emit({"check": correctness(config, device, rows)})
    for batch_size in batches:
        budget = int(batch_size * mean_len)
        say(f"{size} {mode} batch {batch_size}: ours (token budget {budget})")
        ours = add_mfu(run_ours(config, device, rows, steps, budget, extra=None if not args.dry_run else
                                {"packing": "on", "packed_attention": "sdpa"}))
        say(f"{size} {mode} batch {batch_size}: ours {ours}")
        hf = add_mfu(run_hf(config, device, rows, steps, batch_size, Path(args.work) / "hf_out"))
        say(f"{size} {mode} batch {batch_size}: hf {hf}")
        emit({"batch_size": batch_size, "ours": ours, "hf": hf,
              "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
              "memory_ratio": round(ours["peak_gib"] / hf["peak_gib"], 2) if ours["peak_gib"] else None})
    for extra in ([] if args.dry_run else extras):
        say(f"{size} {mode}: ours, {extra}")
        variant = config
        if extra == "auto_no_checkpointing":
            variant = config.model_copy(update={"gradient_checkpointing": False})
        try:
            ours = add_mfu(run_ours(variant, device, rows, max(4, steps // 2), 0,
                                    "on" if extra == "auto_compiled" else "off"))
        except Exception as error:  # an optional variant: report it and go on
            ours = {"error": f"{type(error).__name__}: {str(error)[:600]}"}
        say(f"{size} {mode} {extra}: {ours}")
        emit({"batch_size": extra, "ours": ours})


def make_rows(out: Path) -> None:
    """On the CPU machine: reddit-2015 chat examples tokenised with SmolLM2's tokenizer → out/rows.json and
    out/tokenizer (what the GPU run reads; the data and the model cache do not travel)."""
    import random

    from train_throughput import DATA_ROOT, load_rows
    from transformers import AutoTokenizer

    from fl_crew_reddit.training.model_loading import prepare_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model())
    rows = load_rows(DATA_ROOT, ["books", "history", "programming", "gadgets"], 150, tokenizer, 512)
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "rows.json").write_text(json.dumps([{"input_ids": r["input_ids"], "reply_mask": r["reply_mask"]}
                                               for r in rows]))
    say(f"{len(rows)} rows, mean {sum(len(r['input_ids']) for r in rows) / len(rows):.0f} tokens → {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, default=Path(".gpu/rows.json"), help="tokenised rows (JSON list)")
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fl_gpu_models"), help="where the shapes are saved")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fl_gpu_out"),
                        help="folder for results.jsonl (written as it goes) and summary.json")
    parser.add_argument("--sizes", default="135m,7b,1.7b")
    parser.add_argument("--modes", default="lora_bf16,qlora_nf4")
    parser.add_argument("--smoke", action="store_true", help="135M only, 6 steps, + correctness and sync checks")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--child-timeout", type=int, default=240)
    parser.add_argument("--deadline", type=float, default=520, help="seconds: start no child after this")
    parser.add_argument("--check", action="store_true", help="correctness and sync checks first")
    parser.add_argument("--plan", help="comma-separated indices into PLAN: run just those (a rerun of what was cut)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # index into PLAN, in a child process
    parser.add_argument("--make-rows", action="store_true", help="write --rows and --tokenizer here (CPU) and stop")
    args = parser.parse_args()
    if args.make_rows:
        make_rows(args.rows.parent)
        return
    if args.only:
        child(args)
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_throughput needs a CUDA GPU (or --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    began = time.perf_counter()
    sizes = ["135m"] if args.smoke else args.sizes.split(",")
    modes = args.modes.split(",")
    if args.dry_run:
        modes = [m for m in modes if m == "lora_bf16"]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.jsonl").write_text("")
    made: dict[str, str | None] = {}
    for index, (size, mode, *_rest) in enumerate(PLAN):
        if size not in sizes or mode not in modes or (args.plan and str(index) not in args.plan.split(",")):
            continue
        left = args.deadline - (time.perf_counter() - began)
        if left < 30:
            say(f"skipping {size} {mode}: {left:.0f} s left before the deadline")
            continue
        if size not in made:
            try:
                materialise(size, args.tokenizer, args.work, device, args.dry_run)
                made[size] = None
            except Exception as error:
                made[size] = f"materialise: {type(error).__name__}: {error}"[:500]
        if made[size]:
            continue
        command = [sys.executable, __file__, "--rows", str(args.rows), "--tokenizer", str(args.tokenizer),
                   "--work", str(args.work), "--only", str(index)]
        command += ["--smoke"] if args.smoke else []
        command += ["--dry-run"] if args.dry_run else []
        command += ["--check"] if index == 0 else []
        command += ["--out", str(args.out)] if args.out else []
        try:
            done = subprocess.run(command, timeout=min(args.child_timeout, left - 10))
            if done.returncode != 0:
                say(f"{size} {mode}: child exited with {done.returncode}")
        except subprocess.TimeoutExpired:
            say(f"{size} {mode}: child stopped at its time limit")
    records = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines()
               if line.strip()] if args.out else []
    errors = [f"{size}: {error}" for size, error in made.items() if error]
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peak_tflops_bf16": PEAK_TFLOPS,
               "rows": len(json.loads(Path(args.rows).read_text())), "smoke": args.smoke,
               "wall_s": round(time.perf_counter() - began, 1), "errors": errors, "results": records}
    if args.out:
        (args.out / "summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

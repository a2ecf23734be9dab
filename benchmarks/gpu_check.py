"""CUDA and QLoRA paths of the local trainer: tokens/s and peak GPU memory for LoRA (bf16) and QLoRA (nf4, 8-bit).

Runs our real code (load_base_model → build_peft_model → LocalTrainer.fit) on a model folder. With
`--random-init` the folder only needs config.json and the tokenizer: weights are drawn at random and saved once,
which measures speed and memory exactly as the real weights would (used where the weights cannot be copied).
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_crew_reddit.config import FLCrewRedditConfig  # noqa: E402
from fl_crew_reddit.preprocessing.pipeline import read_jsonl  # noqa: E402
from fl_crew_reddit.training.batching import tokenize_all  # noqa: E402
from fl_crew_reddit.training.model_loading import load_base_model  # noqa: E402
from fl_crew_reddit.training.peft_setup import build_peft_model  # noqa: E402
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter  # noqa: E402

MODES = {"lora_bf16": None, "qlora_4bit": 4, "qlora_8bit": 8}


def materialise_random(model_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def measure(model_dir: Path, examples: list[dict], steps: int, batch_size: int, quant_bits: int | None,
            tokens_per_batch: int = 0) -> dict:
    config = FLCrewRedditConfig(base_llm_model=str(model_dir), use_quantization=quant_bits is not None,
                                quantization_bits=quant_bits or 4, device="cuda", batch_size=batch_size)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    base, tokenizer = load_base_model(config)
    model = build_peft_model(base, config)
    load_s = time.perf_counter() - started
    rows = tokenize_all(tokenizer, examples, config.max_seq_length)
    trainer = LocalTrainer("gpu", model, tokenizer, rows, torch.device("cuda"), show_progress=False)
    # tokens_per_batch 0: the trainer's CUDA default (a token budget from free memory, packed); batch_size × 160
    # tokens would match a batch of `batch_size` reddit examples
    fit = {"local_epochs": 100, "batch_size": batch_size, "learning_rate": 2e-4, "seed": 0, "round": 1,
           "tokens_per_batch": tokens_per_batch}
    trainer.fit(snapshot_adapter(model), {**fit, "max_steps": 3})  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    result = trainer.fit(snapshot_adapter(model), {**fit, "max_steps": steps})
    torch.cuda.synchronize()
    label = "lora_bf16" if quant_bits is None else f"qlora_{quant_bits}bit"
    return {"mode": label, "load_s": round(load_s, 2), "steps": result.metrics["steps"],
            "tokens_per_s": round(result.metrics["tokens_per_s"], 1),
            "tokens_per_step": result.metrics["tokens"] // max(1, result.metrics["steps"]),
            "train_loss": round(result.metrics["train_loss"], 4),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--examples", type=Path, required=True, help="a train.jsonl written by the preprocessor")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens-per-batch", type=int, default=0, help="0: the trainer's automatic budget")
    parser.add_argument("--only", choices=list(MODES), help="measure one mode in this process (used internally)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    if args.only:  # child process: one mode, so peak memory is that mode's alone
        print(json.dumps(measure(args.model_dir, read_jsonl(args.examples), args.steps, args.batch_size,
                                 MODES[args.only], args.tokens_per_batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = materialise_random(args.model_dir, Path(tmp) / "model") if args.random_init else args.model_dir
        results = []
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--model-dir", str(model_dir), "--examples",
                                    str(args.examples), "--steps", str(args.steps), "--batch-size",
                                    str(args.batch_size), "--tokens-per-batch", str(args.tokens_per_batch),
                                    "--only", mode], capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if child.returncode == 0 and lines else
                           {"mode": mode, "error": child.stderr.strip()[-500:]})
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "random_init": args.random_init, "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()

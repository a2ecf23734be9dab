"""Local LoRA fine-tuning of one client, with the contract of a Flower ClientApp.

`LocalTrainer.fit(global_adapter, config)` → (new adapter weights, num_examples, metrics): the same shape as
Flower's `NumPyClient.fit`, so a Flower ClientApp can wrap it unchanged. The loop reads top to bottom: load the
global adapter, build the optimizer and schedule, run the epochs, return only the adapter weights.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from fl_crew_reddit.training.batching import collate, length_grouped_batches, reply_token_nll

AdapterState = dict[str, torch.Tensor]


@dataclass
class FitResult:
    state: AdapterState
    num_examples: int
    metrics: dict = field(default_factory=dict)


def bf16_autocast_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA and on CPUs with native bf16 (measured 1.65x fp32 on AVX512-BF16 here)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(device: torch.device, mixed_precision: str):
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and bf16_autocast_supported(device))
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup, then cosine decay to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def snapshot_adapter(model) -> AdapterState:
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in get_peft_model_state_dict(model).items()}


class LocalTrainer:
    """One federated client: private tokenized data plus a (shared, in-process) PEFT model to train on it."""

    def __init__(self, name: str, model, tokenizer, train_rows: list[dict], device: torch.device,
                 mixed_precision: str = "auto", show_progress: bool = True,
                 on_step: Callable[[dict], None] | None = None):
        self.name = name
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.train_rows = train_rows
        self.device = device
        self.mixed_precision = mixed_precision
        self.show_progress = show_progress
        self.on_step = on_step  # optional observer, called after each optimizer step (benchmarks time steps with it)

    def fit(self, global_adapter: AdapterState, config: dict) -> FitResult:
        """Train from `global_adapter` on local data; config: local_epochs, batch_size, learning_rate,
        proximal_mu, max_steps, seed, round."""
        started = time.perf_counter()
        # 1. Start from the global adapter.
        set_peft_model_state_dict(self.model, global_adapter)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        mu = float(config.get("proximal_mu", 0.0))
        anchors = [p.detach().clone() for p in params] if mu > 0 else []

        # 2. Batches for every epoch, then optimizer and schedule sized to them.
        rng = random.Random(f"{config.get('seed', 0)}-{self.name}-{config.get('round', 0)}")
        batch_size = int(config["batch_size"])
        epochs = [length_grouped_batches(self.train_rows, batch_size, rng) for _ in range(int(config["local_epochs"]))]
        schedule = [batch for epoch in epochs for batch in epoch]
        if config.get("max_steps"):
            schedule = schedule[: int(config["max_steps"])]
        total = len(schedule)
        optimizer = torch.optim.AdamW(params, lr=float(config["learning_rate"]), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup=max(1, total // 10)))
        torch.manual_seed(int(config.get("seed", 0)) + int(config.get("round", 0)))

        # 3. The loop: mean NLL over reply tokens, plus FedProx's (mu/2)·||w − w_global||² when mu > 0.
        losses, tokens = [], 0
        bar = tqdm(schedule, desc=f"round {config.get('round', '?')} {self.name}", unit="step",
                   disable=not self.show_progress, leave=False)
        for batch_rows in bar:
            batch = collate(batch_rows, self.pad_id, self.device)
            with autocast_context(self.device, self.mixed_precision):
                nll, count = reply_token_nll(self.model, batch)
            loss = nll / max(count, 1)
            if mu > 0:
                loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(nll.detach()) / max(count, 1))
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if self.on_step is not None:
                self.on_step({"step": len(losses), "loss": losses[-1], "tokens": int(batch["attention_mask"].sum()),
                              "positions": int(batch["attention_mask"].numel()), "time": time.perf_counter()})
        bar.close()
        seconds = time.perf_counter() - started
        if not losses or not all(math.isfinite(x) for x in losses):
            bad = "no steps ran" if not losses else "a non-finite loss"
            raise FloatingPointError(f"{self.name}: training produced {bad}")

        # 4. Only the adapter weights leave the client.
        last_epoch = losses[-max(1, len(epochs[-1])):]
        return FitResult(
            state=snapshot_adapter(self.model),
            num_examples=len(self.train_rows),
            metrics={"train_loss": sum(last_epoch) / len(last_epoch), "first_loss": losses[0],
                     "steps": total, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds},
        )

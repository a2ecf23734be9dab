"""Local LoRA fine-tuning of one client, with the contract of a Flower ClientApp.

`LocalTrainer.fit(global_adapter, config)` → (new adapter weights, num_examples, metrics): the same shape as
Flower's `NumPyClient.fit`, so a Flower ClientApp can wrap it unchanged. The loop reads top to bottom: load the
global adapter, build the optimizer and schedule, run the epochs, return only the adapter weights.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from fl_crew_reddit.aggregation.lora_exact import ffa_lora_trainable
from fl_crew_reddit.training.batching import (
    batch_counts,
    collate,
    length_grouped_batches,
    pack,
    reply_token_nll,
    token_budget_batches,
)
from fl_crew_reddit.training.packing import packed_attention_enabled
from fl_crew_reddit.training.peft_setup import active_adapter_for, parameter_count

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
    if uses_bf16(device, mixed_precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def uses_bf16(device: torch.device, mixed_precision: str) -> bool:
    return mixed_precision == "bf16" or (mixed_precision == "auto" and bf16_autocast_supported(device))


def bernoulli_positions(n: int, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Sorted indices in [0, n) where an i.i.d. Bernoulli(p) sequence of length n is 1, drawn as geometric gaps.

    The gap from one success to the next is Geometric(p), drawn by inversion, floor(log(1-U) / log(1-p)) + 1 with U
    uniform in float64: the same distribution as `torch.empty(n).bernoulli_(p).nonzero()`, from about n·p draws.
    """
    if p <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    scale = 1.0 / math.log1p(-p)
    expected = n * p
    draws = int(expected + 8 * math.sqrt(expected) + 32)

    def gap_ends() -> torch.Tensor:
        uniform = torch.rand(draws, dtype=torch.float64, device=device)
        return uniform.neg_().log1p_().mul_(scale).floor_().add_(1).to(torch.int64).cumsum_(0)

    ends = gap_ends()
    while True:
        kept = int(torch.searchsorted(ends, n, right=True))  # ends are 1-based positions, sorted
        if kept < ends.numel():  # the first success past the end was drawn: nothing is missing
            return ends[:kept] - 1
        ends = torch.cat([ends, gap_ends() + ends[-1]])  # about 8 sigma short: rare


class GeometricDropout(torch.nn.Module):
    """`nn.Dropout(p)` with the same distribution (each element zeroed with probability p, the rest scaled by
    1/(1-p)), with the dropped positions drawn by `bernoulli_positions`.

    torch draws CPU random numbers element by element; PEFT's LoRA dropout draws a mask the size of every adapted
    layer's input (7 per decoder layer), which made it about a fifth of a CPU training step. This draws ~p·n.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), not {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        out = x * (1.0 / (1.0 - self.p))
        dropped = bernoulli_positions(out.numel(), self.p, out.device)
        return out.view(-1).index_fill_(0, dropped, 0.0).view_as(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


FP32_SDPA = "sdpa_fp32_under_autocast"


def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """Transformers' sdpa attention with autocast off and fp32 inputs (query and key are fp32 already after RoPE).

    On the CPU, torch's flash-attention kernels run faster in fp32 than in bf16, backward above all: fwd+bwd of
    one SmolLM2 layer, batch 4, measured here 2.1 vs 4.0 ms at 64 tokens, 7.7 vs 12.4 at 160, 15.3 vs 20.9 at 256.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def _register_fp32_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # the same masks (and causal skip) as "sdpa"


@contextmanager
def cpu_training_fast_path(model, device: torch.device, bf16: bool, *, geometric_dropout: bool = True,
                           bf16_frozen_weights: bool = True, fp32_attention: bool = True):
    """For one fit on the CPU (each part can be switched off, for measuring it):

    - geometric_dropout: LoRA dropouts drawn by `GeometricDropout` (same distribution, ~p·n random draws);
    - bf16_frozen_weights, under bf16 autocast: the frozen base `nn.Linear` weights held in bf16. Autocast caches
      casts only of weights that require grad, so it would cast every frozen fp32 weight again on every forward;
      the numbers are the same (autocast rounds the same way);
    - fp32_attention, under bf16 autocast: sdpa attention in fp32 (`sdpa_in_fp32`: faster here, and more precise).

    Everything is put back on exit, so evaluation and saving see the model as it was loaded.
    """
    restore: list = []
    try:
        if device.type == "cpu":
            causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            config = getattr(causal_lm, "config", None)
            if bf16 and fp32_attention and getattr(config, "_attn_implementation", None) == "sdpa":
                _register_fp32_sdpa()
                config._attn_implementation = FP32_SDPA
                restore.append(lambda: setattr(config, "_attn_implementation", "sdpa"))
            tied = {id(m.weight) for m in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings())
                    if m is not None and hasattr(m, "weight")}
            for module in model.modules():
                dropouts = getattr(module, "lora_dropout", None)
                if geometric_dropout and isinstance(dropouts, torch.nn.ModuleDict):
                    for key, layer in list(dropouts.items()):
                        if type(layer) is torch.nn.Dropout and layer.p > 0:
                            dropouts[key] = GeometricDropout(layer.p).train(layer.training)
                            restore.append(lambda d=dropouts, k=key, old=layer: d.__setitem__(k, old))
                if bf16 and bf16_frozen_weights and type(module) is torch.nn.Linear:
                    weight = module.weight
                    if not weight.requires_grad and weight.dtype == torch.float32 and id(weight) not in tied:
                        original = weight.data
                        weight.data = original.to(torch.bfloat16)
                        restore.append(lambda w=weight, old=original: setattr(w, "data", old))
        yield
    finally:
        for undo in reversed(restore):
            undo()


@contextmanager
def frozen_lora_a(model, frozen: bool):
    """FFA-LoRA (Sun et al. 2024) for one fit: LoRA A factors take no gradient, so every client keeps the shared A
    and averaging the B factors is exactly averaging the updates B·A. Put back on exit."""
    changed = []
    if frozen:
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and not ffa_lora_trainable(name):
                parameter.requires_grad_(False)
                changed.append(parameter)
    try:
        yield
    finally:
        for parameter in changed:
            parameter.requires_grad_(True)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup, then cosine decay to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def snapshot_adapter(model, adapter: str = "default") -> AdapterState:
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


# Auto token budget (TOKENS_PER_BATCH=0 on CUDA): activation bytes per token of one decoder layer with LoRA on all
# linear layers, in bf16: ~48·hidden + 12·intermediate (the saved inputs of the norms, projections, LoRA dropouts,
# RoPE, attention and the MLP); with gradient checkpointing a layer keeps only its input (2·hidden) and one layer
# is recomputed at a time. Doubled for the allocator, QLoRA's dequantised weights and the loss chunks, and sized
# to half the free memory, so an estimate off by 2× still fits.
MAX_AUTO_TOKENS = 32768  # past this a step is long enough that launch overhead is amortised; more only costs steps
LOG_EVERY_CUDA = 32  # steps between host reads of the losses on CUDA (each read waits for the GPU)
COMPILE_BACKEND = "inductor"  # torch.compile backend of COMPILE=on (tests use aot_eager: no C++ compiler needed)


def activation_bytes_per_token(model) -> int:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    per_layer = 48 * hidden + 12 * intermediate
    if getattr(causal_lm, "is_gradient_checkpointing", False):
        return 2 * (layers * 2 * hidden + per_layer)
    return 2 * layers * per_layer


def auto_tokens_per_batch(model, device: torch.device, longest_row: int) -> int:
    """Tokens per batch from the free GPU memory (see activation_bytes_per_token), a multiple of 256,
    at least the longest row and at most MAX_AUTO_TOKENS."""
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(0.5 * free / activation_bytes_per_token(model)) // 256 * 256
    return max(longest_row, min(MAX_AUTO_TOKENS, budget))


COMPILE_AUTO_MAX_PARAMS = 1_000_000_000  # measured to pay at 135M (1.57x on an H200); not measured above 1B
COMPILE_AUTO_MIN_TOKENS = 4_000_000  # per fit: ~35 s eager at 135M, so the ~33 s compile pays back within 3 rounds


def resolve_compile(mode: str, device: torch.device, packed: bool, params: int = 0, fit_tokens: int = 0) -> bool:
    """COMPILE=on compiles each decoder layer (regional compilation: one compile serves every layer) and pads packed
    batches to the token budget, so every step has the same shape. auto: on only where it was measured to pay:
    CUDA, packed batches, a model under 1B parameters and a fit of at least 4M tokens. On an H200 (2026-12-01,
    benchmarks/gpu_throughput.py) the 135M shape ran 182,644 vs 115,998 tokens/s compiled (1.57x) after a 33 s
    compile; the compiled code stays cached in the worker, so later rounds do not pay it again."""
    if mode == "on":
        return True
    if mode == "off" or device.type != "cuda" or not packed:
        return False
    return 0 < params < COMPILE_AUTO_MAX_PARAMS and fit_tokens >= COMPILE_AUTO_MIN_TOKENS


def cached_parameter_count(model) -> int:
    """peft_setup.parameter_count, counted once per model (plan() runs every round)."""
    if getattr(model, "_fl_parameter_count", None) is None:
        model._fl_parameter_count = parameter_count(model)
    return model._fl_parameter_count


@contextmanager
def compiled_layers(model, enabled: bool):
    """torch.compile each decoder layer for one fit (`nn.Module.compile`, in place); undone on exit so evaluation
    runs eager. The compiled code stays cached, so the next fit does not compile again."""
    layers = []
    if enabled:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = list(causal_lm.get_decoder().layers)
        for layer in layers:
            layer.compile(backend=COMPILE_BACKEND)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


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
        # Optional observer, called once per optimizer step, in order, with that step's loss, tokens, positions and
        # time. On CUDA the calls come in groups at each host read (every `log_every` steps), and "time" is the time
        # of that read: the only moments the GPU has provably finished the steps. Benchmarks time steps with it.
        self.on_step = on_step

    def fit(self, global_adapter: AdapterState, config: dict) -> FitResult:
        """Train from `global_adapter` on local data; config: local_epochs, batch_size, learning_rate,
        proximal_mu, max_steps, seed, round, timeout_s, train_lora_a (False: FFA-LoRA, A frozen, only B returned),
        and for speed: tokens_per_batch (0: auto, i.e. from free memory on CUDA, batch_size examples on the CPU),
        grad_accum_steps, packing (auto|on|off; auto: on CUDA), packed_attention (varlen|flex|sdpa),
        compile (auto|on|off), log_every (steps between host reads of the loss; 0: auto)."""
        # a global adapter of lower rank than the model's (CLIENT_LORA_RANKS: the server truncated it to this client's
        # rank) trains the model's adapter of that rank (peft_setup.active_adapter_for)
        with active_adapter_for(self.model, global_adapter) as adapter, \
                frozen_lora_a(self.model, frozen=not config.get("train_lora_a", True)):
            return self._fit(global_adapter, config, adapter)

    def plan(self, config: dict) -> tuple[list[list[list[dict]]], int, bool, int, bool]:
        """(optimizer steps, each a list of micro-batches of rows; micro-batches in the last epoch; packed?;
        pad_to; compiled?). Token budget on CUDA, BATCH_SIZE examples length-grouped on the CPU unless
        TOKENS_PER_BATCH is set."""
        packing = config.get("packing", "auto")
        packed = packing == "on" or (packing == "auto" and self.device.type == "cuda")
        tokens_per_batch = int(config.get("tokens_per_batch") or 0)
        longest = max((len(r["input_ids"]) for r in self.train_rows), default=1)
        if tokens_per_batch == 0 and self.device.type == "cuda":
            # sized once per model (while its memory is that of a fresh fit), so later rounds batch the same way
            if getattr(self.model, "_fl_auto_tokens_per_batch", None) is None:
                self.model._fl_auto_tokens_per_batch = auto_tokens_per_batch(self.model, self.device, longest)
            tokens_per_batch = max(self.model._fl_auto_tokens_per_batch, longest)
        if tokens_per_batch:
            tokens_per_batch = max(tokens_per_batch, longest)
        rng = random.Random(f"{config.get('seed', 0)}-{self.name}-{config.get('round', 0)}")
        batch_size = int(config["batch_size"])
        epochs = [token_budget_batches(self.train_rows, tokens_per_batch, rng, packed) if tokens_per_batch
                  else length_grouped_batches(self.train_rows, batch_size, rng)
                  for _ in range(int(config["local_epochs"]))]
        accumulate = max(1, int(config.get("grad_accum_steps") or 1))
        micro = [batch for epoch in epochs for batch in epoch]
        steps = [micro[i:i + accumulate] for i in range(0, len(micro), accumulate)]
        if config.get("max_steps"):
            steps = steps[: int(config["max_steps"])]
        fit_tokens = sum(len(row["input_ids"]) for step in steps for batch in step for row in batch)
        compiled = resolve_compile(config.get("compile", "auto"), self.device, packed,
                                   cached_parameter_count(self.model), fit_tokens)
        pad_to = tokens_per_batch if packed and tokens_per_batch and compiled else 0
        return steps, len(epochs[-1]) if epochs else 0, packed, pad_to, compiled

    def _fit(self, global_adapter: AdapterState, config: dict, adapter: str = "default") -> FitResult:
        started = time.perf_counter()
        # 1. Start from the global adapter.
        set_peft_model_state_dict(self.model, global_adapter, adapter_name=adapter)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        mu = float(config.get("proximal_mu", 0.0))
        anchors = [p.detach().clone() for p in params] if mu > 0 else []

        # 2. Batches for every epoch, then optimizer and schedule sized to them.
        steps, last_epoch_batches, packed, pad_to, compile_layers = self.plan(config)
        accumulate = max(1, int(config.get("grad_accum_steps") or 1))
        total = len(steps)
        # fused: one kernel for all adapter tensors instead of ~10 small ops per tensor (420 tensors here)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=float(config["learning_rate"]), weight_decay=0.0, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup=max(1, total // 10)))
        torch.manual_seed(int(config.get("seed", 0)) + int(config.get("round", 0)))
        log_every = int(config.get("log_every") or 0) or (LOG_EVERY_CUDA if self.device.type == "cuda" else 1)
        backend = config.get("packed_attention")

        # 3. The loop: mean NLL over reply tokens, plus FedProx's (mu/2)·||w − w_global||² when mu > 0.
        # Nothing in a step reads a device value: token and target counts come from the host rows, the step losses
        # stay on the device and are read every `log_every` steps (one wait for the GPU per read).
        losses: list[float] = []
        pending: list[dict] = []
        tokens = 0
        bar = tqdm(total=total, desc=f"round {config.get('round', '?')} {self.name}", unit="step",
                   disable=not self.show_progress, leave=False)

        def read_pending() -> None:
            if not pending:
                return
            values = torch.stack([p["loss"] for p in pending]).tolist()  # the one host sync of the window
            now = time.perf_counter()
            for record, value in zip(pending, values):
                if not math.isfinite(value):
                    bar.close()
                    raise FloatingPointError(f"{self.name}: training produced a non-finite loss "
                                             f"(step {record['step']})")
                losses.append(value)
                if self.on_step is not None:
                    self.on_step({**record, "loss": value, "time": now})
            bar.update(len(pending))
            bar.set_postfix(loss=f"{values[-1]:.3f}")
            pending.clear()

        # On the CPU: faster LoRA dropout, bf16 frozen weights, fp32 attention for the loop (cpu_training_fast_path).
        with cpu_training_fast_path(self.model, self.device, uses_bf16(self.device, self.mixed_precision)), \
                packed_attention_enabled(self.model, packed), compiled_layers(self.model, compile_layers):
            timeout_s = float(config.get("timeout_s") or 0)
            for step, micro_batches in enumerate(steps, start=1):
                if timeout_s and time.perf_counter() - started > timeout_s:
                    bar.close()
                    raise TimeoutError(f"{self.name} ran past CLIENT_TIMEOUT={timeout_s:g}s after "
                                       f"{step - 1} of {total} steps")
                step_targets = sum(batch_counts(rows)[1] for rows in micro_batches)
                step_nll, step_tokens, step_positions = None, 0, 0
                for index, rows in enumerate(micro_batches):
                    batch = (pack(rows, self.device, pad_to=pad_to, pad_id=self.pad_id) if packed
                             else collate(rows, self.pad_id, self.device))
                    with autocast_context(self.device, self.mixed_precision):
                        nll, _ = (reply_token_nll(self.model, batch, backend=backend) if packed
                                  else reply_token_nll(self.model, batch))  # (benchmarks swap in other losses)
                    loss = nll / max(step_targets, 1)
                    if mu > 0 and index == 0:
                        loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                    loss.backward()
                    step_nll = nll.detach() if step_nll is None else step_nll + nll.detach()
                    step_tokens += batch["tokens"]
                    step_positions += batch["positions"]
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += step_tokens
                pending.append({"step": step, "loss": step_nll.float() / max(step_targets, 1),
                                "tokens": step_tokens, "positions": step_positions,
                                "micro_batches": len(micro_batches)})
                if len(pending) >= log_every:
                    read_pending()
            read_pending()
        bar.close()
        seconds = time.perf_counter() - started
        if not losses:
            raise FloatingPointError(f"{self.name}: training produced no steps ran")

        # 4. Only the adapter weights leave the client (under FFA-LoRA only B: A is the global adapter's, unchanged).
        last_epoch = losses[-max(1, math.ceil(last_epoch_batches / accumulate)):]
        state = snapshot_adapter(self.model, adapter)
        if not config.get("train_lora_a", True):
            state = {key: value for key, value in state.items() if ffa_lora_trainable(key)}
        return FitResult(
            state=state,
            num_examples=len(self.train_rows),
            metrics={"train_loss": sum(last_epoch) / len(last_epoch), "first_loss": losses[0],
                     "steps": total, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds},
        )

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
from fl_crew_reddit.training.dpo import (
    DPO_LOSS_TYPES,
    DPO_REFERENCES,
    OBJECTIVES,
    batch_reply_logprobs,
    pair_batch,
    pair_logprobs,
    pair_step_batches,
    preference_wins,
    rpo_loss,
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
                 on_step: Callable[[dict], None] | None = None, pair_rows: list[dict] | None = None,
                 projector=None):
        self.name = name
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.train_rows = train_rows
        # tokenized preference pairs (`dpo.tokenize_pairs`), for the objectives "dpo" and "sft_then_dpo"
        self.pair_rows = list(pair_rows or [])
        self.device = device
        self.mixed_precision = mixed_precision
        self.show_progress = show_progress
        # Optional observer, called once per optimizer step, in order, with that step's loss, tokens, positions and
        # time. On CUDA the calls come in groups at each host read (every `log_every` steps), and "time" is the time
        # of that read: the only moments the GPU has provably finished the steps. Benchmarks time steps with it.
        self.on_step = on_step
        # multimodal (training/multimodal.py): the shared ImageProjector, trained with the LoRA weights on the rows
        # that carry image slots; its tensors come and go under `mm_projector.` in the adapter state. DPO and the
        # text rows never use it.
        self.projector = projector

    def fit(self, global_adapter: AdapterState, config: dict) -> FitResult:
        """Train from `global_adapter` on local data; config: local_epochs, batch_size, learning_rate,
        proximal_mu, max_steps, seed, round, timeout_s, train_lora_a (False: FFA-LoRA, A frozen, only B returned),
        objective (sft | dpo | sft_then_dpo; DPO on the pair rows, batch_size pairs a micro-batch), dpo_beta,
        dpo_sft_weight (α of the SFT term on the chosen reply during DPO, `dpo.rpo_loss`; absent or 0: plain DPO),
        dpo_loss_type (sigmoid: DPO's loss; ipo: IPO's, `dpo.ipo_loss`; absent: sigmoid),
        dpo_reference (global: the received global adapter; after_sft: the policy after this fit's SFT steps; absent:
        global), dpo_learning_rate (the DPO phase's rate; absent or 0: learning_rate), dpo_epochs (passes over the
        pairs; absent or 0: local_epochs),
        min_pairs (fewer pairs: SFT only, with metrics["dpo_skipped"]),
        and for speed: tokens_per_batch (0: auto, i.e. from free memory on CUDA, batch_size examples on the CPU),
        grad_accum_steps, packing (auto|on|off; auto: on CUDA), packed_attention (varlen|flex|sdpa),
        compile (auto|on|off), log_every (steps between host reads of the loss; 0: auto)."""
        # a global adapter of lower rank than the model's (CLIENT_LORA_RANKS: the server truncated it to this client's
        # rank) trains the model's adapter of that rank (peft_setup.active_adapter_for)
        with active_adapter_for(self.model, global_adapter) as adapter, \
                frozen_lora_a(self.model, frozen=not config.get("train_lora_a", True)):
            return self._fit(global_adapter, config, adapter)

    def packs(self, config: dict) -> bool:
        if self.train_rows and "vision" in self.train_rows[0]:  # a VLM's rows (training/vlm.py): padded batches
            return False
        packing = config.get("packing", "auto")
        return packing == "on" or (packing == "auto" and self.device.type == "cuda")

    def plan(self, config: dict) -> tuple[list[list[list[dict]]], int, bool, int, bool]:
        """(optimizer steps, each a list of micro-batches of rows; micro-batches in the last epoch; packed?;
        pad_to; compiled?). Token budget on CUDA, BATCH_SIZE examples length-grouped on the CPU unless
        TOKENS_PER_BATCH is set."""
        packed = self.packs(config)
        longest = max((len(r["input_ids"]) for r in self.train_rows), default=1)
        tokens_per_batch = self.tokens_per_batch(config, longest)
        if tokens_per_batch:
            tokens_per_batch = max(tokens_per_batch, longest)
        rng = random.Random(f"{config.get('seed', 0)}-{self.name}-{config.get('round', 0)}")
        batch_size = int(config["batch_size"])
        if self.projector is not None and any(row.get("image_slots") for row in self.train_rows):
            from fl_crew_reddit.training.multimodal import modality_grouped_batches

            epochs = [modality_grouped_batches(self.train_rows, batch_size, rng, tokens_per_batch, packed)
                      for _ in range(int(config["local_epochs"]))]
        else:
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

    def tokens_per_batch(self, config: dict, longest: int) -> int:
        """TOKENS_PER_BATCH, or 0 (batch_size examples); on CUDA 0 means auto, sized once per model (while its
        memory is that of a fresh fit), so later rounds batch the same way."""
        tokens_per_batch = int(config.get("tokens_per_batch") or 0)
        if tokens_per_batch == 0 and self.device.type == "cuda":
            if getattr(self.model, "_fl_auto_tokens_per_batch", None) is None:
                self.model._fl_auto_tokens_per_batch = auto_tokens_per_batch(self.model, self.device, longest)
            tokens_per_batch = max(self.model._fl_auto_tokens_per_batch, longest)
        return tokens_per_batch

    def plan_pairs(self, config: dict, packed: bool) -> tuple[list[list[list[int]]], int]:
        """(DPO optimizer steps, each a list of micro-batches of indices into pair_rows; micro-batches in the last
        epoch), in a seeded order of their own (`dpo.pair_step_batches`)."""
        longest = max((len(p[side]["input_ids"]) for p in self.pair_rows for side in ("chosen", "rejected")),
                      default=1)
        rng = random.Random(f"{config.get('seed', 0)}-{self.name}-{config.get('round', 0)}-dpo")
        epochs = int(config.get("dpo_epochs") or 0) or int(config["local_epochs"])
        return pair_step_batches(self.pair_rows, {**config, "local_epochs": epochs}, rng, packed,
                                 self.tokens_per_batch(config, 2 * longest))

    def _fit(self, global_adapter: AdapterState, config: dict, adapter: str = "default") -> FitResult:
        started = time.perf_counter()
        objective = config.get("objective") or "sft"
        if objective not in OBJECTIVES:
            raise ValueError(f"{self.name}: unknown training objective {objective!r} (one of {', '.join(OBJECTIVES)})")
        beta, min_pairs = float(config.get("dpo_beta", 0.1)), int(config.get("min_pairs", 4))
        sft_weight = float(config.get("dpo_sft_weight", 0.0))
        reference_at = config.get("dpo_reference") or "global"
        if reference_at not in DPO_REFERENCES:
            raise ValueError(f"{self.name}: unknown DPO reference {reference_at!r} "
                             f"(one of {', '.join(DPO_REFERENCES)})")
        dpo_lr = float(config.get("dpo_learning_rate") or 0.0) or float(config["learning_rate"])
        loss_type = config.get("dpo_loss_type") or "sigmoid"
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"{self.name}: unknown DPO loss type {loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")
        metrics: dict = {}
        use_dpo = objective != "sft"
        if use_dpo:
            metrics["pairs"] = len(self.pair_rows)
            if len(self.pair_rows) < max(1, min_pairs):
                metrics["dpo_skipped"] = (f"{len(self.pair_rows)} preference pairs, fewer than "
                                          f"min_pairs={min_pairs}: SFT only")
                use_dpo = False
        use_sft = objective == "sft_then_dpo" or not use_dpo
        metrics["objective_used"] = objective if use_dpo else "sft"

        # 1. Start from the global adapter (and the global projector, when the state carries one).
        projector = self.projector
        if projector is not None:
            from fl_crew_reddit.training.multimodal import load_projector_state, split_projector

            global_adapter, projector_tensors = split_projector(global_adapter)
            if projector_tensors:
                load_projector_state(projector, projector_tensors, where=f"{self.name}'s received global state")
            projector.train()
        set_peft_model_state_dict(self.model, global_adapter, adapter_name=adapter)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if projector is not None:
            params += [p for p in projector.parameters() if p.requires_grad]
        mu = float(config.get("proximal_mu", 0.0))
        anchors = [p.detach().clone() for p in params] if mu > 0 else []

        # 2. Batches for every epoch (SFT rows, DPO pairs); each phase gets an optimizer and schedule sized to them.
        packed = self.packs(config)
        sft_steps, last_epoch_batches, _, pad_to, compile_layers = (self.plan(config) if use_sft
                                                                      else ([], 0, packed, 0, False))
        dpo_steps, dpo_last_epoch_batches = self.plan_pairs(config, packed) if use_dpo else ([], 0)
        accumulate = max(1, int(config.get("grad_accum_steps") or 1))
        torch.manual_seed(int(config.get("seed", 0)) + int(config.get("round", 0)))
        log_every = int(config.get("log_every") or 0) or (LOG_EVERY_CUDA if self.device.type == "cuda" else 1)
        backend = config.get("packed_attention")
        total = len(sft_steps) + len(dpo_steps)
        run = _StepRunner(self, params, anchors, mu, config, started, total, log_every)

        def sft_micro(rows: list[dict]) -> tuple[torch.Tensor, dict]:
            if projector is not None and any(row.get("image_slots") for row in rows):
                return image_micro(rows)
            if "vision" in rows[0]:
                return vlm_micro(rows)
            batch = (pack(rows, self.device, pad_to=pad_to, pad_id=self.pad_id) if packed
                     else collate(rows, self.pad_id, self.device))
            with autocast_context(self.device, self.mixed_precision):
                nll, _ = (reply_token_nll(self.model, batch, backend=backend) if packed
                          else reply_token_nll(self.model, batch))  # (benchmarks swap in other losses)
            return nll, {"tokens": batch["tokens"], "positions": batch["positions"]}

        def image_micro(rows: list[dict]) -> tuple[torch.Tensor, dict]:
            from fl_crew_reddit.training.multimodal import collate_multimodal, multimodal_reply_nll, pack_multimodal

            batch, features = (pack_multimodal(rows, self.device, pad_to=pad_to, pad_id=self.pad_id) if packed
                               else collate_multimodal(rows, self.pad_id, self.device))
            with autocast_context(self.device, self.mixed_precision):
                nll, _ = multimodal_reply_nll(self.model, projector, batch, features, backend=backend)
            return nll, {"tokens": batch["tokens"], "positions": batch["positions"]}

        def vlm_micro(rows: list[dict]) -> tuple[torch.Tensor, dict]:
            """A vision-language base's rows (`training.vlm.vlm_rows`): its processor's image tensors, its loss."""
            from fl_crew_reddit.training.vlm import collate_vlm, vlm_reply_nll

            batch = collate_vlm(rows, self.pad_id, self.device)
            with autocast_context(self.device, self.mixed_precision):
                nll, _ = vlm_reply_nll(self.model, batch)
            return nll, {"tokens": batch["tokens"], "positions": batch["positions"]}

        reference: tuple[torch.Tensor, torch.Tensor] | None = None

        def dpo_micro(index: list[int]) -> tuple[torch.Tensor, dict]:
            batch, counts = pair_batch([self.pair_rows[i] for i in index], self.device, self.pad_id, packed)
            with autocast_context(self.device, self.mixed_precision):
                logps = batch_reply_logprobs(self.model, batch, counts, backend)
            where = torch.tensor(index, device=self.device)
            loss, chosen_rewards, rejected_rewards, chosen_nll = rpo_loss(
                logps[:len(index)], logps[len(index):], reference[0][where], reference[1][where], beta,
                torch.tensor(counts[:len(index)], device=self.device), sft_weight, loss_type,
                torch.tensor(counts[len(index):], device=self.device))
            return loss * len(index), {"tokens": batch["tokens"], "positions": batch["positions"],
                                       "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                                       "chosen_nll": chosen_nll}

        # 3. The loops: SFT's mean NLL over reply tokens, then DPO's mean loss over pairs, plus FedProx's
        # (mu/2)·||w − w_global||² when mu > 0 (`_StepRunner`).
        # On the CPU: faster LoRA dropout, bf16 frozen weights, fp32 attention for the loop (cpu_training_fast_path).
        def reference_logprobs() -> tuple[torch.Tensor, torch.Tensor]:
            """The policy's log-probs of every train pair as it stands, in eval mode (no dropout), without gradient:
            the same model, never a second copy."""
            self.model.eval()
            with autocast_context(self.device, self.mixed_precision):
                logps = pair_logprobs(self.model, self.pair_rows, self.device, self.pad_id,
                                      int(config["batch_size"]), packed, backend)
            self.model.train()
            return logps

        with cpu_training_fast_path(self.model, self.device, uses_bf16(self.device, self.mixed_precision)), \
                packed_attention_enabled(self.model, packed):
            if use_dpo and reference_at == "global":
                # the received global adapter (the policy before its first step, SFT steps included), once per fit
                reference = reference_logprobs()
            with compiled_layers(self.model, compile_layers):
                sft_records = run.phase("sft", sft_steps, sft_micro,
                                        lambda micro: sum(batch_counts(rows)[1] for rows in micro))
            if use_dpo and reference_at == "after_sft":
                # the standard SFT → DPO pipeline: the DPO phase starts at its reference (loss log 2 at its first step)
                reference = reference_logprobs()
            dpo_records = run.phase("dpo", dpo_steps, dpo_micro, lambda micro: sum(len(i) for i in micro),
                                    learning_rate=dpo_lr)
        seconds = time.perf_counter() - started
        if not sft_records and not dpo_records:
            raise FloatingPointError(f"{self.name}: training produced no steps ran")

        # 4. Only the adapter weights leave the client (under FFA-LoRA only B: A is the global adapter's, unchanged).
        state = snapshot_adapter(self.model, adapter)
        if projector is not None:
            from fl_crew_reddit.training.multimodal import with_projector

            state = with_projector(state, projector)
        if not config.get("train_lora_a", True):
            state = {key: value for key, value in state.items() if ffa_lora_trainable(key)}
        if sft_records:
            last_epoch = sft_records[-max(1, math.ceil(last_epoch_batches / accumulate)):]
            metrics.update(train_loss=sum(r["loss"] for r in last_epoch) / len(last_epoch),
                           first_loss=sft_records[0]["loss"])
        if dpo_records:
            last_epoch = dpo_records[-max(1, math.ceil(dpo_last_epoch_batches / accumulate)):]
            chosen = torch.cat([r["chosen_rewards"] for r in last_epoch]).float().cpu()
            rejected = torch.cat([r["rejected_rewards"] for r in last_epoch]).float().cpu()
            metrics.update(dpo_loss=sum(r["loss"] for r in last_epoch) / len(last_epoch),
                           dpo_first_loss=dpo_records[0]["loss"],
                           train_preference_accuracy=preference_wins(chosen, rejected) / len(chosen),
                           train_reward_margin=float((chosen - rejected).mean()), dpo_beta=beta,
                           dpo_sft_weight=sft_weight, dpo_reference=reference_at, dpo_learning_rate=dpo_lr,
                           dpo_loss_type=loss_type,
                           dpo_steps=len(dpo_steps),
                           dpo_chosen_nll=float(torch.cat([r["chosen_nll"] for r in last_epoch]).float().mean()))
            if not sft_records:  # the loss this fit minimised is DPO's
                metrics.update(train_loss=metrics["dpo_loss"], first_loss=metrics["dpo_first_loss"])
        tokens = run.tokens
        metrics.update(steps=total, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)
        # the aggregation weight: what the fit trained on (pairs for DPO alone)
        examples = len(self.pair_rows) if metrics["objective_used"] == "dpo" else len(self.train_rows)
        return FitResult(state=state, num_examples=examples, metrics=metrics)


class _StepRunner:
    """The optimizer steps of one fit, phase after phase (SFT, DPO), step numbers counting on across phases.

    Nothing in a step reads a device value: denominators come from the host rows, the step losses stay on the
    device and are read every `log_every` steps (one wait for the GPU per read), where a non-finite one raises
    FloatingPointError naming the client and step. A phase's `micro` returns a micro-batch's summed loss (with
    grad) and its counts; the step's loss is the sum over its micro-batches divided by `size` of the step.
    """

    def __init__(self, trainer: LocalTrainer, params: list, anchors: list, mu: float, config: dict,
                 started: float, total: int, log_every: int):
        self.trainer, self.params, self.anchors, self.mu = trainer, params, anchors, mu
        self.config, self.started, self.total, self.log_every = config, started, total, log_every
        self.timeout_s = float(config.get("timeout_s") or 0)
        self.done = 0  # steps run in earlier phases
        self.tokens = 0

    def phase(self, name: str, steps: list, micro: Callable, size: Callable,
              learning_rate: float | None = None) -> list[dict]:
        """Run one phase's steps with an optimizer of its own (`learning_rate`; None: the config's)."""
        if not steps:
            return []
        trainer, params = self.trainer, self.params
        # fused: one kernel for all adapter tensors instead of ~10 small ops per tensor (420 tensors here)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        rate = float(self.config["learning_rate"]) if learning_rate is None else learning_rate
        optimizer = torch.optim.AdamW(params, lr=rate, weight_decay=0.0, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, len(steps), warmup=max(1, len(steps) // 10)))
        records: list[dict] = []
        pending: list[dict] = []
        label = "" if name == "sft" else f" {name}"
        bar = tqdm(total=len(steps), desc=f"round {self.config.get('round', '?')} {trainer.name}{label}",
                   unit="step", disable=not trainer.show_progress, leave=False)
        what = "training" if name == "sft" else name.upper()

        def read_pending() -> None:
            if not pending:
                return
            values = torch.stack([p["loss"] for p in pending]).tolist()  # the one host sync of the window
            now = time.perf_counter()
            for record, value in zip(pending, values):
                if not math.isfinite(value):
                    bar.close()
                    raise FloatingPointError(f"{trainer.name}: {what} produced a non-finite loss "
                                             f"(step {record['step']})")
                records.append({**record, "loss": value})
                if trainer.on_step is not None:
                    trainer.on_step({key: v for key, v in records[-1].items() if not isinstance(v, torch.Tensor)}
                                    | {"time": now})
            bar.update(len(pending))
            bar.set_postfix(loss=f"{values[-1]:.3f}")
            pending.clear()

        for number, micro_batches in enumerate(steps, start=self.done + 1):
            if self.timeout_s and time.perf_counter() - self.started > self.timeout_s:
                bar.close()
                raise TimeoutError(f"{trainer.name} ran past CLIENT_TIMEOUT={self.timeout_s:g}s after "
                                   f"{number - 1} of {self.total} steps")
            denominator = max(size(micro_batches), 1)
            step_loss, counts = None, {}
            for index, batch in enumerate(micro_batches):
                summed, extras = micro(batch)
                loss = summed / denominator
                if self.mu > 0 and index == 0:
                    loss = loss + (self.mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchors))
                loss.backward()
                step_loss = summed.detach() if step_loss is None else step_loss + summed.detach()
                for key, value in extras.items():
                    counts[key] = [*counts.get(key, []), value]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": number, "loss": step_loss.float() / denominator, "phase": name,
                      "tokens": sum(counts["tokens"]), "positions": sum(counts["positions"]),
                      "micro_batches": len(micro_batches)}
            record.update({key: torch.cat(values) for key, values in counts.items()
                           if key not in ("tokens", "positions")})
            self.tokens += record["tokens"]
            pending.append(record)
            if len(pending) >= self.log_every:
                read_pending()
        read_pending()
        bar.close()
        self.done += len(steps)
        return records

"""LLaVA-style image conditioning of a text LM: CLIP image embeddings → a small trainable projector → soft tokens
written into the prompt, trained with the LoRA adapter (issue 15; `workspace.FederatedWorkspace` wires it into the
round loop).

Choices, and why:
- Features: CLIP's projected, pooled image embedding (`image_embeds`, projection_dim wide: 512 for ViT-B/32), the
  vector preprocessing already stores next to every image (`<sha256>.clip.safetensors`). Training then never runs
  the vision tower (frozen, and it gets no gradient by construction), and the same file serves the CLIP score.
  Patch features (50 × 768 for ViT-B/32) would need the tower at every step or ~40× the storage, and a small text
  LM with MULTIMODAL_TOKENS soft tokens per image could not take 50 positions per image cheaply.
- Projector: one pooled vector → MULTIMODAL_TOKENS vectors of the LM's hidden size. `mlp2` is LLaVA-1.5's
  Linear → GELU → Linear(H, H), applied per token, whose first Linear makes the T token pre-activations from the
  one vector (d·T·H + H² weights); `linear` is Linear(d, T·H). The input is L2-normalised and scaled to unit RMS,
  and the last layer starts at the RMS of the LM's own input embeddings, so a fresh projector writes soft tokens of
  the size the LM is used to (a raw CLIP embedding has norm ~10, a token embedding far less).
- Placement: the soft tokens take MULTIMODAL_TOKENS positions per image right at the start of the user turn (before
  the post's text), marked in the tokenized row by `image_slots`; their reply mask is 0 (no loss on them), the
  placeholder id under them is never looked up. A gallery's images (or a video's keyframes), up to
  MAX_IMAGES_PER_EXAMPLE, each get their own slot group, in order (concatenated, not averaged: averaging would blur
  several pictures into one vector that is none of them); the rest are left out and counted.
- Batches: padded (`collate_multimodal`) or packed (`pack_multimodal`, padding-free, with the packed attention of
  `training.packing`); the soft tokens go in through `inputs_embeds` either way.
- Rows without images are tokenized exactly as `preprocessing.examples.tokenize_example` does and a batch of them
  goes through `batching.reply_token_nll` itself: text-only examples cost nothing extra and give the same loss.

Federation: the projector's tensors travel in the adapter's state dict under the key prefix `mm_projector.`
(`with_projector` / `split_projector`). Every aggregation rule treats them as plain tensors: FedAvg, median,
trimmed mean, Krum, ... average or screen them like any key, `svd_exact` averages them plainly (they are not LoRA
factors), and FFA-LoRA trains and sends them (`ffa_lora_trainable` is true for every key but the A factors).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fl_crew_reddit.preprocessing.examples import render_chat, tokenize_example
from fl_crew_reddit.training.batching import (
    collate,
    is_right_padded,
    linear_cross_entropy,
    pack,
    reply_token_nll,
)

PROJECTOR_KINDS = ("mlp2", "linear")
PROJECTOR_PREFIX = "mm_projector."  # the projector's keys in the state dict that travels with the adapter
GELU_RMS = math.sqrt(0.4252)  # RMS of GELU(x) for x ~ N(0, 1): the scale of the mlp2 hidden layer at init

# Reasons an image or an example is left out of multimodal rows (counts in `MultimodalRows.skipped`).
SKIP_IMAGES_OVER_LIMIT = "images_over_max_images_per_example"
SKIP_FEATURES_MISSING = "image_features_missing"
SKIP_FEATURES_NOT_FINITE = "image_features_not_finite"
SKIP_SLOTS_DO_NOT_FIT = "image_slots_do_not_fit_max_seq_length"
SKIP_NO_REPLY_TOKENS = "example_without_reply_tokens"


class NotAClipModel(ValueError):
    """IMAGE_PROCESSOR names a folder (or model) that is not a CLIP model: the message says what it is instead."""


# --- the projector ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorSpec:
    """What builds an ImageProjector: saved as projector_config.json beside the adapter."""
    kind: str  # mlp2 | linear
    feature_size: int  # CLIP's projection_dim (the width of the stored image embeddings)
    hidden_size: int  # the LM's hidden size
    tokens: int  # soft tokens per image (MULTIMODAL_TOKENS)
    seed: int = 0
    output_rms: float = 1.0  # the RMS the soft tokens start at: the LM's input embeddings' RMS

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"MULTIMODAL_PROJECTOR={self.kind!r}: use one of {', '.join(PROJECTOR_KINDS)}")
        for name in ("feature_size", "hidden_size", "tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"projector {name} must be a positive integer, got {getattr(self, name)!r}")
        if not (math.isfinite(self.output_rms) and self.output_rms > 0):
            raise ValueError(f"projector output_rms must be positive and finite, got {self.output_rms!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "projector_config.json") -> ProjectorSpec:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{where} holds a {type(values).__name__}, not an object")
        known = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(values) - known), sorted({"kind", "feature_size", "hidden_size", "tokens"}
                                                              - set(values))
        if unknown or missing:
            raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}")
        return cls(**values)


class ImageProjector(nn.Module):
    """[n, feature_size] image embeddings → [n, tokens, hidden_size] soft tokens (see the module docstring)."""

    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        self.spec = spec
        d, h, t = spec.feature_size, spec.hidden_size, spec.tokens
        with torch.random.fork_rng(devices=[]):  # deterministic from the seed; the caller's RNG is left as it was
            torch.manual_seed(spec.seed)
            if spec.kind == "mlp2":
                self.expand = nn.Linear(d, t * h)
                self.act = nn.GELU()
                self.out = nn.Linear(h, h)
                nn.init.normal_(self.expand.weight, std=1.0 / math.sqrt(d))
                nn.init.normal_(self.out.weight, std=spec.output_rms / (math.sqrt(h) * GELU_RMS))
            else:
                self.out = nn.Linear(d, t * h)
                nn.init.normal_(self.out.weight, std=spec.output_rms / math.sqrt(d))
            for layer in (self.out, getattr(self, "expand", None)):
                if layer is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if features.dim() != 2 or features.shape[1] != spec.feature_size:
            raise ValueError(f"image features of shape {tuple(features.shape)} given to a projector for "
                             f"[n, {spec.feature_size}] (the CLIP model's projection_dim)")
        x = torch.nn.functional.normalize(features.to(self.out.weight.dtype), dim=-1) * math.sqrt(spec.feature_size)
        if spec.kind == "mlp2":
            return self.out(self.act(self.expand(x).view(-1, spec.tokens, spec.hidden_size)))
        return self.out(x).view(-1, spec.tokens, spec.hidden_size)


def embedding_rms(model) -> float:
    """RMS of the LM's input embedding table: the size of the vectors the LM is used to at its input."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = causal_lm.get_input_embeddings().weight
    return float(weight.detach().float().pow(2).mean().sqrt())


def build_projector(model, feature_size: int, *, kind: str = "mlp2", tokens: int = 4, seed: int = 0) -> ImageProjector:
    """A fresh projector for `model` (any PEFT-wrapped or plain causal LM), on its device, in float32."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = ProjectorSpec(kind=kind, feature_size=int(feature_size), hidden_size=int(causal_lm.config.hidden_size),
                         tokens=int(tokens), seed=int(seed), output_rms=embedding_rms(causal_lm))
    device = causal_lm.get_input_embeddings().weight.device
    return ImageProjector(spec).to(device)


def projector_from_config(config, model, feature_size: int) -> ImageProjector:
    """MULTIMODAL_PROJECTOR, MULTIMODAL_TOKENS and SEED of a run's settings."""
    return build_projector(model, feature_size, kind=config.multimodal_projector, tokens=config.multimodal_tokens,
                           seed=config.seed)


# --- the projector in the state dict that travels ---------------------------------------------------------------------
def projector_state(projector: ImageProjector) -> dict[str, torch.Tensor]:
    """The projector's tensors under PROJECTOR_PREFIX, detached CPU copies (as the adapter's state is sent)."""
    return {PROJECTOR_PREFIX + key: value.detach().to("cpu").clone() for key, value in projector.state_dict().items()}


def with_projector(adapter_state: dict[str, torch.Tensor], projector: ImageProjector | None) -> dict:
    """The adapter's state dict plus the projector's tensors (a key clash is an error, never an overwrite)."""
    if projector is None:
        return dict(adapter_state)
    extra = projector_state(projector)
    clash = sorted(set(adapter_state) & set(extra))
    if clash:
        raise ValueError(f"adapter keys already use the projector prefix {PROJECTOR_PREFIX!r}: {clash[:3]}")
    return {**adapter_state, **extra}


def split_projector(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the adapter's own keys, the projector's keys without the prefix): what `set_peft_model_state_dict` and
    `ImageProjector.load_state_dict` each take."""
    adapter = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    return adapter, projector


def load_projector_state(projector: ImageProjector, state: dict[str, torch.Tensor], where: str = "state") -> None:
    """Copy a projector state (prefixed or not) into `projector`, after checking its keys and shapes by name."""
    _, prefixed = split_projector(state)
    own = prefixed or state
    expected = projector.state_dict()
    missing, extra = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    wrong = [f"{k}: {tuple(own[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
             if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        raise ValueError(f"{where} does not fit a {projector.spec.kind} projector "
                         f"({projector.spec.feature_size} → {projector.spec.tokens}×{projector.spec.hidden_size}): "
                         f"missing {missing}, unexpected {extra}, shapes {wrong}")
    projector.load_state_dict({k: v.to(expected[k].dtype) for k, v in own.items()}, strict=True)


# --- rows with image slots --------------------------------------------------------------------------------------------
def placeholder_id(tokenizer) -> int:
    """The id under a soft token's position (never looked up): the pad token, else end of sequence, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_with_image_slots(tokenizer, messages: list[dict], max_length: int, slots: int) -> dict | None:
    """`tokenize_example` with `slots` placeholder positions at the start of the last user turn's text.

    The prompt is tokenized in two pieces around the slots (template head | user text and the rest), as LLaVA
    tokenizes around its <image> marker. To fit `max_length` the text after the slots is cut from the left and the
    reply from the right, by tokenize_example's rule; the head and the slots are kept whole. None when they leave
    no room for a reply token (the caller falls back to the text-only row). `slots` = 0: tokenize_example's row.
    """
    if slots <= 0:
        row = tokenize_example(tokenizer, messages, max_length)
        return None if row is None else {**row, "image_slots": []}
    prompt_text, reply_text = render_chat(tokenizer, messages)
    user = next((m["content"] for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
    at = prompt_text.rfind(user) if user else -1
    at = at if at >= 0 else 0  # a template that rewrites the user's text: the slots open the prompt
    head = tokenizer(prompt_text[:at], add_special_tokens=False)["input_ids"] if at else []
    tail = tokenizer(prompt_text[at:], add_special_tokens=False)["input_ids"]
    reply = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    budget = max_length - len(head) - slots
    if budget < 1 or not reply:
        return None
    truncated = False
    if len(tail) + len(reply) > budget:
        truncated = True
        min_reply = min(len(reply), max(8, budget // 4))
        keep_tail = min(max(budget - len(reply), budget - min_reply, 0), len(tail))
        tail = tail[len(tail) - keep_tail:]
        reply = reply[:budget - len(tail)]
    if not reply:
        return None
    input_ids = head + [placeholder_id(tokenizer)] * slots + tail + reply
    return {"input_ids": input_ids, "reply_mask": [0] * (len(input_ids) - len(reply)) + [1] * len(reply),
            "truncated": truncated, "image_slots": list(range(len(head), len(head) + slots))}


@dataclass
class MultimodalRows:
    rows: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # images (or examples) left out, by reason
    images: int = 0  # images that condition a row

    @property
    def image_rows(self) -> int:
        return sum(1 for row in self.rows if row["image_slots"])


def multimodal_rows(tokenizer, examples: Sequence[dict], features_of: Callable[[Path], torch.Tensor | None], *,
                    max_length: int, tokens_per_image: int, max_images: int) -> MultimodalRows:
    """Tokenized rows of `examples` (preprocessing's dicts: messages, image_paths), each image post's rows with
    the embeddings of its first `max_images` images (`image_embeds`, [k, d] float32) and their slots.

    `features_of(path)` gives an image's stored embedding, or None when it has none (no CLIP weights, a rejected
    image): that image is left out and counted, as is one whose embedding is not finite (a damaged feature file
    would turn the whole batch's loss into NaN); an example left without images is the plain text row.
    """
    out = MultimodalRows()
    for example in examples:
        paths = [Path(p) for p in example.get("image_paths") or []]
        if len(paths) > max_images:
            out.skipped[SKIP_IMAGES_OVER_LIMIT] += len(paths) - max_images
            paths = paths[:max_images]
        features = []
        for path in paths:
            feature = features_of(path)
            if feature is None:
                out.skipped[SKIP_FEATURES_MISSING] += 1
            elif not bool(torch.isfinite(feature).all()):
                out.skipped[SKIP_FEATURES_NOT_FINITE] += 1
            else:
                features.append(feature.detach().to("cpu", torch.float32).reshape(-1))
        if len({f.numel() for f in features}) > 1:
            raise ValueError(f"example {example.get('id', '?')}: image embeddings of different sizes "
                             f"{sorted({f.numel() for f in features})} (features of two CLIP models mixed)")
        row = tokenize_with_image_slots(tokenizer, example["messages"], max_length, len(features) * tokens_per_image)
        if row is None and features:
            out.skipped[SKIP_SLOTS_DO_NOT_FIT] += len(features)
            features = []
            row = tokenize_with_image_slots(tokenizer, example["messages"], max_length, 0)
        if row is None:
            out.skipped[SKIP_NO_REPLY_TOKENS] += 1
            continue
        if features:
            row["image_embeds"] = torch.stack(features)
            out.images += len(features)
        out.rows.append(row)
    return out


def stored_features(clip_source: str) -> Callable[[Path], torch.Tensor | None]:
    """`features_of` for `multimodal_rows`: the embedding preprocessing stored beside each image by this CLIP."""
    from fl_crew_reddit.preprocessing.image_features import read_features

    return lambda path: read_features(path, clip_source)


def modality_grouped_batches(rows: list[dict], batch_size: int, rng, tokens_per_batch: int = 0,
                             packed: bool = False) -> list[list[dict]]:
    """Length-grouped batches of image rows and of text rows apart (a batch is one modality: text batches take the
    plain path, no padding goes to slot groups), in one shuffled order; `tokens_per_batch` > 0: token-budget
    batches (`batching.token_budget_batches`, as LocalTrainer plans text rows) of each modality instead."""
    from fl_crew_reddit.training.batching import length_grouped_batches, token_budget_batches

    def grouped(part: list[dict]) -> list[list[dict]]:
        if tokens_per_batch:
            return token_budget_batches(part, tokens_per_batch, rng, packed) if part else []
        return length_grouped_batches(part, batch_size, rng)

    with_images = [row for row in rows if row.get("image_slots")]
    text_only = [row for row in rows if not row.get("image_slots")]
    batches = grouped(with_images) + grouped(text_only)
    rng.shuffle(batches)
    return batches


# --- the loss ---------------------------------------------------------------------------------------------------------
def _check_slots(rows: list[dict]) -> None:
    """Every row has image embeddings exactly when it has slots, and a whole number of slots per image."""
    for i, row in enumerate(rows):
        images = row.get("image_embeds")
        slots = row.get("image_slots") or []
        if (images is None) != (not slots) or (images is not None and len(slots) % images.shape[0]):
            raise ValueError(f"row {i}: {len(slots)} image slots for "
                             f"{0 if images is None else images.shape[0]} images")


def collate_multimodal(rows: list[dict], pad_id: int, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """`batching.collate` (right-padded) plus `image_index`: the flat positions (batch × width grid) of every soft
    token, image by image in row order; and the [n_images, d] embeddings in that order (None: no image)."""
    _check_slots(rows)
    batch = collate(rows, pad_id, device)
    width = batch["input_ids"].shape[1]
    index = [i * width + slot for i, row in enumerate(rows) for slot in row.get("image_slots") or []]
    batch["image_index"] = torch.tensor(index, dtype=torch.long).to(device)
    embeds = [row["image_embeds"] for row in rows if row.get("image_embeds") is not None]
    return batch, (torch.cat(embeds).to(device) if embeds else None)


def pack_multimodal(rows: list[dict], device: torch.device, pad_to: int = 0,
                    pad_id: int = 0) -> tuple[dict, torch.Tensor | None]:
    """`batching.pack` (all rows end to end in one row, no padding) plus `image_index` and the image embeddings, as
    `collate_multimodal` gives them for a padded batch."""
    _check_slots(rows)
    batch = pack(rows, device, pad_to=pad_to, pad_id=pad_id)
    index, start = [], 0
    for row in rows:
        index.extend(start + slot for slot in row.get("image_slots") or [])
        start += len(row["input_ids"])
    batch["image_index"] = torch.tensor(index, dtype=torch.long).to(device)
    embeds = [row["image_embeds"] for row in rows if row.get("image_embeds") is not None]
    return batch, (torch.cat(embeds).to(device) if embeds else None)


def multimodal_reply_nll(model, projector: ImageProjector | None, batch: dict, image_features: torch.Tensor | None,
                         chunk_rows: int | None = None, backend: str | None = None) -> tuple[torch.Tensor, int]:
    """`batching.reply_token_nll`'s contract (summed NLL over reply tokens, their count) with the projected image
    features written at the batch's `image_index` positions of the input embeddings; padded (`collate_multimodal`)
    or packed (`pack_multimodal`, inside `packing.packed_attention_enabled`) batches.

    A batch without images is `reply_token_nll` itself. Gradients reach the projector and the LoRA weights; the
    LM's own weights are frozen by PEFT and CLIP is not in the graph (its features are precomputed).
    """
    index = batch.get("image_index")
    if image_features is None or index is None or index.numel() == 0:
        return reply_token_nll(model, batch, chunk_rows, backend)
    if projector is None:
        raise ValueError("a batch with images needs the image projector")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    embeds = causal_lm.get_input_embeddings()(batch["input_ids"])
    soft = projector(image_features)
    hidden_size = embeds.shape[-1]
    if soft.shape[0] * soft.shape[1] != index.numel() or soft.shape[-1] != hidden_size:
        raise ValueError(f"{soft.shape[0]} images × {soft.shape[1]} soft tokens of width {soft.shape[-1]} for "
                         f"{index.numel()} image slots of width {hidden_size}")
    flat = embeds.reshape(-1, hidden_size).index_copy(0, index, soft.reshape(-1, hidden_size).to(embeds.dtype))
    if "cu_seqlens" in batch:
        from fl_crew_reddit.training.packing import PACKED, default_backend, pack_info

        if decoder.config._attn_implementation != PACKED:
            raise RuntimeError("a packed batch needs the packed attention implementation: run it inside "
                               "`packed_attention_enabled(model)`")
        info = pack_info(batch, backend or default_backend(batch["input_ids"].device))
        hidden = decoder(inputs_embeds=flat.view_as(embeds), position_ids=batch["position_ids"], fl_packing=info)
    else:
        mask = batch["attention_mask"]
        hidden = decoder(inputs_embeds=flat.view_as(embeds), attention_mask=None if is_right_padded(mask) else mask)
    selected = hidden.last_hidden_state.reshape(-1, hidden_size).index_select(0, batch["target_index"])
    nll = linear_cross_entropy(selected, causal_lm.get_output_embeddings(), batch["targets"], chunk_rows)
    return nll, batch["count"]


# --- the image's contribution -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageContribution:
    """Reply perplexity on image rows with their real images and with a blank image in their place."""
    rows: int
    reply_tokens: int
    perplexity_real: float
    perplexity_blank: float
    blank: str  # "zeros" or "clip:<source>" (the CLIP features of a blank white image)

    @property
    def nats_per_token(self) -> float:
        """How much the real image lowers the reply NLL per token (positive: the image helps)."""
        return math.log(self.perplexity_blank) - math.log(self.perplexity_real)


@torch.no_grad()
def image_contribution(model, projector: ImageProjector, rows: Sequence[dict],
                       blank_features: torch.Tensor | None = None, *, pad_id: int = 0, batch_size: int = 8,
                       blank: str | None = None) -> ImageContribution:
    """Perplexity of the replies of `rows` that carry images, with their images and with `blank_features` (one
    [d] vector: a blank white image's CLIP embedding; None: zeros) in every image's place. Rows without images are
    left out: both numbers would be the same for them."""
    image_rows = [row for row in rows if row.get("image_slots")]
    if not image_rows:
        raise ValueError("no row with an image: the image's contribution needs held-out replies to image posts")
    device = projector.out.weight.device
    was_training = (model.training, projector.training)
    model.eval()
    projector.eval()
    totals = {"real": 0.0, "blank": 0.0}
    count = 0
    try:
        for start in range(0, len(image_rows), batch_size):
            batch, features = collate_multimodal(image_rows[start:start + batch_size], pad_id, device)
            replacement = (torch.zeros_like(features) if blank_features is None
                           else blank_features.to(device, features.dtype).reshape(1, -1).expand_as(features))
            for name, used in (("real", features), ("blank", replacement)):
                totals[name] += float(multimodal_reply_nll(model, projector, batch, used)[0])
            count += batch["count"]
    finally:
        model.train(was_training[0])
        projector.train(was_training[1])
    if count == 0:
        raise ValueError("the image rows have no reply tokens")
    return ImageContribution(rows=len(image_rows), reply_tokens=count,
                             perplexity_real=math.exp(totals["real"] / count),
                             perplexity_blank=math.exp(totals["blank"] / count),
                             blank=blank or ("zeros" if blank_features is None else "blank_features"))


# --- generation conditioned on the image ------------------------------------------------------------------------------
def with_images_replaced(rows: Sequence[dict], features: torch.Tensor) -> list[dict]:
    """Copies of `rows` with one [d] embedding (a blank image's) in place of each of their images."""
    return [{**row, "image_embeds": features.detach().to("cpu", torch.float32).reshape(1, -1).expand(
        row["image_embeds"].shape[0], -1).clone()} if row.get("image_slots") else row for row in rows]


def generate_with_images(model, projector: ImageProjector, tokenizer, rows: Sequence[dict], *,
                         max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy replies to the prompts of multimodal rows (the tokens before their reply, image slots included), the
    projected image embeddings written at the slots, as training and the held-out loss see them; one reply per
    row, in order (`generated_ids_with_images`, decoded)."""
    ids = generated_ids_with_images(model, projector, tokenizer, rows, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generated_ids_with_images(model, projector: ImageProjector, tokenizer, rows: Sequence[dict], *,
                              max_new_tokens: int = 48, batch_size: int = 8) -> list[list[int]]:
    """The new token ids of `generate_with_images`, per row (a row that ended before the batch's longest is
    padded with the pad id). Rows are left-padded in batches; `generate` gets `inputs_embeds`, so it returns the
    new tokens only."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = causal_lm.get_input_embeddings().weight.device
    pad_id = placeholder_id(tokenizer)
    was_training = (model.training, projector.training)
    model.eval()
    projector.eval()
    replies: list[list[int]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [row["input_ids"][:row["reply_mask"].index(1)] if 1 in row["reply_mask"] else row["input_ids"]
                       for row in chunk]
            width = max(len(prompt) for prompt in prompts)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            index, features = [], []
            for i, (row, prompt) in enumerate(zip(chunk, prompts)):
                offset = width - len(prompt)
                input_ids[i, offset:] = torch.tensor(prompt)
                attention[i, offset:] = 1
                slots = row.get("image_slots") or []
                if slots:
                    _check_slots([row])
                    index.extend(i * width + offset + slot for slot in slots)
                    features.append(row["image_embeds"])
            input_ids, attention = input_ids.to(device), attention.to(device)
            embeds = causal_lm.get_input_embeddings()(input_ids)
            if features:
                soft = projector(torch.cat(features).to(device))
                hidden_size = embeds.shape[-1]
                flat = embeds.reshape(-1, hidden_size).index_copy(
                    0, torch.tensor(index, dtype=torch.long, device=device),
                    soft.reshape(-1, hidden_size).to(embeds.dtype))
                embeds = flat.view_as(embeds)
            output = model.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
            replies.extend(output.tolist())
    finally:
        model.train(was_training[0])
        projector.train(was_training[1])
    return replies


# --- the vision encoder -----------------------------------------------------------------------------------------------
def check_clip_folder(folder: Path) -> None:
    """Raise NotAClipModel when a local IMAGE_PROCESSOR folder is not a CLIP checkpoint (its config.json says what
    it is): CLIPModel.from_pretrained would otherwise build a random CLIP from, e.g., a Llama folder, with only a
    warning, and the features would be noise."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise NotAClipModel(f"IMAGE_PROCESSOR={folder} has no config.json: not a CLIP model folder")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAClipModel(f"IMAGE_PROCESSOR={folder}: config.json cannot be read ({type(error).__name__}): "
                            "not a CLIP model folder") from None
    kind = values.get("model_type") if isinstance(values, dict) else None
    if kind != "clip":
        architectures = values.get("architectures") if isinstance(values, dict) else None
        raise NotAClipModel(f"IMAGE_PROCESSOR={folder} is a {kind or 'unknown'} model folder "
                            f"(config.json model_type={kind!r}, architectures={architectures}), not a CLIP model "
                            "(model_type 'clip')")


def load_image_encoder(name: str):
    """`preprocessing.image_features.load_clip`, after checking that a local folder really is a CLIP model.
    Raises NotAClipModel (a folder of another model) or ClipUnavailable (no weights), each with one clear line."""
    from fl_crew_reddit.preprocessing.image_features import load_clip, resolve_clip_source

    source = Path(resolve_clip_source(name))
    if source.exists():
        check_clip_folder(source)
    return load_clip(name)


def blank_image_features(encoder, size: int = 224) -> torch.Tensor:
    """[d] CLIP embedding of a blank white image: the 'no picture' reference of `image_contribution`."""
    from PIL import Image

    return encoder.image_embeddings([Image.new("RGB", (size, size), (255, 255, 255))])[0]

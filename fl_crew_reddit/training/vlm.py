"""A vision-language base model (issue 15, the second way in): when BASE_LLM_MODEL names a transformers
image-text-to-text model (SmolVLM / Idefics3 / LLaVA families), LoRA goes on its language model and the model's
own processor turns the images into its image tokens and pixel inputs.

This is the alternative to `training.multimodal` (a text LM + CLIP features + a trained projector): a VLM already
has a vision tower and a connector trained for its language model, so nothing new is trained on the vision side.

Choices, and why:
- Detection reads only the config (`model_type` in transformers' image-text-to-text mapping): no weights are loaded
  to decide, and a text LM folder is never mistaken for one.
- LoRA targets are a regex anchored at the language model's module path (`model.text_model` for Idefics3,
  `model.language_model` for LLaVA): the vision tower has q_proj / v_proj layers too, and a plain list of leaf names
  would put LoRA there. The regex is stored in adapter_config.json, so `PeftModel.from_pretrained` loads the folder
  onto the same base as any PEFT adapter.
- Rows: the images open the first user turn (as `training.multimodal` places its soft tokens), prompt and reply are
  tokenized separately (as `preprocessing.examples.tokenize_example` does) so the reply mask is exact. The image
  tokens the processor expands cannot be cut: a long image row loses the start of its post's text instead, and an
  example whose images alone leave no room for a reply falls back to text-only, counted. Every image goes
  through `preprocessing.images.normalise_image` first (the same checks and size limit as preprocessing); a
  missing or rejected one is left out and counted by reason.
- The loss (`vlm_reply_nll`) has `batching.reply_token_nll`'s contract: summed NLL over reply tokens and their
  count, the output layer run only at the reply positions.

The round loop (in-process federation) uses it: `FederatedWorkspace` loads the VLM here instead of
`model_loading.load_base_model`, its sites read `vlm_rows` (`VlmRowSettings`), the evaluator scores them with
`vlm_reply_nll` and generates through the processor (`generate_vlm_replies`), and each evaluation records the
image's contribution (`vlm_image_contribution`: the real images vs blank white images of the same sizes through the
same processor). Modes that load a text LM elsewhere (Flower sites, trainer processes) or build text rows (DPO
pairs, self-improvement, data attacks) are refused at start (`vlm_unsupported_settings`).
"""
from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fl_crew_reddit.config import EMBEDDED_MODEL, ConfigError, FLCrewRedditConfig
from fl_crew_reddit.preprocessing.images import SKIP_IMAGE_MISSING, ImageRejected, normalise_image
from fl_crew_reddit.training.batching import collate, linear_cross_entropy
from fl_crew_reddit.training.model_loading import BaseModelUnavailable, pick_device, resolve_base_model
from fl_crew_reddit.training.multimodal import SKIP_IMAGES_OVER_LIMIT, SKIP_NO_REPLY_TOKENS, ImageContribution
from fl_crew_reddit.training.peft_setup import lora_config

SKIP_IMAGE_TOKENS_DO_NOT_FIT = "image_tokens_do_not_fit_max_seq_length"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # one of them names the image processor
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TEXT_KEYS = ("input_ids", "attention_mask")


# --- detection and loading --------------------------------------------------------------------------------------------
def vision_language_model_types() -> frozenset[str]:
    """transformers' image-text-to-text model types (idefics3, smolvlm, llava, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def is_vision_language_config(model_config) -> bool:
    return getattr(model_config, "model_type", None) in vision_language_model_types()


def vision_language_model_type(source: str) -> str | None:
    """The model type of `source` (a folder or a hub id already in the local cache) when it is a vision-language
    model, else None. Reads config.json only; the embedded text LM and unknown hub ids are not VLMs."""
    from transformers import AutoConfig

    if source in ("", EMBEDDED_MODEL, "embedded"):
        return None
    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        return None
    try:
        model_config = AutoConfig.from_pretrained(str(path) if path.exists() else source, local_files_only=True)
    except (OSError, ValueError):  # not in the local cache, or a config transformers cannot read: not decided here
        return None
    return model_config.model_type if is_vision_language_config(model_config) else None


def check_processor_folder(folder: Path, model_type: str) -> None:
    """A local VLM folder must hold its processor (image processor and tokenizer files): AutoProcessor would
    otherwise fall back to a bare tokenizer and images would fail later, mid-round."""
    missing = []
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        missing.append(f"the image processor ({' or '.join(PROCESSOR_FILES)})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"the tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise BaseModelUnavailable(
            f"BASE_LLM_MODEL={folder} is a vision-language model ({model_type}) but its processor is missing: "
            f"{' and '.join(missing)} not found in that folder. Copy the processor files of the same model "
            "(processor_config.json / preprocessor_config.json, the tokenizer files, chat_template) into it.")


def load_vlm_processor(source: str, model_type: str):
    from transformers import AutoProcessor

    if Path(source).exists():
        check_processor_folder(Path(source), model_type)
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise BaseModelUnavailable(f"BASE_LLM_MODEL={source} is a vision-language model ({model_type}) whose "
                                   f"processor cannot be loaded: {type(error).__name__}: {error}") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise BaseModelUnavailable(f"BASE_LLM_MODEL={source} is a vision-language model ({model_type}) but its "
                                   f"processor loads as {type(processor).__name__}, without an image processor "
                                   "and a tokenizer: the processor files are missing or incomplete.")
    return processor


def load_vlm(config: FLCrewRedditConfig, device: torch.device | None = None):
    """(model, processor) for a vision-language BASE_LLM_MODEL (AutoModelForImageTextToText + AutoProcessor);
    BaseModelUnavailable when it is not one or its processor is missing."""
    from transformers import AutoModelForImageTextToText

    device = device or pick_device(config.device)
    source = resolve_base_model(config.base_llm_model)
    model_type = vision_language_model_type(source)
    if model_type is None:
        raise BaseModelUnavailable(f"BASE_LLM_MODEL={config.base_llm_model} is not a vision-language model "
                                   "(its config's model_type is not an image-text-to-text type)")
    processor = load_vlm_processor(source, model_type)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=True)
    except OSError as error:
        raise BaseModelUnavailable(f"BASE_LLM_MODEL={source} ({model_type}): the weights cannot be loaded: "
                                   f"{error}") from error
    model.to(device)
    model.config.use_cache = False
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor


# --- LoRA on the language model only ----------------------------------------------------------------------------------
def language_model_path(model) -> str:
    """The module path of the VLM's language model (its decoder), e.g. `model.text_model`."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder and name:
            return name
    raise ValueError(f"{type(model).__name__}: its language model (get_decoder) is not one of its named modules")


def language_model_targets(model, config: FLCrewRedditConfig) -> str:
    """PEFT target_modules (a regex PEFT full-matches against module names): LORA_TARGET_MODULES, or every linear
    layer for all-linear, inside the language model only: the vision tower, the connector and the output layer
    get no LoRA. ConfigError names a target the language model does not have."""
    prefix = language_model_path(model)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if name.startswith(prefix + ".") and isinstance(module, torch.nn.Linear)})
    wanted = linear if config.lora_target_modules == ["all-linear"] else list(config.lora_target_modules)
    unmatched = [name for name in wanted if name not in linear]
    if unmatched or not wanted:
        raise ConfigError(f"LORA_TARGET_MODULES={','.join(config.lora_target_modules)}: {', '.join(unmatched)} "
                          f"matches no linear layer of {config.base_llm_model}'s language model ({prefix}); its "
                          f"linear layers are {', '.join(linear) or 'none'} (or use all-linear)")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(name) for name in wanted)})"


def build_vlm_peft_model(model, config: FLCrewRedditConfig):
    """PEFT LoRA on the VLM's language model; everything else (vision tower, connector, embeddings) frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(config, target_modules=language_model_targets(model, config)))


# --- rows -------------------------------------------------------------------------------------------------------------
def load_image(path: Path, max_size: int):
    """A PIL RGB image through preprocessing's normalisation; ImageRejected (with its counted reason) otherwise."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageRejected(SKIP_IMAGE_MISSING, f"{path}: {type(error).__name__}") from None
    with Image.open(io.BytesIO(normalise_image(data, max_size))) as image:
        return image.convert("RGB")


def blank_like(image):
    """A white RGB image of `image`'s size: 'no picture' for the processor, with the same number of image tokens
    (processors that split large images split by size)."""
    from PIL import Image

    return Image.new("RGB", image.size, (255, 255, 255))


def chat_with_images(messages: list[dict], images: int) -> list[dict]:
    """The processor's chat format: content as typed parts; `images` image entries open the first user turn."""
    chat, placed = [], False
    for message in messages:
        parts = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user" and not placed:
            parts = [{"type": "image"} for _ in range(images)] + parts
            placed = True
        chat.append({"role": message["role"], "content": parts})
    return chat


def render_vlm_chat(processor, messages: list[dict], images: int) -> tuple[str, str]:
    """(prompt text ending where the reply starts, reply text with its end-of-turn marker), from the processor's
    chat template."""
    chat = chat_with_images(messages, images)
    prompt = processor.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(chat, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{type(processor).__name__}'s chat template renders the prompt differently with and "
                         "without the reply: the reply tokens cannot be told apart")
    return prompt, full[len(prompt):]


def shorten_first_user_text(tokenizer, messages: list[dict], drop: int) -> list[dict] | None:
    """`messages` with the first `drop` tokens of the first user turn's text cut (the turn the images open), or None
    when that text has no more than `drop` tokens. From the left, as `tokenize_example` cuts a prompt: the end of
    the post, nearest the reply, stays."""
    for index, message in enumerate(messages):
        if message["role"] == "user":
            ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            if drop >= len(ids):
                return None
            text = tokenizer.decode(ids[drop:], skip_special_tokens=False)
            return [*messages[:index], {**message, "content": text}, *messages[index + 1:]]
    return None


def vlm_row(processor, messages: list[dict], images: list, max_length: int) -> dict | None:
    """input_ids (image tokens expanded by the processor), the reply mask and the processor's image tensors.

    Text-only: the prompt is cut from the left and the reply from the right, by tokenize_example's rule. With
    images the image tokens cannot be cut: the first user turn's text is cut from its left instead (at most as much
    as leaves the reply tokenize_example's minimum), then the reply to fit; None when no reply token fits (the
    caller falls back to text-only)."""
    tokenizer = processor.tokenizer

    def encode(chat: list[dict]) -> tuple[dict, list[int], list[int]]:
        prompt_text, reply_text = render_vlm_chat(processor, chat, len(images))
        encoded = processor(text=[prompt_text], images=[images] if images else None, add_special_tokens=False,
                            return_tensors="pt")
        return encoded, encoded["input_ids"][0].tolist(), tokenizer(reply_text, add_special_tokens=False)["input_ids"]

    encoded, prompt, reply = encode(messages)
    truncated = len(prompt) + len(reply) > max_length
    if truncated and images:
        min_reply = min(len(reply), max(8, max_length // 4))
        dropped = 0
        for _ in range(3):  # decoding and re-encoding the cut text can merge tokens differently: re-measure
            overflow = len(prompt) + min_reply - max_length
            if overflow <= 0:
                break
            shorter = shorten_first_user_text(tokenizer, messages, dropped + overflow)
            if shorter is None:
                break
            dropped += overflow
            encoded, prompt, reply = encode(shorter)
        reply = reply[:max(0, max_length - len(prompt))]
    elif truncated:
        min_reply = min(len(reply), max(8, max_length // 4))
        keep_prompt = min(max(max_length - len(reply), max_length - min_reply, 0), len(prompt))
        prompt = prompt[len(prompt) - keep_prompt:]
        reply = reply[:max_length - len(prompt)]
    if not reply:
        return None
    vision = {key: value for key, value in encoded.items() if key not in TEXT_KEYS and isinstance(value, torch.Tensor)}
    return {"input_ids": prompt + reply, "reply_mask": [0] * len(prompt) + [1] * len(reply), "truncated": truncated,
            "images": len(images), "vision": vision if images else {}}


@dataclass
class VlmRows:
    rows: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # images (or examples) left out, by reason
    images: int = 0  # images that condition a row

    @property
    def image_rows(self) -> int:
        return sum(1 for row in self.rows if row["images"])


def vlm_rows(processor, examples: Sequence[dict], *, max_length: int, max_images: int,
             max_image_size: int, blank: bool = False) -> VlmRows:
    """Rows of `examples` (preprocessing's dicts: messages, image_paths): an image post's rows carry its first
    `max_images` images; images that are missing or rejected are left out and counted, and an example left without
    images is a text-only row. `blank`: every image that loads is replaced by a white image of its size (the same
    image tokens, so the same rows but for the pixels: the image contribution's reference)."""
    out = VlmRows()
    for example in examples:
        paths = [Path(p) for p in example.get("image_paths") or []]
        if len(paths) > max_images:
            out.skipped[SKIP_IMAGES_OVER_LIMIT] += len(paths) - max_images
            paths = paths[:max_images]
        images = []
        for path in paths:
            try:
                images.append(load_image(path, max_image_size))
            except ImageRejected as rejected:
                out.skipped[rejected.reason] += 1
        if blank:
            images = [blank_like(image) for image in images]
        row = vlm_row(processor, example["messages"], images, max_length)
        if row is None and images:
            out.skipped[SKIP_IMAGE_TOKENS_DO_NOT_FIT] += len(images)
            images = []
            row = vlm_row(processor, example["messages"], [], max_length)
        if row is None:
            out.skipped[SKIP_NO_REPLY_TOKENS] += 1
            continue
        out.images += len(images)
        out.rows.append(row)
    return out


# --- batches and the loss ---------------------------------------------------------------------------------------------
def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad `tensor` at the end of each dimension to `shape` (zeros: Idefics3 drops all-zero images)."""
    out = tensor.new_zeros(tuple(shape))
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def collate_vision(rows: list[dict]) -> dict[str, torch.Tensor]:
    """The image tensors of a batch. Processors that give one [1, images, ...] block per prompt (Idefics3, SmolVLM)
    are zero-padded to the batch's most images and largest size, text-only rows getting all-zero images (the model
    drops those); processors that give [images, ...] (LLaVA) are concatenated in row order."""
    keys = sorted({key for row in rows for key in row["vision"]})
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [row["vision"][key] for row in rows if key in row["vision"]]
        if key == "pixel_values" and present[0].dim() == 5 or key == "pixel_attention_mask" and present[0].dim() == 4:
            shape = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
            blocks = [_pad_to(row["vision"][key], shape) if key in row["vision"]
                      else present[0].new_zeros(shape) for row in rows]
            batch[key] = torch.cat(blocks)
        else:
            batch[key] = torch.cat(present)
    return batch


def collate_vlm(rows: list[dict], pad_id: int, device: torch.device) -> dict:
    """`batching.collate`'s padded text batch (reply positions and targets built on the host) plus the image
    tensors of the rows that have images."""
    batch = collate(rows, pad_id, device)
    if any(row["images"] for row in rows):
        batch.update({key: value.to(device) for key, value in collate_vision(rows).items()})
    return batch


def vlm_reply_nll(model, batch: dict, chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over reply tokens and their count (`reply_token_nll`'s contract), with the batch's
    images: the VLM's inner model merges image features into the sequence, the output layer runs only at the
    positions whose next token is a reply token."""
    vlm = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(vlm.parameters()).dtype
    vision = {key: (value.to(dtype) if value.is_floating_point() else value)
              for key, value in batch.items() if key.startswith(("pixel_", "image_")) and torch.is_tensor(value)}
    hidden = vlm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            **vision).last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
    nll = linear_cross_entropy(selected, vlm.get_output_embeddings(), batch["targets"], chunk_rows)
    return nll, batch["count"]


# --- the round loop ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VlmRowSettings:
    """How a site's examples become a VLM's rows (`vlm_rows`): the base's processor, MAX_IMAGES_PER_EXAMPLE,
    MAX_IMAGE_SIZE."""
    processor: object
    max_images: int
    max_image_size: int


class VlmTextTokenizer:
    """The VLM's tokenizer as the text stages see it (preprocessing's length filters and `prompt`, pad ids): every
    attribute is the processor's tokenizer's, but chat templates render through the processor, whose template wants
    typed content parts; so preprocessing's text-only rows match `vlm_rows`' text-only rows token for token."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def __getattr__(self, name: str):
        return getattr(self.__dict__["tokenizer"], name)

    def __setattr__(self, name: str, value) -> None:  # padding_side, pad_token, ...: the tokenizer's own
        if name in ("processor", "tokenizer"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template

    def apply_chat_template(self, messages: list[dict], **kwargs):
        return self.processor.apply_chat_template(chat_with_images(messages, 0), **kwargs)


def vlm_unsupported_settings(config: FLCrewRedditConfig, trainer_processes: Sequence[str] = ()) -> list[str]:
    """The settings (NAME=value, and why) that cannot run with a vision-language base yet: [] when the run can.
    `trainer_processes`: the devices TRAINER_DEVICES resolved to (trainer processes load a text LM)."""
    refused = []
    if config.federation != "inprocess":
        refused.append(f"FEDERATION={config.federation} (Flower sites load the base as a text LM)")
    if trainer_processes:
        refused.append(f"TRAINER_DEVICES={','.join(config.trainer_devices)} (trainer processes on "
                       f"{', '.join(trainer_processes)} load the base as a text LM)")
    if config.use_quantization:
        refused.append("USE_QUANTIZATION=true (QLoRA of a VLM is not wired)")
    if config.training_objective != "sft":
        refused.append(f"TRAINING_OBJECTIVE={config.training_objective} (preference pairs are text rows)")
    if config.self_improve:
        refused.append("SELF_IMPROVE=true (it generates and scores text rows)")
    if config.attack in ("label_flip", "backdoor"):
        refused.append(f"ATTACK={config.attack} (poisoned train examples are tokenized as text rows)")
    if config.gradient_checkpointing is True:
        refused.append("GRADIENT_CHECKPOINTING=true (not wired for a VLM)")
    return refused


@torch.no_grad()
def generate_vlm_replies(model, processor, examples: Sequence[dict], device: torch.device, *, max_images: int,
                         max_image_size: int, max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to `examples` (their messages up to the reply), each with its post's images through the
    processor (images that do not load are left out: the reply is then conditioned on the text alone). One example
    at a time: no padding between prompts of different image counts."""
    model.eval()
    dtype = next(model.parameters()).dtype
    replies = []
    for example in examples:
        images = []
        for path in (example.get("image_paths") or [])[:max_images]:
            try:
                images.append(load_image(Path(path), max_image_size))
            except ImageRejected:
                pass
        prompt, _ = render_vlm_chat(processor, example["messages"], len(images))
        encoded = processor(text=[prompt], images=[images] if images else None, add_special_tokens=False,
                            return_tensors="pt")
        inputs = {key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
                  for key, value in encoded.items() if torch.is_tensor(value)}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        replies.append(processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return replies


@torch.no_grad()
def vlm_image_contribution(model, real_rows: Sequence[dict], blank_rows: Sequence[dict], pad_id: int,
                           device: torch.device, batch_size: int = 8) -> ImageContribution:
    """Reply perplexity of the image rows with their real images and with blank white ones (`vlm_rows(...,
    blank=True)` of the same examples: the same tokens, other pixels); text-only rows are left out (both numbers
    would be equal for them)."""
    pairs = [(real, blank) for real, blank in zip(real_rows, blank_rows, strict=True) if real["images"]]
    if not pairs:
        raise ValueError("no row with an image: the image's contribution needs held-out replies to image posts")
    if any(real["input_ids"] != blank["input_ids"] for real, blank in pairs):
        raise ValueError("the blank-image rows differ from the real ones in their tokens: not comparable")
    was_training = model.training
    model.eval()
    totals, count = {"real": 0.0, "blank": 0.0}, 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            for name, side in (("real", 0), ("blank", 1)):
                batch = collate_vlm([pair[side] for pair in chunk], pad_id, device)
                totals[name] += float(vlm_reply_nll(model, batch)[0])
            count += batch["count"]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the image rows have no reply tokens")
    return ImageContribution(rows=len(pairs), reply_tokens=count, perplexity_real=math.exp(totals["real"] / count),
                             perplexity_blank=math.exp(totals["blank"] / count),
                             blank="white image through the VLM's processor")

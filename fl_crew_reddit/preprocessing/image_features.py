"""CLIP image and text embeddings (transformers' CLIPModel + CLIPImageProcessor; no torchvision needed).

IMAGE_PROCESSOR names the model: a local folder, a hub id, or a short name (`clip-vit-base-patch32` is
`openai/clip-vit-base-patch32`). A hub id is looked up in the local Hugging Face cache first and the Hub is only
asked when it answers a quick probe, so an offline machine learns in a second, not after a minute of retries, that
there are no weights. Without weights the images are still kept: `clip_encoder` says so once per process, with
the reason, and callers record that reason in the results.

Image features are stored next to each image as `<sha256>.clip.safetensors` (key `image_embeds`, the projected
CLIP embedding, not normalised; metadata `model`), so a second pass over the same images reuses them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel

log = logging.getLogger(__name__)

CLIP_SHORT_NAMES = {
    "clip-vit-base-patch32": "openai/clip-vit-base-patch32",
    "clip-vit-base-patch16": "openai/clip-vit-base-patch16",
    "clip-vit-large-patch14": "openai/clip-vit-large-patch14",
}
FEATURE_SUFFIX = ".clip.safetensors"
FEATURE_KEY = "image_embeds"
BATCH_SIZE = 16


class ClipUnavailable(RuntimeError):
    """No CLIP weights could be loaded; the message is the reason shown in the log, results and report."""


class ImageFeatureReport(BaseModel):
    model: str
    computed: int = 0
    reused: int = 0
    skipped_reason: str | None = None


def resolve_clip_source(name: str) -> str:
    """A local folder as is, a short name as its hub id, anything else as a hub id."""
    name = name.strip()
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    return CLIP_SHORT_NAMES.get(name, name)


@dataclass
class ClipEncoder:
    name: str  # the IMAGE_PROCESSOR value
    source: str  # the folder or hub id it was loaded from
    model: object
    processor: object
    tokenizer: object

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, d] projected image embeddings (float32, not normalised)."""
        if not images:
            return torch.zeros(0, self.model.config.projection_dim)
        out = []
        for start in range(0, len(images), BATCH_SIZE):
            pixels = self.processor(images=[im.convert("RGB") for im in images[start:start + BATCH_SIZE]],
                                    return_tensors="pt")["pixel_values"]
            out.append(self.model.get_image_features(pixel_values=pixels).pooler_output.float())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """[n, d] projected text embeddings; texts are cut to CLIP's context (77 tokens for OpenAI's models)."""
        if not texts:
            return torch.zeros(0, self.model.config.projection_dim)
        limit = self.model.config.text_config.max_position_embeddings
        out = []
        for start in range(0, len(texts), BATCH_SIZE):
            encoded = self.tokenizer(texts[start:start + BATCH_SIZE], padding=True, truncation=True,
                                     max_length=limit, return_tensors="pt")
            out.append(self.model.get_text_features(input_ids=encoded["input_ids"],
                                                    attention_mask=encoded["attention_mask"]).pooler_output.float())
        return torch.cat(out)


def load_clip(name: str) -> ClipEncoder:
    """Load CLIP from a folder, the local cache, or the Hub when reachable; raise ClipUnavailable with the reason."""
    from transformers import AutoTokenizer, CLIPModel

    try:  # the Pillow backend by name: the default one wants torchvision, which the pinned torch cannot import
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers before the split into backends
        from transformers import CLIPImageProcessor

    from fl_crew_reddit.hub import hub_reachable

    source = resolve_clip_source(name)
    is_folder = Path(source).exists()
    if is_folder and not (Path(source) / "config.json").is_file():
        raise ClipUnavailable(f"IMAGE_PROCESSOR={name} is a folder without config.json: not a CLIP model folder")
    local_only = True
    if not is_folder:
        try:
            CLIPImageProcessor.from_pretrained(source, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise ClipUnavailable(
                    f"no CLIP weights for IMAGE_PROCESSOR={name} ({source}): they are not in the local Hugging Face "
                    "cache and the Hub cannot be reached (offline or HF_HUB_OFFLINE=1); set IMAGE_PROCESSOR to a "
                    "local CLIP folder to compute them") from None
            local_only = False
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_only)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as error:
        raise ClipUnavailable(f"IMAGE_PROCESSOR={name} ({source}) could not be loaded as CLIP "
                              f"(model, image processor and tokenizer): {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from None
    model.eval()
    return ClipEncoder(name=name, source=source, model=model, processor=processor, tokenizer=tokenizer)


_LOADED: dict[str, ClipEncoder | ClipUnavailable] = {}


def clip_encoder(name: str) -> tuple[ClipEncoder | None, str | None]:
    """(encoder, None) or (None, reason). Loaded once per process; an unavailable model is announced once."""
    if name not in _LOADED:
        try:
            _LOADED[name] = load_clip(name)
            log.info("CLIP image features: %s", _LOADED[name].source)
        except ClipUnavailable as unavailable:
            _LOADED[name] = unavailable
            log.warning("Image features are skipped (images are still kept): %s", unavailable)
    loaded = _LOADED[name]
    return (None, str(loaded)) if isinstance(loaded, ClipUnavailable) else (loaded, None)


def forget_loaded_clip() -> None:
    """Drop the per-process cache (tests; or to retry after installing weights)."""
    _LOADED.clear()


def feature_path(image_path: Path) -> Path:
    """`<dir>/<sha256>.png` → `<dir>/<sha256>.clip.safetensors`."""
    return image_path.with_name(image_path.stem + FEATURE_SUFFIX)


def read_features(image_path: Path, source: str | None = None) -> torch.Tensor | None:
    """The stored embedding of an image, or None when absent (or made by another model than `source`)."""
    from safetensors import safe_open

    path = feature_path(Path(image_path))
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if source is not None and (handle.metadata() or {}).get("model") != source:
            return None
        return handle.get_tensor(FEATURE_KEY)


def ensure_features(encoder: ClipEncoder, image_paths: list[Path]) -> int:
    """Compute and save the features of the images that have none from this model (BATCH_SIZE images in memory at
    a time); returns how many were computed."""
    from safetensors.torch import save_file

    missing = [Path(p) for p in dict.fromkeys(image_paths) if read_features(Path(p), encoder.source) is None]
    for start in range(0, len(missing), BATCH_SIZE):
        chunk = missing[start:start + BATCH_SIZE]
        images = []
        for path in chunk:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        for path, embed in zip(chunk, encoder.image_embeddings(images)):
            target = feature_path(path)
            partial = target.with_name(target.name + ".tmp")
            save_file({FEATURE_KEY: embed.contiguous()}, str(partial), metadata={"model": encoder.source})
            partial.replace(target)
    return len(missing)


def image_features(encoder: ClipEncoder, image_paths: list[Path]) -> torch.Tensor:
    """[n, d] embeddings of stored images, read from their feature files (computed and saved first if absent)."""
    ensure_features(encoder, image_paths)
    if not image_paths:
        return torch.zeros(0, encoder.model.config.projection_dim)
    return torch.stack([read_features(Path(p), encoder.source) for p in image_paths])


def encode_stored_images(name: str, image_paths: list[Path]) -> ImageFeatureReport:
    """Features for every stored image, or the reason there are none; never raises for missing weights."""
    encoder, reason = clip_encoder(name)
    if encoder is None:
        return ImageFeatureReport(model=name, skipped_reason=reason)
    unique = list(dict.fromkeys(Path(p) for p in image_paths))
    computed = ensure_features(encoder, unique)
    log.info("CLIP image features: %d computed, %d reused (%s)", computed, len(unique) - computed, encoder.source)
    return ImageFeatureReport(model=encoder.source, computed=computed, reused=len(unique) - computed)

"""The image projector as files beside the PEFT adapter, so that one folder holds a whole multimodal adapter:

    <folder>/adapter_config.json + adapter_model.safetensors   the LoRA adapter (PeftModel.from_pretrained loads it,
                                                              and ignores the two files below)
    <folder>/projector.safetensors                             the projector's tensors (safetensors: no pickle)
    <folder>/projector_config.json                             what builds it (kind, sizes, soft tokens, seed)

`load_multimodal_adapter(base_model, folder)` restores both in one call.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fl_crew_reddit.runs import storage_errors
from fl_crew_reddit.training.multimodal import ImageProjector, ProjectorSpec, load_projector_state

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector_config.json"


def save_projector(projector: ImageProjector, folder: Path) -> Path:
    """Write projector.safetensors and projector_config.json into `folder` (each through a temporary file and a
    rename: a crash never leaves half a file under the final name)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / PROJECTOR_WEIGHTS
        partial = weights.with_name(weights.name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}, str(partial),
                  metadata={"format": "pt", "kind": projector.spec.kind})
        partial.replace(weights)
        config = folder / PROJECTOR_CONFIG
        partial = config.with_name(config.name + ".tmp")
        partial.write_text(projector.spec.to_json() + "\n", encoding="utf-8")
        partial.replace(config)
    return folder


def has_projector(folder: Path) -> bool:
    return (Path(folder) / PROJECTOR_CONFIG).is_file() or (Path(folder) / PROJECTOR_WEIGHTS).is_file()


def load_projector(folder: Path, device: torch.device | str = "cpu") -> ImageProjector | None:
    """The projector saved in `folder`, or None when the folder has none (a text-only adapter). One of its two
    files without the other, or files that do not fit each other, is an error naming the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config, weights = folder / PROJECTOR_CONFIG, folder / PROJECTOR_WEIGHTS
    if not config.is_file() and not weights.is_file():
        return None
    for present, absent in ((config, weights), (weights, config)):
        if present.is_file() and not absent.is_file():
            raise FileNotFoundError(f"{folder} has {present.name} but not {absent.name}: an incomplete projector")
    spec = ProjectorSpec.from_json(config.read_text(encoding="utf-8"), where=str(config))
    projector = ImageProjector(spec)
    load_projector_state(projector, load_file(str(weights), device="cpu"), where=str(weights))
    return projector.to(device)


def save_multimodal_adapter(peft_model, projector: ImageProjector | None, folder: Path) -> Path:
    """The PEFT adapter (save_pretrained, safetensors) and, when there is one, the projector beside it."""
    folder = Path(folder)
    with storage_errors(folder):
        peft_model.save_pretrained(folder, safe_serialization=True)
    if projector is not None:
        save_projector(projector, folder)
    return folder


def load_multimodal_adapter(base_model, folder: Path, *, is_trainable: bool = False):
    """(PeftModel, projector or None) from an adapter folder: the one call that restores a multimodal adapter.

    `PeftModel.from_pretrained(base_model, folder)` loads the LoRA weights as for any adapter; the projector, when
    the folder has one, comes back bit for bit, on the base model's device, and must fit its hidden size.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)
    device = base_model.get_input_embeddings().weight.device
    projector = load_projector(folder, device)
    if projector is not None:
        hidden = int(base_model.config.hidden_size)
        if projector.spec.hidden_size != hidden:
            raise ValueError(f"{Path(folder) / PROJECTOR_CONFIG}: the projector writes soft tokens of width "
                             f"{projector.spec.hidden_size}, the base model's hidden size is {hidden}")
        projector.requires_grad_(is_trainable)
    return model, projector

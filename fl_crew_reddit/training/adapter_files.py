"""A client's adapter and update as files, in PEFT's own format: what a trainer writes and the server reads.

    <folder>/adapter_config.json + adapter_model.safetensors   the client's adapter (PeftModel.from_pretrained loads it)
    <folder>/update.safetensors                               what travels when it is not the whole adapter: the B
                                                              factors (FFA-LoRA) or a compressed update
    <folder>/projector.safetensors + projector_config.json    multimodal: the image projector (its `mm_projector.`
                                                              keys of the state; training/projector_files.py)

Only safetensors is ever read back: no pickle runs on a client's update.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fl_crew_reddit.runs import ADAPTER_WEIGHTS, storage_errors

if TYPE_CHECKING:  # pragma: no cover
    import torch


def save_adapter(peft_model, state: dict[str, torch.Tensor], folder: Path, projector=None) -> Path:
    """Write `state` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); a state with
    projector keys (multimodal) also writes the projector beside it, through `projector` (the ImageProjector the
    keys load into: it holds them afterwards, as the model holds the adapter)."""
    from peft import set_peft_model_state_dict

    from fl_crew_reddit.training.multimodal import load_projector_state, split_projector
    from fl_crew_reddit.training.peft_setup import adapter_for_state, save_adapter_as

    state, projector_tensors = split_projector(state)
    if projector_tensors:
        if projector is None:
            raise ValueError(f"{folder}: the state carries image projector tensors but no projector was given")
        from fl_crew_reddit.training.projector_files import save_projector

        load_projector_state(projector, projector_tensors, where=f"the state saved to {folder}")
        save_projector(projector, folder)
    adapter = adapter_for_state(peft_model, state)  # a client of lower rank (CLIENT_LORA_RANKS): its own rank
    set_peft_model_state_dict(peft_model, state, adapter_name=adapter)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(folder):
        save_adapter_as(peft_model, adapter, folder)
    return folder


UPDATE_WEIGHTS = "update.safetensors"


def save_client_update(peft_model, global_adapter: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                       folder: Path, projector=None) -> Path:
    """A client's round result: its adapter as a PEFT folder, plus, when it sends only part of the adapter
    (FFA-LoRA: the B factors) or a compressed update (UPDATE_COMPRESSION), what it sends alone in
    `update.safetensors`: the file that travels to the server. For a compressed update the PEFT folder holds the
    adapter the server reconstructs from it (global + decompressed update); none when it cannot be decompressed
    (the server rejects that client with the reason)."""
    from fl_crew_reddit.aggregation.compression import payload_kind, payload_tensor_keys

    partial = set(sent) != set(global_adapter)
    kind = payload_kind(sent)
    if kind is not None:
        from fl_crew_reddit.aggregation.compression import decompress

        carried = payload_tensor_keys(sent)
        trained = {k: v for k, v in global_adapter.items() if k in carried}
        try:
            delta = decompress(sent, trained, kind)
        except ValueError:
            delta = None
        if delta is not None:
            rebuilt = {k: (global_adapter[k].float() + d).to(global_adapter[k].dtype) for k, d in delta.items()}
            save_adapter(peft_model, {**global_adapter, **rebuilt}, folder, projector)
    else:
        save_adapter(peft_model, {**global_adapter, **sent} if partial else sent, folder, projector)
    if partial:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        with storage_errors(folder):
            save_file({k: v.contiguous() for k, v in sent.items()}, str(Path(folder) / UPDATE_WEIGHTS))
    return folder


def update_file(folder: Path) -> Path:
    """The file of a client's folder that the server reads: update.safetensors when present, else the adapter."""
    partial = Path(folder) / UPDATE_WEIGHTS
    return partial if partial.is_file() else Path(folder) / ADAPTER_WEIGHTS


def load_client_update(folder: Path) -> dict[str, torch.Tensor]:
    """What a client sent, through safetensors only: no pickle ever runs on a client's update. A whole adapter
    with a projector beside it comes back with the projector's tensors under `mm_projector.`."""
    from safetensors.torch import load_file

    path = update_file(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a PEFT adapter folder written with safetensors")
    state = load_file(str(path), device="cpu")
    projector_file = Path(folder) / "projector.safetensors"  # projector_files.PROJECTOR_WEIGHTS
    if path.name != UPDATE_WEIGHTS and projector_file.is_file():
        from fl_crew_reddit.training.multimodal import PROJECTOR_PREFIX

        state.update({PROJECTOR_PREFIX + k: v for k, v in load_file(str(projector_file), device="cpu").items()})
    return state

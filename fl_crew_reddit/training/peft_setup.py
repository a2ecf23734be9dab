"""Wrap the base model with LoRA adapters (PEFT), the only weights that train and travel."""
from __future__ import annotations

from contextlib import contextmanager

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig

AUTO_CHECKPOINTING_PARAMS = 1_000_000_000  # GRADIENT_CHECKPOINTING=auto: on from 1B parameters, on CUDA


def lora_config(config: FLCrewRedditConfig, target_modules: str | list[str] | None = None) -> LoraConfig:
    """LoRA settings of the run. `target_modules` replaces LORA_TARGET_MODULES where the caller has resolved them
    itself (a vision-language base: a regex that keeps LoRA inside its language model, `training.vlm`)."""
    targets = config.lora_target_modules
    if target_modules is None:
        target_modules = "all-linear" if targets == ["all-linear"] else targets
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules=target_modules)


def check_target_modules(base_model, config: FLCrewRedditConfig) -> None:
    """Raise ConfigError naming each LORA_TARGET_MODULES entry that matches no module of the base model (PEFT's
    rule: a module's full name, or its name's last dotted parts), and the model's linear layers to choose from.

    PEFT itself only refuses a list that matches nothing at all, so a typo next to a good name (q_proj,v_prj) would
    otherwise train a smaller adapter than asked for without a word."""
    targets = config.lora_target_modules
    if targets == ["all-linear"]:
        return
    names = [name for name, _ in base_model.named_modules() if name]
    unmatched = [target for target in targets
                 if not any(name == target or name.endswith("." + target) for name in names)]
    if not unmatched:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in base_model.named_modules()
                     if name and _is_linear(module)})
    raise ConfigError(f"LORA_TARGET_MODULES={','.join(targets)}: {', '.join(unmatched)} "
                      f"{'matches' if len(unmatched) == 1 else 'match'} no module of {config.base_llm_model}; "
                      f"its linear layers are {', '.join(linear) or 'none'} (or use all-linear)")


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def parameter_count(model) -> int:
    """Parameters of the model as trained, counting 4-bit packed weights (two values a byte) at their true size."""
    total = 0
    for parameter in model.parameters():
        packed = type(parameter).__name__ == "Params4bit"
        total += parameter.numel() * (2 if packed else 1)
    return total


def wants_checkpointing(base_model, setting) -> bool:
    """GRADIENT_CHECKPOINTING: true/false as set; auto: on CUDA for models of 1B+ parameters, where activations
    rather than weights fill the GPU (a 7B shape at 16 × 153 tokens: 18.1 GiB with it)."""
    if setting != "auto":
        return bool(setting)
    on_cuda = any(p.device.type == "cuda" for p in base_model.parameters())
    return on_cuda and parameter_count(base_model) >= AUTO_CHECKPOINTING_PARAMS


def build_peft_model(base_model, config: FLCrewRedditConfig):
    """PEFT LoRA around the base model; QLoRA's k-bit preparation and gradient checkpointing when configured.

    Gradient checkpointing keeps only each decoder layer's input and recomputes the rest in the backward pass:
    activation memory drops from O(layers x sequence x hidden x ~20) to about one layer's worth, for ~30% more
    compute. The non-reentrant variant needs no `enable_input_require_grads` trick for frozen embeddings.
    """
    check_target_modules(base_model, config)  # a bad LORA_TARGET_MODULES stops here, before any data work
    checkpointing = wants_checkpointing(base_model, config.gradient_checkpointing)
    if config.use_quantization:
        base_model = prepare_model_for_kbit_training(
            base_model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        base_model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    try:
        model = get_peft_model(base_model, lora_config(config))
    except ValueError as error:  # e.g. a target that names a module PEFT cannot wrap (a whole decoder layer)
        if "target module" not in str(error).lower():
            raise
        reason = " ".join(str(error).split())
        raise ConfigError(f"LORA_TARGET_MODULES={','.join(config.lora_target_modules)} cannot be used with "
                          f"{config.base_llm_model}: {reason}") from error
    return model


# --- clients of lower rank (CLIENT_LORA_RANKS): one PEFT adapter per rank on the same model -------------------------
def adapter_for_state(model, state) -> str:
    """The name of `model`'s LoRA adapter that has the rank of `state` (an adapter state dict, PEFT's keys): "default"
    at the model's own rank (LORA_R), else "rank-<r>", added on first use with the default adapter's settings and rank
    r (the RNG is left as it was: the added adapter's random init does not shift later draws). A client that receives
    the global adapter truncated to its rank (aggregation/mixed_rank.py) trains a real rank-r LoRA this way."""
    import copy

    import torch

    from fl_crew_reddit.aggregation.lora_exact import lora_pairs
    from fl_crew_reddit.aggregation.mixed_rank import adapter_rank

    default = model.peft_config["default"]
    try:
        paired = bool(lora_pairs(list(state)))
    except ValueError:  # factors without partners (only B, as FFA-LoRA sends): not a rank of their own
        paired = False
    if not paired:  # the model's own adapter (PEFT itself says what does not fit it)
        return "default"
    rank = adapter_rank(state)
    if rank == default.r:
        return "default"
    if rank > default.r:
        raise ValueError(f"an adapter of rank {rank} cannot be loaded into a model of LORA_R={default.r}: the global "
                         "adapter keeps the largest rank")
    name = f"rank-{rank}"
    if name not in model.peft_config:
        config = copy.deepcopy(default)
        config.r = rank
        config.inference_mode = False
        active = model.active_adapter
        with torch.random.fork_rng():
            model.add_adapter(name, config)
        model.set_adapter(active)  # only the active adapter trains
    return name


@contextmanager
def active_adapter_for(model, state):
    """For one fit: the adapter of `state`'s rank is the active (and only trainable) one; "default" again on exit."""
    name = adapter_for_state(model, state)
    if name == "default":
        yield name
        return
    model.set_adapter(name)
    try:
        yield name
    finally:
        model.set_adapter("default")


def save_adapter_as(model, name: str, folder) -> None:
    """Save the adapter `name` as a PEFT folder of its own (adapter_config.json with its rank, and its weights):
    `PeftModel.from_pretrained(base, folder)` loads it. PEFT puts a non-default adapter in a subfolder named after it;
    it is moved to `folder` itself."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    if name == "default":
        model.save_pretrained(folder, safe_serialization=True, selected_adapters=["default"])
        return
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, selected_adapters=[name])
        for item in (staging / name).iterdir():
            item.replace(folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

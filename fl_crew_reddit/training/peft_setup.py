"""Wrap the base model with LoRA adapters (PEFT), the only weights that train and travel."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig

AUTO_CHECKPOINTING_PARAMS = 1_000_000_000  # GRADIENT_CHECKPOINTING=auto: on from 1B parameters, on CUDA


def lora_config(config: FLCrewRedditConfig) -> LoraConfig:
    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules="all-linear" if targets == ["all-linear"] else targets)


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

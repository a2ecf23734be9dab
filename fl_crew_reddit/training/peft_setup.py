"""Wrap the base model with LoRA adapters (PEFT), the only weights that train and travel."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from fl_crew_reddit.config import FLCrewRedditConfig

AUTO_CHECKPOINTING_PARAMS = 1_000_000_000  # GRADIENT_CHECKPOINTING=auto: on from 1B parameters, on CUDA


def lora_config(config: FLCrewRedditConfig) -> LoraConfig:
    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules="all-linear" if targets == ["all-linear"] else targets)


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
    checkpointing = wants_checkpointing(base_model, config.gradient_checkpointing)
    if config.use_quantization:
        base_model = prepare_model_for_kbit_training(
            base_model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        base_model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    model = get_peft_model(base_model, lora_config(config))
    return model

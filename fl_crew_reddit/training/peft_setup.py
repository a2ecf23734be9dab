"""Wrap the base model with LoRA adapters (PEFT), the only weights that train and travel."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from fl_crew_reddit.config import FLCrewRedditConfig


def lora_config(config: FLCrewRedditConfig) -> LoraConfig:
    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules="all-linear" if targets == ["all-linear"] else targets)


def build_peft_model(base_model, config: FLCrewRedditConfig):
    """PEFT LoRA around the base model; QLoRA's k-bit preparation and gradient checkpointing when configured.

    Gradient checkpointing keeps only each decoder layer's input and recomputes the rest in the backward pass:
    activation memory drops from O(layers x sequence x hidden x ~20) to about one layer's worth, for ~30% more
    compute. The non-reentrant variant needs no `enable_input_require_grads` trick for frozen embeddings.
    """
    checkpointing = config.gradient_checkpointing
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

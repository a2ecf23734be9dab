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
    if config.use_quantization:
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    model = get_peft_model(base_model, lora_config(config))
    return model

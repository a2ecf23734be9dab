"""Base-model resolution: local folders load, broken folders and unreachable hub ids fail with one clear sentence."""
import pytest
import torch

from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.training.model_loading import BaseModelUnavailable, load_base_model, resolve_base_model


def test_local_folder_loads_with_a_pad_token(tiny_model_dir):
    model, tokenizer = load_base_model(FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), device="cpu"))
    assert tokenizer.pad_token is not None
    assert next(model.parameters()).device == torch.device("cpu")
    assert resolve_base_model(str(tiny_model_dir)) == str(tiny_model_dir)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(BaseModelUnavailable, match="without config.json"):
        resolve_base_model(str(tmp_path))


def test_unreachable_hub_id_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = FLCrewRedditConfig(base_llm_model="mistralai/Mistral-7B-v0.1", device="cpu")
    with pytest.raises(BaseModelUnavailable) as raised:
        load_base_model(config)
    message = str(raised.value)
    assert "BASE_LLM_MODEL=mistralai/Mistral-7B-v0.1" in message and "local model folder" in message

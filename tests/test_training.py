"""The local LoRA recipe on a tiny random Llama: it learns, starts from the global adapter, returns only adapter
weights, honours FedProx, and its fast loss equals the plain masked causal-LM loss."""
import torch
from peft import get_peft_model_state_dict

from fl_crew_reddit.training.batching import collate, reply_token_nll, tokenize_all
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter, warmup_cosine

CPU = torch.device("cpu")


def _rows(tokenizer, n=8):
    examples = [{"messages": [{"role": "user", "content": f"Question {i} about tomatoes?"},
                              {"role": "assistant", "content": "Water them deeply once a week and mulch."}]}
                for i in range(n)]
    return tokenize_all(tokenizer, examples, 128)


def _fit_config(**overrides):
    config = {"local_epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "seed": 0, "round": 1, "proximal_mu": 0.0}
    config.update(overrides)
    return config


def test_fast_reply_loss_equals_plain_masked_loss(tiny_model):
    model, tokenizer = tiny_model
    rows = _rows(tokenizer, 3)
    rows[1] = {**rows[1], "input_ids": rows[1]["input_ids"][:-3], "reply_mask": rows[1]["reply_mask"][:-3]}
    batch = collate(rows, tokenizer.pad_token_id, CPU)
    nll, count = reply_token_nll(model, batch)
    labels = batch["input_ids"].masked_fill(~batch["reply_mask"], -100)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert count == int(batch["reply_mask"][:, 1:].sum())
    torch.testing.assert_close(nll / count, reference, rtol=1e-5, atol=1e-5)


def test_fit_learns_and_returns_only_adapter_weights(tiny_model):
    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    global_adapter = snapshot_adapter(model)
    result = LocalTrainer("c0", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False).fit(
        global_adapter, _fit_config(local_epochs=10, learning_rate=1e-2))
    assert set(result.state) == set(global_adapter) and all("lora_" in key for key in result.state)
    assert result.num_examples == len(rows)
    assert result.metrics["steps"] == 20
    # a random tiny head caps how low it can go
    assert result.metrics["train_loss"] < result.metrics["first_loss"] - 0.5
    assert any(not torch.equal(result.state[k], global_adapter[k]) for k in result.state)


def test_fit_starts_from_the_given_global_adapter(tiny_model):
    model, tokenizer = tiny_model
    rows = _rows(tokenizer, 4)
    trainer = LocalTrainer("c0", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False)
    start = {k: torch.randn_like(v) * 0.01 for k, v in snapshot_adapter(model).items()}
    result = trainer.fit(start, _fit_config(learning_rate=1e-12, local_epochs=1))
    for key in start:
        torch.testing.assert_close(result.state[key], start[key], atol=1e-6, rtol=0)


def test_fedprox_keeps_the_update_closer_to_the_global_adapter(tiny_model):
    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    start = snapshot_adapter(model)
    trainer = LocalTrainer("c0", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False)

    def distance(state):
        return sum(float((state[k] - start[k]).norm() ** 2) for k in start) ** 0.5

    free = trainer.fit(start, _fit_config(proximal_mu=0.0)).state
    prox = trainer.fit(start, _fit_config(proximal_mu=100.0)).state
    assert distance(prox) < 0.8 * distance(free)


def test_training_is_deterministic_for_a_seed(tiny_model):
    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    start = snapshot_adapter(model)
    trainer = LocalTrainer("c0", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False)
    first = trainer.fit(start, _fit_config()).state
    second = trainer.fit(start, _fit_config()).state
    for key in first:
        torch.testing.assert_close(first[key], second[key])


def test_warmup_cosine_schedule_shape():
    values = [warmup_cosine(step, total=100, warmup=10) for step in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert values[10] > values[50] > values[99] >= 0.1
    assert get_peft_model_state_dict  # PEFT's own state-dict API is what the trainer uses


def test_client_past_its_timeout_stops_with_a_clear_error(tiny_model):
    import pytest

    model, tokenizer = tiny_model
    trainer = LocalTrainer("slow-client", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no",
                           show_progress=False)
    with pytest.raises(TimeoutError, match="slow-client ran past CLIENT_TIMEOUT=1e-09s after 0 of 6 steps"):
        trainer.fit(snapshot_adapter(model), _fit_config(timeout_s=1e-9))


def test_ffa_lora_trains_only_b_and_sends_only_b(tiny_model):
    # Prepare: a global adapter with non-zero B, so A's gradient would be non-zero if A were trainable
    model, tokenizer = tiny_model
    global_adapter = {k: (v + 0.05 if "lora_B" in k else v) for k, v in snapshot_adapter(model).items()}
    # Execute
    result = LocalTrainer("c", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no",
                          show_progress=False).fit(global_adapter, _fit_config(train_lora_a=False))
    # Assert: only B travels, B moved, A in the model is exactly the global A, and A is trainable again afterwards
    assert result.state and all("lora_B" in k for k in result.state)
    assert sorted(result.state) == sorted(k for k in global_adapter if "lora_B" in k)
    assert any(not torch.equal(result.state[k], global_adapter[k]) for k in result.state)
    after = snapshot_adapter(model)
    for key in (k for k in global_adapter if "lora_A" in k):
        assert torch.equal(after[key], global_adapter[key]), key
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir):
    # Prepare: two copies of the same model and adapter, one recomputing activations in the backward pass
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model

    results = {}
    for checkpointing in (False, True):
        config = FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                    device="cpu", gradient_checkpointing=checkpointing)
        base, tokenizer = load_base_model(config, CPU)
        torch.manual_seed(0)
        model = build_peft_model(base, config)
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        start = snapshot_adapter(model)
        # Execute
        results[checkpointing] = LocalTrainer("c", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no",
                                              show_progress=False).fit(start, _fit_config(local_epochs=1)).state
    # Assert
    for key, value in results[False].items():
        torch.testing.assert_close(results[True][key], value, rtol=1e-4, atol=1e-6, msg=key)

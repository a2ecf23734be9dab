"""The GPU-speed parts of the trainer, checked on the CPU with a tiny random Llama: packed batches give the same
loss, gradients and trained adapter as padded ones; the chunked output layer gives the same loss and gradients as
full logits; token-budget batches cover every row once within budget; gradient accumulation equals one big batch;
a step reads nothing back from the device (losses are read every `log_every` steps)."""
import random

import pytest
import torch

from fl_crew_reddit.training.batching import (
    batch_counts,
    collate,
    linear_cross_entropy,
    pack,
    reply_token_nll,
    token_budget_batches,
    tokenize_all,
)
from fl_crew_reddit.training.packing import PackInfo, packed_attention_enabled
from fl_crew_reddit.training.trainer import LocalTrainer, activation_bytes_per_token, snapshot_adapter

CPU = torch.device("cpu")


def _model(tiny_model_dir, checkpointing=False, dropout=0.0):
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model

    config = FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=dropout,
                                device="cpu", gradient_checkpointing=checkpointing)
    base, tokenizer = load_base_model(config, CPU)
    torch.manual_seed(0)
    model = build_peft_model(base, config)
    # a non-zero B, so the adapter changes the outputs and A gets gradients too
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model, tokenizer


def _rows(tokenizer, n=10):
    """Examples of different lengths (different prompts and replies), so packing and padding differ."""
    examples = [{"messages": [{"role": "user", "content": f"Question {i} about tomatoes" + " and peppers" * (i % 4)},
                              {"role": "assistant", "content": "Water them deeply once a week" + ", then mulch" * i}]}
                for i in range(n)]
    return tokenize_all(tokenizer, examples, 128)


def _fit_config(**overrides):
    config = {"local_epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "seed": 0, "round": 1, "proximal_mu": 0.0}
    config.update(overrides)
    return config


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_loss_and_gradients_equal_padded(tiny_model_dir, backend):
    model, tokenizer = _model(tiny_model_dir)
    rows = _rows(tokenizer, 5)
    params = [p for p in model.parameters() if p.requires_grad]

    padded = collate(rows, tokenizer.pad_token_id, CPU)
    nll_padded, count_padded = reply_token_nll(model, padded)
    grads_padded = torch.autograd.grad(nll_padded, params)
    with packed_attention_enabled(model), torch.set_grad_enabled(backend != "flex"):  # CPU flex: forward only
        packed = pack(rows, CPU, pad_to=sum(len(r["input_ids"]) for r in rows) + 7, pad_id=tokenizer.pad_token_id)
        nll_packed, count_packed = reply_token_nll(model, packed, backend=backend)
        grads_packed = torch.autograd.grad(nll_packed, params) if backend != "flex" else grads_padded

    assert count_packed == count_padded == batch_counts(rows)[1] > 0
    assert packed["input_ids"].shape == (1, packed["tokens"] + 7)  # the filler carries no loss
    torch.testing.assert_close(nll_packed / count_packed, nll_padded / count_padded, rtol=1e-5, atol=1e-5)
    for packed_grad, padded_grad in zip(grads_packed, grads_padded):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)


def test_packing_without_document_mask_would_differ(tiny_model_dir):
    """The check above can fail: causal attention over the whole packed row (examples seeing each other) differs."""
    model, tokenizer = _model(tiny_model_dir)
    rows = _rows(tokenizer, 3)
    padded = collate(rows, tokenizer.pad_token_id, CPU)
    nll_padded, _ = reply_token_nll(model, padded)
    packed = pack(rows, CPU)
    total = packed["input_ids"].shape[1]
    causal_only = PackInfo(packed["cu_seqlens"], total, "sdpa", torch.ones(total, total, dtype=torch.bool).tril())
    decoder = model.get_base_model().get_decoder()
    with packed_attention_enabled(model):
        hidden = decoder(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         fl_packing=causal_only).last_hidden_state[0]
    selected = hidden.index_select(0, packed["target_index"])
    leaky = linear_cross_entropy(selected, model.get_base_model().get_output_embeddings(), packed["targets"])
    assert abs(float(leaky) - float(nll_padded)) > 1e-3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_fit_trains_the_same_adapter_as_padded(tiny_model_dir, checkpointing):
    results = {}
    for packing in ("off", "on"):
        model, tokenizer = _model(tiny_model_dir, checkpointing=checkpointing)
        start = snapshot_adapter(model)
        trainer = LocalTrainer("c", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no", show_progress=False)
        results[packing] = trainer.fit(start, _fit_config(packing=packing))
    assert results["on"].metrics["steps"] == results["off"].metrics["steps"] == 6
    assert results["on"].metrics["tokens"] == results["off"].metrics["tokens"]
    assert abs(results["on"].metrics["train_loss"] - results["off"].metrics["train_loss"]) < 1e-5
    for key, value in results["off"].state.items():
        torch.testing.assert_close(results["on"].state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(results["on"].state[k], start[k]) for k in start)


def test_chunked_output_layer_equals_full_logits():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    reference = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(reference * 0.5, (hidden, head.weight))
    chunked = linear_cross_entropy(hidden, head, targets, chunk_rows=8)  # 5 chunks, the last one short
    got_h, got_w = torch.autograd.grad(chunked * 0.5, (hidden, head.weight))

    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradient is computed or kept
        torch.testing.assert_close(linear_cross_entropy(hidden, head, targets, chunk_rows=8), reference.detach())


def test_chunked_output_layer_under_bf16_autocast_matches_linear():
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(20, 32)
    targets = torch.randint(0, 64, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
        chunked = linear_cross_entropy(hidden, head, targets, chunk_rows=6)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_batches_cover_every_row_once_within_budget(tiny_model_dir, packed):
    from transformers import AutoTokenizer

    rows = _rows(AutoTokenizer.from_pretrained(tiny_model_dir), 40)
    budget = 2 * max(len(r["input_ids"]) for r in rows)
    batches = token_budget_batches(rows, budget, random.Random(3), packed=packed)
    seen = sorted(id(row) for batch in batches for row in batch)
    assert seen == sorted(id(row) for row in rows)
    for batch in batches:
        lengths = [len(r["input_ids"]) for r in batch]
        cost = sum(lengths) if packed else max(lengths) * len(lengths)
        assert cost <= budget or len(batch) == 1
    assert len(batches) < len(rows) / 1.5  # several rows per batch: the budget, not one example, sets the size
    again = token_budget_batches(rows, budget, random.Random(3), packed=packed)
    assert [[id(r) for r in b] for b in again] == [[id(r) for r in b] for b in batches]


def test_fit_with_a_token_budget_on_the_cpu(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    rows = _rows(tokenizer, 12)
    budget = 8 * max(len(r["input_ids"]) for r in rows)
    trainer = LocalTrainer("c", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False)
    steps, _, packed, _, _ = trainer.plan(_fit_config(tokens_per_batch=budget))
    assert not packed  # the CPU keeps padded, length-grouped batches unless packing is asked for
    result = trainer.fit(snapshot_adapter(model), _fit_config(tokens_per_batch=budget))
    assert result.metrics["steps"] == len(steps) < 2 * len(rows) / 4  # fewer, fuller steps than BATCH_SIZE=4
    assert result.metrics["tokens"] == 2 * sum(len(r["input_ids"]) for r in rows)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir):
    results = []
    for split in (False, True):
        model, tokenizer = _model(tiny_model_dir)
        rows = _rows(tokenizer, 6)
        trainer = LocalTrainer("c", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False)
        steps = [[rows[:2], rows[2:]]] if split else [[rows]]
        trainer.plan = lambda config, steps=steps: (steps, len(steps[0]), True, 0, False)
        results.append(trainer.fit(snapshot_adapter(model), _fit_config(grad_accum_steps=2 if split else 1)))
    assert results[0].metrics["steps"] == results[1].metrics["steps"] == 1
    assert abs(results[0].metrics["train_loss"] - results[1].metrics["train_loss"]) < 1e-5
    for key, value in results[0].state.items():
        torch.testing.assert_close(results[1].state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_steps_read_losses_from_the_device_only_every_log_every_steps(tiny_model_dir, monkeypatch):
    model, tokenizer = _model(tiny_model_dir)
    rows = _rows(tokenizer, 20)
    records = []
    trainer = LocalTrainer("c", model, tokenizer, rows, CPU, mixed_precision="no", show_progress=False,
                           on_step=records.append)
    reads = {"tolist": 0, "scalar": 0}
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads["tolist"] += 1
        return original_tolist(self)

    def scalar_read(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            reads["scalar"] += 1
            return original(self, *args)
        return read

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    for name in ("item", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, scalar_read(name))
    result = trainer.fit(snapshot_adapter(model), _fit_config(packing="on", log_every=4, local_epochs=2))
    monkeypatch.undo()

    assert result.metrics["steps"] == 10
    assert reads == {"tolist": 3, "scalar": 0}  # reads after steps 4, 8 and the last (10); nothing inside a step
    assert [r["step"] for r in records] == list(range(1, 11))
    assert len({r["time"] for r in records[:4]}) == 1 and records[4]["time"] > records[3]["time"]
    assert records[0]["loss"] == result.metrics["first_loss"]
    assert sum(r["tokens"] for r in records) == result.metrics["tokens"]


def test_a_non_finite_loss_still_stops_the_fit(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    start = {k: v * float("nan") if "lora_B" in k else v for k, v in snapshot_adapter(model).items()}
    trainer = LocalTrainer("c", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no", show_progress=False)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.fit(start, _fit_config(packing="on", log_every=3))


def test_auto_gradient_checkpointing_and_memory_estimate(tiny_model_dir):
    from fl_crew_reddit.training.peft_setup import parameter_count, wants_checkpointing

    model, _ = _model(tiny_model_dir)
    base = model.get_base_model()
    assert not wants_checkpointing(base, "auto")  # tiny, and on the CPU
    assert wants_checkpointing(base, True) and not wants_checkpointing(base, False)
    assert parameter_count(base) == sum(p.numel() for p in base.parameters())
    plain = activation_bytes_per_token(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert 0 < activation_bytes_per_token(model) < plain


def test_compiled_layers_train_the_same_adapter(tiny_model_dir, monkeypatch):
    """COMPILE=on: every decoder layer compiled (here with the aot_eager backend: dynamo and autograd tracing
    without a C++ compiler), packed batches padded to the budget; the adapter equals the eager one."""
    from fl_crew_reddit.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "aot_eager")
    results = {}
    for mode in ("off", "on"):
        model, tokenizer = _model(tiny_model_dir)
        start = snapshot_adapter(model)
        trainer = LocalTrainer("c", model, tokenizer, _rows(tokenizer), CPU, mixed_precision="no", show_progress=False)
        config = _fit_config(packing="on", compile=mode, tokens_per_batch=256)
        assert trainer.plan(config)[3] == (256 if mode == "on" else 0)  # compiled: one fixed shape
        results[mode] = trainer.fit(start, config)
        layers = model.get_base_model().get_decoder().layers
        assert all(layer._compiled_call_impl is None for layer in layers)  # eager again after the fit
    assert abs(results["on"].metrics["train_loss"] - results["off"].metrics["train_loss"]) < 1e-5
    for key, value in results["off"].state.items():
        torch.testing.assert_close(results["on"].state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_auto_only_where_it_was_measured_to_pay():
    """COMPILE=auto: on for CUDA + packed + under 1B parameters + a fit of 4M tokens or more (the H200 run:
    1.57x at 135M after a 33 s compile); off on the CPU, unpacked, for big models and short fits."""
    from fl_crew_reddit.training.trainer import resolve_compile

    cuda = torch.device("cuda")
    assert resolve_compile("auto", cuda, True, 135_000_000, 5_000_000)
    assert not resolve_compile("auto", cuda, True, 135_000_000, 100_000)  # compile would not pay back
    assert not resolve_compile("auto", cuda, True, 7_000_000_000, 50_000_000)  # not measured to pay
    assert not resolve_compile("auto", cuda, False, 135_000_000, 5_000_000)  # unpacked shapes vary
    assert not resolve_compile("auto", CPU, True, 135_000_000, 5_000_000)
    assert not resolve_compile("off", cuda, True, 135_000_000, 5_000_000)
    assert resolve_compile("on", CPU, False)

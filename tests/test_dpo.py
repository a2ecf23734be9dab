"""DPO on a tiny random Llama: the loss is the paper's, log-probs count reply tokens only, the reference is the
received global adapter (or the base model for held-out metrics) without a second model copy, a DPO fit learns the
preferences, and the federated contract holds (fallback to SFT, non-finite loss, determinism, FFA-LoRA, FedProx)."""
import math

import pytest
import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict

from fl_crew_reddit.training import trainer as trainer_module
from fl_crew_reddit.training.batching import collate, tokenize_all
from fl_crew_reddit.training.dpo import (
    batch_reply_logprobs,
    dpo_loss,
    ipo_loss,
    pair_batch,
    pair_logprobs,
    preference_metrics,
    reply_logprobs,
    rpo_loss,
    tokenize_pairs,
)
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter

CPU = torch.device("cpu")
GOOD = ["Water them deeply once a week and mulch.", "Mulch well and water deeply each week.",
        "Deep weekly watering and good mulch."]
BAD = ["Paint the pots blue every hour!", "Never water, only shout at them.", "Blue paint, hourly, no mulch."]


def _pairs(n=8, offset=0):
    return [{"id": f"p{i}", "post_id": f"t{i}", "subreddit": "gardening", "kind": "votes",
             "prompt": [{"role": "user", "content": f"Question {i + offset} about tomatoes?"}],
             "chosen": GOOD[i % 3], "rejected": BAD[i % 3], "chosen_id": f"c{i}", "rejected_id": f"r{i}",
             "chosen_score": 40, "rejected_score": 2} for i in range(n)]


def _sft_rows(tokenizer, n=8):
    examples = [{"messages": [{"role": "user", "content": f"Question {i} about tomatoes?"},
                              {"role": "assistant", "content": GOOD[i % 3]}]} for i in range(n)]
    return tokenize_all(tokenizer, examples, 128)


def _fit_config(**overrides):
    config = {"local_epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "seed": 0, "round": 1, "proximal_mu": 0.0,
              "objective": "dpo", "dpo_beta": 0.1, "min_pairs": 4}
    config.update(overrides)
    return config


def _trainer(model, tokenizer, pairs=None, name="c0", rows=None):
    return LocalTrainer(name, model, tokenizer, rows if rows is not None else _sft_rows(tokenizer), CPU,
                        mixed_precision="no", show_progress=False,
                        pair_rows=pairs if pairs is not None else tokenize_pairs(tokenizer, _pairs(), 128))


def _separate_copy(tiny_model_dir, adapter=None):
    """A second model loaded from disk: only tests may hold one (the product never does)."""
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model

    config = FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4, lora_alpha=8, device="cpu")
    base, _ = load_base_model(config, CPU)
    if adapter is None:
        return base.eval()
    model = build_peft_model(base, config)
    set_peft_model_state_dict(model, adapter)
    return model.eval()


def _assert_reference_is(reference, reference_model, pairs, tokenizer):
    """The trainer's (chosen, rejected) reference log-probs equal those of `reference_model`, computed apart;
    returns that model's chosen log-probs for further comparisons."""
    with torch.no_grad():
        chosen = reply_logprobs(reference_model, [p["chosen"] for p in pairs], CPU, tokenizer.pad_token_id)
        rejected = reply_logprobs(reference_model, [p["rejected"] for p in pairs], CPU, tokenizer.pad_token_id)
    torch.testing.assert_close(reference[0], chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reference[1], rejected, rtol=1e-5, atol=1e-4)
    return chosen


def _random_adapter(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in snapshot_adapter(model).items()}


def test_dpo_loss_matches_a_hand_computed_value():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5)
    # rewards 0.5·(π − ref): chosen (0.25, 0), rejected (−0.25, 0.25); margins 0.5 and −0.25
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.25, 0.25]))
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.25))) / 2  # mean −log σ(margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.6500082, abs=1e-6)
    # equal policy and reference: every pair at −log σ(0) = log 2
    same = dpo_loss(policy_chosen, policy_rejected, policy_chosen, policy_rejected, 0.1)[0]
    assert same.item() == pytest.approx(math.log(2))


def test_rpo_loss_adds_the_chosen_replys_per_token_nll():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    loss, chosen_rewards, rejected_rewards, chosen_nll = rpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5, torch.tensor([4, 10]), 2.0)
    # DPO part as in the test above (0.6500082); NLL per token of the chosen replies: 1/4 and 2/10
    torch.testing.assert_close(chosen_nll, torch.tensor([0.25, 0.2]))
    assert loss.item() == pytest.approx(0.6500082 + 2.0 * (0.25 + 0.2) / 2, abs=1e-6)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.25, 0.25]))
    plain = rpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5, torch.tensor([4, 10]), 0.0)[0]
    assert torch.equal(plain, dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5)[0])


def test_ipo_loss_matches_a_hand_computed_value():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    chosen_targets, rejected_targets = torch.tensor([4, 10]), torch.tensor([2, 5])
    loss, chosen_rewards, rejected_rewards = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5,
                                                      chosen_targets, rejected_targets)
    # per-token log-ratios: chosen 0.5/4 and 0/10, rejected −0.5/2 and 0.5/5; margins 0.375 and −0.1; target 1/(2·0.5)
    assert loss.item() == pytest.approx(((0.375 - 1) ** 2 + (-0.1 - 1) ** 2) / 2, rel=1e-6)
    # the rewards are DPO's (β times the summed log-ratio), so metrics compare across losses
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.25, 0.25]))
    # through rpo_loss: the same loss plus the SFT term; a pair exactly at the target costs nothing
    with_nll = rpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5, chosen_targets, 1.0, "ipo",
                        rejected_targets)[0]
    assert with_nll.item() == pytest.approx(loss.item() + (0.25 + 0.2) / 2, rel=1e-6)
    at_target = ipo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5,
                         torch.tensor([3]), torch.tensor([2]))[0]
    assert at_target.item() == 0.0
    with pytest.raises(ValueError, match="unknown DPO loss type 'hinge'"):
        rpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5, chosen_targets, 0.0, "hinge")


def test_rpo_loss_on_the_tiny_model_matches_a_hand_computed_value_and_its_nll_reaches_lora(tiny_model):
    # Prepare: a non-zero adapter (so both LoRA factors get gradients), 3 pairs, a reference that differs
    model, tokenizer = tiny_model
    set_peft_model_state_dict(model, _random_adapter(model, scale=0.2))
    model.eval()
    pairs = tokenize_pairs(tokenizer, _pairs(3), 128)
    reference = (torch.tensor([-40.0, -35.0, -30.0]), torch.tensor([-45.0, -50.0, -41.0]))
    # Execute: the trainer's path (one batch of chosen + rejected rows, reply positions only)
    batch, counts = pair_batch(pairs, CPU, tokenizer.pad_token_id)
    logps = batch_reply_logprobs(model, batch, counts)
    loss, _, _, chosen_nll = rpo_loss(logps[:3], logps[3:], reference[0], reference[1], 0.1,
                                      torch.tensor(counts[:3]), 0.5)
    # Assert: by hand from the full logits, row by row
    expected = 0.0
    for i, pair in enumerate(pairs):
        sums, tokens = [], 0
        for side in ("chosen", "rejected"):
            row = pair[side]
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()[0]
            mask = torch.tensor(row["reply_mask"][1:], dtype=torch.bool)
            token_logps = F.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)[mask]
            sums.append(float(token_logps.sum()))
            tokens = tokens or int(mask.sum())
        margin = 0.1 * ((sums[0] - float(reference[0][i])) - (sums[1] - float(reference[1][i])))
        expected += (math.log1p(math.exp(-margin)) + 0.5 * (-sums[0] / tokens)) / 3
        assert float(chosen_nll[i]) == pytest.approx(-sums[0] / tokens, rel=1e-4)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the NLL term alone (α · mean NLL) has a gradient on both LoRA factors
    nll_term = loss - rpo_loss(logps[:3], logps[3:], reference[0], reference[1], 0.1, torch.tensor(counts[:3]), 0.0)[0]
    nll_term.backward()
    for factor in ("lora_A", "lora_B"):
        grads = [p.grad for n, p in model.named_parameters() if factor in n and p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), factor


def test_sft_weight_zero_is_todays_dpo_bit_for_bit_and_a_weight_keeps_the_chosen_replies_likely(tiny_model,
                                                                                                  monkeypatch):
    model, tokenizer = tiny_model
    pairs = tokenize_pairs(tokenizer, _pairs(), 128)
    start = snapshot_adapter(model)
    config = _fit_config(learning_rate=1e-2)
    zero = _trainer(model, tokenizer, pairs).fit(start, {**config, "dpo_sft_weight": 0.0})
    weighted = _trainer(model, tokenizer, pairs).fit(start, {**config, "dpo_sft_weight": 5.0})
    absent = _trainer(model, tokenizer, pairs).fit(start, config)  # a fit config from before the setting

    def todays_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, chosen_targets, sft_weight,
                   loss_type, rejected_targets):
        assert loss_type == "sigmoid"  # DPO_LOSS_TYPE's default
        return (*dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta),
                torch.zeros_like(policy_chosen))

    monkeypatch.setattr(trainer_module, "rpo_loss", todays_dpo)
    today = _trainer(model, tokenizer, pairs).fit(start, config)
    for key in today.state:
        assert torch.equal(zero.state[key], today.state[key]) and torch.equal(absent.state[key], today.state[key])
    assert zero.metrics["dpo_loss"] == today.metrics["dpo_loss"] and zero.metrics["dpo_sft_weight"] == 0.0
    assert weighted.metrics["dpo_sft_weight"] == 5.0
    # the weighted fit minimised DPO + 5 · NLL: its recorded loss includes the chosen replies' NLL (~6.7 per token)
    assert weighted.metrics["dpo_loss"] > 5 * weighted.metrics["dpo_chosen_nll"] > 5 * 6

    def chosen_nll(state):
        set_peft_model_state_dict(model, state)
        model.eval()
        with torch.no_grad():
            chosen = reply_logprobs(model, [p["chosen"] for p in pairs], CPU, tokenizer.pad_token_id)
        return float(-chosen.sum()) / sum(sum(p["chosen"]["reply_mask"][1:]) for p in pairs)

    # the NLL term keeps the chosen (real) replies more likely than plain DPO does (6.66 against 6.73 here)
    assert chosen_nll(weighted.state) < chosen_nll(zero.state) - 0.03
    assert weighted.metrics["dpo_chosen_nll"] < zero.metrics["dpo_chosen_nll"]
    assert weighted.metrics["train_preference_accuracy"] == 1.0  # and still learns the preferences


def test_tokenize_pairs_builds_both_rows_and_leaves_out_unbuildable_pairs(tiny_model):
    _, tokenizer = tiny_model
    pairs = _pairs(3)
    pairs[1]["rejected"] = pairs[1]["chosen"]  # the same tokens on both sides: no preference
    rows = tokenize_pairs(tokenizer, pairs, 128)
    assert [r["id"] for r in rows] == ["p0", "p2"] and rows[0]["kind"] == "votes"
    chosen, rejected = rows[0]["chosen"], rows[0]["rejected"]
    prompt = chosen["reply_mask"].index(1)
    assert chosen["input_ids"][:prompt] == rejected["input_ids"][:prompt]  # the same prompt
    assert chosen["input_ids"] != rejected["input_ids"]


def test_reply_logprobs_count_only_reply_tokens(tiny_model):
    model, tokenizer = tiny_model
    model.eval()
    rows = [pair[side] for pair in tokenize_pairs(tokenizer, _pairs(3), 128) for side in ("chosen", "rejected")]
    rows[0] = {**rows[0], "input_ids": rows[0]["input_ids"][:-2], "reply_mask": rows[0]["reply_mask"][:-2]}
    with torch.no_grad():
        got = reply_logprobs(model, rows, CPU, tokenizer.pad_token_id)
        batch = collate(rows, tokenizer.pad_token_id, CPU)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = F.log_softmax(logits[:, :-1], dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    expected = (token_logps * batch["reply_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    everything = (token_logps * batch["attention_mask"][:, 1:]).sum(1)
    assert (everything < got - 1.0).all()  # the prompt's own tokens would have counted a lot
    # each row alone (no padding, no neighbours) gives its value in the batch
    with torch.no_grad():
        alone = torch.cat([reply_logprobs(model, [row], CPU, tokenizer.pad_token_id) for row in rows])
    torch.testing.assert_close(alone, got, rtol=1e-5, atol=1e-4)


def test_reference_logprobs_equal_those_of_a_separate_reference_model(tiny_model, tiny_model_dir, monkeypatch):
    # Prepare: the shared model holds some other adapter than the global one it is about to receive
    model, tokenizer = tiny_model
    pairs = tokenize_pairs(tokenizer, _pairs(), 128)
    global_adapter = _random_adapter(model, seed=1)
    set_peft_model_state_dict(model, _random_adapter(model, seed=2))
    captured = []

    def capturing(*args, **kwargs):
        captured.append(pair_logprobs(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(trainer_module, "pair_logprobs", capturing)
    # Execute: a DPO fit from the global adapter
    _trainer(model, tokenizer, pairs).fit(global_adapter, _fit_config(local_epochs=1))
    # Assert: its reference equals a second model loaded with that global adapter, in eval mode
    assert len(captured) == 1
    chosen = _assert_reference_is(captured[0], _separate_copy(tiny_model_dir, global_adapter), pairs, tokenizer)
    # and the base reference of preference_metrics (adapter disabled) is the base model's
    set_peft_model_state_dict(model, global_adapter)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        disabled = pair_logprobs(model, pairs, CPU, tokenizer.pad_token_id)
    base_model = _separate_copy(tiny_model_dir)
    with torch.no_grad():
        base_chosen = reply_logprobs(base_model, [p["chosen"] for p in pairs], CPU, tokenizer.pad_token_id)
    torch.testing.assert_close(disabled[0], base_chosen, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(disabled[0], chosen, atol=1e-3)  # the adapter does matter


def test_preference_metrics_of_a_zero_adapter_are_ties(tiny_model):
    model, tokenizer = tiny_model  # PEFT starts LoRA B at zero: the policy is the base model
    pairs = tokenize_pairs(tokenizer, _pairs(5), 128)
    metrics = preference_metrics(model, pairs, CPU, tokenizer.pad_token_id, beta=0.1, batch_size=2)
    assert metrics == {"preference_accuracy": 0.5, "reward_margin": 0.0, "pairs": 5}
    assert model.training  # the mode is put back
    empty = preference_metrics(model, [], CPU, tokenizer.pad_token_id, beta=0.1)
    assert empty == {"preference_accuracy": None, "reward_margin": None, "pairs": 0}


def test_dpo_fit_learns_the_preferences(tiny_model):
    # Prepare
    model, tokenizer = tiny_model
    pairs = tokenize_pairs(tokenizer, _pairs(), 128)
    held_out = tokenize_pairs(tokenizer, _pairs(6, offset=100), 128)
    global_adapter = snapshot_adapter(model)
    before = preference_metrics(model, held_out, CPU, tokenizer.pad_token_id, beta=0.1)
    # Execute
    result = _trainer(model, tokenizer, pairs).fit(global_adapter, _fit_config(local_epochs=8, learning_rate=1e-2))
    # Assert: the fit's own numbers, the returned state, and held-out pairs under that state
    metrics = result.metrics
    assert metrics["objective_used"] == "dpo" and metrics["pairs"] == 8 and result.num_examples == 8
    assert metrics["steps"] == 16 and "dpo_skipped" not in metrics
    assert metrics["dpo_first_loss"] == pytest.approx(math.log(2), abs=0.05)  # policy = reference at step 1
    assert metrics["dpo_loss"] < math.log(2) - 0.2 and metrics["train_loss"] == metrics["dpo_loss"]
    assert metrics["train_preference_accuracy"] == 1.0 and metrics["train_reward_margin"] > 0.1
    assert any(not torch.equal(result.state[k], global_adapter[k]) for k in result.state)
    set_peft_model_state_dict(model, result.state)
    after = preference_metrics(model, held_out, CPU, tokenizer.pad_token_id, beta=0.1)
    assert before["preference_accuracy"] == 0.5 and after["preference_accuracy"] == 1.0
    assert after["reward_margin"] > 0.1


def test_an_ipo_fit_learns_the_preferences_and_stops_near_its_target_margin(tiny_model):
    """IPO's square pulls the per-token margin to 1/(2β) and no further; DPO's sigmoid, at the same β, rate and
    steps, keeps pushing it past that."""
    model, tokenizer = tiny_model
    pairs = tokenize_pairs(tokenizer, _pairs(), 128)
    held_out = tokenize_pairs(tokenizer, _pairs(6, offset=100), 128)
    global_adapter = snapshot_adapter(model)
    config = _fit_config(local_epochs=10, learning_rate=3e-2, dpo_beta=5.0)  # target 0.1 nats per reply token

    def per_token_margin(state):
        set_peft_model_state_dict(model, state)
        model.eval()
        with torch.no_grad():
            policy = pair_logprobs(model, pairs, CPU, tokenizer.pad_token_id)
            with model.disable_adapter():
                base = pair_logprobs(model, pairs, CPU, tokenizer.pad_token_id)
        counts = [torch.tensor([sum(p[side]["reply_mask"][1:]) for p in pairs]) for side in ("chosen", "rejected")]
        return float(((policy[0] - base[0]) / counts[0] - (policy[1] - base[1]) / counts[1]).mean())

    ipo = _trainer(model, tokenizer, pairs).fit(global_adapter, {**config, "dpo_loss_type": "ipo"})
    sigmoid = _trainer(model, tokenizer, pairs).fit(global_adapter, config)
    assert ipo.metrics["dpo_loss_type"] == "ipo" and sigmoid.metrics["dpo_loss_type"] == "sigmoid"
    assert ipo.metrics["dpo_first_loss"] == pytest.approx(0.1 ** 2, abs=0.002)  # policy = reference: margin 0
    assert ipo.metrics["dpo_loss"] < 0.2 * ipo.metrics["dpo_first_loss"]
    assert ipo.metrics["train_preference_accuracy"] == 1.0
    ipo_margin, sigmoid_margin = per_token_margin(ipo.state), per_token_margin(sigmoid.state)
    assert ipo_margin == pytest.approx(0.1, abs=0.03) and sigmoid_margin > 2 * ipo_margin  # measured 0.101, 0.324
    set_peft_model_state_dict(model, ipo.state)
    after = preference_metrics(model, held_out, CPU, tokenizer.pad_token_id, beta=0.1)
    assert after["preference_accuracy"] == 1.0
    with pytest.raises(ValueError, match="c0: unknown DPO loss type 'hinge'"):
        _trainer(model, tokenizer, pairs).fit(global_adapter, {**config, "dpo_loss_type": "hinge"})


def test_sft_then_dpo_runs_both_phases_in_one_fit(tiny_model):
    model, tokenizer = tiny_model
    trainer = _trainer(model, tokenizer)
    start = snapshot_adapter(model)
    sft_only = trainer.fit(start, _fit_config(objective="sft")).metrics
    both = trainer.fit(start, _fit_config(objective="sft_then_dpo"))
    assert both.metrics["objective_used"] == "sft_then_dpo"
    assert both.metrics["steps"] == sft_only["steps"] + 6  # 8 pairs, 4 a batch, 3 epochs
    assert both.metrics["train_loss"] == pytest.approx(sft_only["train_loss"])  # the SFT phase is SFT's
    assert math.isfinite(both.metrics["dpo_loss"]) and "train_preference_accuracy" in both.metrics
    assert both.num_examples == len(trainer.train_rows)


def test_too_few_pairs_train_sft_only_and_say_why(tiny_model):
    model, tokenizer = tiny_model
    start = snapshot_adapter(model)
    few = tokenize_pairs(tokenizer, _pairs(3), 128)
    sft = _trainer(model, tokenizer, few).fit(start, _fit_config(objective="sft"))
    skipped = _trainer(model, tokenizer, few).fit(start, _fit_config(objective="dpo", min_pairs=4))
    assert skipped.metrics["objective_used"] == "sft"
    assert skipped.metrics["dpo_skipped"] == "3 preference pairs, fewer than min_pairs=4: SFT only"
    assert "dpo_loss" not in skipped.metrics and skipped.num_examples == sft.num_examples
    for key in sft.state:  # the same SFT fit, bit for bit
        assert torch.equal(skipped.state[key], sft.state[key]), key


def test_a_non_finite_dpo_loss_names_the_client_and_step(tiny_model):
    model, tokenizer = tiny_model
    broken = _trainer(model, tokenizer, name="bad-client")
    with pytest.raises(FloatingPointError, match=r"bad-client: DPO produced a non-finite loss \(step 1\)"):
        broken.fit(snapshot_adapter(model), _fit_config(dpo_beta=float("nan")))


def test_dpo_is_deterministic_for_a_seed(tiny_model):
    model, tokenizer = tiny_model
    trainer = _trainer(model, tokenizer)
    start = snapshot_adapter(model)
    first = trainer.fit(start, _fit_config()).state
    second = trainer.fit(start, _fit_config()).state
    other_seed = trainer.fit(start, _fit_config(seed=1)).state
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


def test_dpo_keeps_ffa_lora_fedprox_max_steps_and_timeout(tiny_model):
    model, tokenizer = tiny_model
    trainer = _trainer(model, tokenizer, name="slow-client")
    start = {k: (v + 0.05 if "lora_B" in k else v) for k, v in snapshot_adapter(model).items()}
    # FFA-LoRA: only B trains and travels
    ffa = trainer.fit(start, _fit_config(train_lora_a=False)).state
    assert sorted(ffa) == sorted(k for k in start if "lora_B" in k)
    assert any(not torch.equal(ffa[k], start[k]) for k in ffa)
    assert all(torch.equal(snapshot_adapter(model)[k], start[k]) for k in start if "lora_A" in k)

    # FedProx: a large mu keeps the update near the global adapter
    def distance(state):
        return sum(float((state[k] - start[k]).norm() ** 2) for k in start) ** 0.5

    free = trainer.fit(start, _fit_config(learning_rate=1e-2)).state
    prox = trainer.fit(start, _fit_config(learning_rate=1e-2, proximal_mu=100.0)).state
    assert distance(prox) < 0.8 * distance(free)
    # max_steps and the client timeout
    assert trainer.fit(start, _fit_config(max_steps=2)).metrics["steps"] == 2
    with pytest.raises(TimeoutError, match="slow-client ran past CLIENT_TIMEOUT=1e-09s after 0 of 6 steps"):
        trainer.fit(start, _fit_config(timeout_s=1e-9))


def test_unknown_objective_is_refused(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="c0: unknown training objective 'ppo'"):
        _trainer(model, tokenizer).fit(snapshot_adapter(model), _fit_config(objective="ppo"))


def test_the_after_sft_reference_is_the_policy_after_the_sft_phase(tiny_model, tiny_model_dir, monkeypatch):
    # Prepare: the after-SFT state is what an SFT fit of the same rows, seed and round ends at
    model, tokenizer = tiny_model
    pairs = tokenize_pairs(tokenizer, _pairs(), 128)
    start = snapshot_adapter(model)
    config = _fit_config(objective="sft_then_dpo", dpo_sft_weight=0.0, learning_rate=1e-2)
    after_sft = _trainer(model, tokenizer, pairs).fit(start, {**config, "objective": "sft"}).state
    captured = []

    def capturing(*args, **kwargs):
        captured.append(pair_logprobs(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(trainer_module, "pair_logprobs", capturing)
    # Execute
    fit = _trainer(model, tokenizer, pairs).fit(start, {**config, "dpo_reference": "after_sft"})
    from_global = _trainer(model, tokenizer, pairs).fit(start, {**config, "dpo_reference": "global"})
    # Assert: the reference equals a separately loaded model holding the after-SFT adapter, in eval mode
    assert len(captured) == 2 and fit.metrics["dpo_reference"] == "after_sft"
    chosen = _assert_reference_is(captured[0], _separate_copy(tiny_model_dir, after_sft), pairs, tokenizer)
    # the DPO phase starts at its reference: log 2 at the first DPO step (dropout aside); from the global adapter
    # the SFT phase has already moved the policy (this tiny model's SFT raises the rejected replies too)
    assert fit.metrics["dpo_first_loss"] == pytest.approx(math.log(2), abs=0.01)
    assert abs(from_global.metrics["dpo_first_loss"] - math.log(2)) > 0.05
    assert not torch.allclose(captured[1][0], chosen, atol=1e-3)  # global: the received adapter's log-probs
    assert fit.metrics["train_loss"] == from_global.metrics["train_loss"]  # the SFT phase is the same


def test_dpo_epochs_and_learning_rate_shape_only_the_dpo_phase(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    start = snapshot_adapter(model)
    rates = []
    adamw = torch.optim.AdamW

    def recording(params, lr, **kwargs):
        rates.append(lr)
        return adamw(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    config = _fit_config(objective="sft_then_dpo")  # 3 local epochs, 8 rows and 8 pairs, 4 a batch
    default = _trainer(model, tokenizer).fit(start, config).metrics
    shaped = _trainer(model, tokenizer).fit(start, {**config, "dpo_epochs": 1, "dpo_learning_rate": 1e-3}).metrics
    assert (default["dpo_steps"], shaped["dpo_steps"]) == (6, 2)  # 2 steps a pass over the pairs
    assert shaped["steps"] == default["steps"] - 4  # the SFT steps are unchanged
    assert rates == [5e-3, 5e-3, 5e-3, 1e-3]  # (SFT, DPO) optimizers: LEARNING_RATE unless DPO_LEARNING_RATE
    assert (default["dpo_learning_rate"], shaped["dpo_learning_rate"]) == (5e-3, 1e-3)
    assert shaped["train_loss"] == default["train_loss"]


def test_a_fit_config_without_the_new_dpo_keys_trains_as_before(tiny_model):
    """A server from before DPO_REFERENCE / DPO_LEARNING_RATE / DPO_EPOCHS sends none of them: the fit is the one
    with their defaults (global, 0, 0) and with their explicit equivalents, bit for bit; after_sft is another fit."""
    model, tokenizer = tiny_model
    start = snapshot_adapter(model)
    config = _fit_config(objective="sft_then_dpo")
    absent = _trainer(model, tokenizer).fit(start, config)
    defaults = _trainer(model, tokenizer).fit(start, {**config, "dpo_reference": "global", "dpo_learning_rate": 0.0,
                                                      "dpo_epochs": 0})
    explicit = _trainer(model, tokenizer).fit(start, {**config, "dpo_learning_rate": config["learning_rate"],
                                                      "dpo_epochs": config["local_epochs"]})
    after_sft = _trainer(model, tokenizer).fit(start, {**config, "dpo_reference": "after_sft"})
    for key in absent.state:
        assert torch.equal(absent.state[key], defaults.state[key])
        assert torch.equal(absent.state[key], explicit.state[key])
    assert absent.metrics["dpo_loss"] == defaults.metrics["dpo_loss"] == explicit.metrics["dpo_loss"]
    assert any(not torch.equal(absent.state[k], after_sft.state[k]) for k in absent.state)
    with pytest.raises(ValueError, match="unknown DPO reference 'before_sft'"):
        _trainer(model, tokenizer).fit(start, {**config, "dpo_reference": "before_sft"})

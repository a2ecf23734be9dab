"""Self-improvement (site/self_improve.py): rule filters, the cap, the implicit reward against a real base model,
determinism, the collapse guard, and the workspace hook that adds synthetic rows to the next round's training only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_crew_reddit.site import self_improve as si
from fl_crew_reddit.site.self_improve import CollapseGuard, SelfImproveSettings, rule_reason

SETTINGS = SelfImproveSettings(candidates=3, max_fraction=0.5, max_new_tokens=8, min_reply_tokens=3,
                               max_reply_tokens=40, languages=frozenset({"en"}), max_seq_length=128, seed=7)
PROMPT = "r/gardening: How deep should I plant tomato seedlings in a raised bed this spring?"
REAL = "Bury them up to the first leaves, the stem grows roots."


def _examples(count: int) -> list[dict]:
    return [{"id": f"c{i}", "post_id": f"p{i}", "subreddit": "gardening", "author": f"user{i}",
             "messages": [{"role": "user", "content": f"r/gardening: question {i} about growing tomatoes and beans"},
                          {"role": "assistant", "content": f"Real answer {i}: water them in the morning."}],
             "image_paths": [], "reply_to_post": True, "prompt": "(rendered)", "reply": "(rendered)",
             "num_tokens": 20} for i in range(count)]


# --- rule filters ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "tokens", "reason"), [
    ("   ", 0, "empty"),
    ("Yes.", 2, "reply_under_min_tokens"),
    ("Mulch keeps the soil moist and cool all summer long.", 41, "reply_over_max_tokens"),
    ("I think so and I think so and I think so and I think so", 14, "repeated_ngrams"),
    ("How deep should I plant tomato seedlings in a raised bed", 12, "copies_prompt"),
    ("plant tomato", 3, "copies_prompt"),
    ("bury them up to the first leaves; the stem grows roots", 12, "same_as_real_reply"),
    ("Les tomates poussent mieux quand on les plante profondément dans un sol riche et bien drainé.", 20,
     "other_language"),
    ("Plant them deep, roots will form along the buried stem.", 12, None),
])
def test_each_rule_rejects_with_its_reason(text, tokens, reason):
    assert rule_reason(text, PROMPT, REAL, tokens, SETTINGS) == reason


def test_a_short_reply_made_of_new_words_is_not_a_copy():
    assert not si.copies_prompt("Use compost.", PROMPT)
    assert si.copies_prompt("raised bed", PROMPT)


# --- selection: reward bar, best per prompt, duplicates, the cap (generation and rewards stand in) --------------------
@pytest.fixture()
def scripted(monkeypatch, tiny_model):
    """`improve` with scripted candidates and rewards: reward = the number after "score" in a reply ("real" replies
    score 5)."""
    model, tokenizer = tiny_model
    script: dict[str, list[str]] = {}

    def candidates(model, tokenizer, prompts, device, settings, client, round_number):
        return [list(script[prompt]) for prompt in prompts]

    def rewards(model, rows, device, pad_id, batch_size=8):
        out = []
        for row in rows:
            reply = tokenizer.decode([t for t, m in zip(row["input_ids"], row["reply_mask"]) if m])
            out.append(5.0 if "Real answer" in reply else float(reply.split("score")[1].split()[0]))
        return out

    monkeypatch.setattr(si, "generate_candidates", candidates)
    monkeypatch.setattr(si, "implicit_rewards", rewards)
    return model, tokenizer, script


def test_one_candidate_per_prompt_at_least_as_good_as_the_real_reply_is_kept(scripted):
    model, tokenizer, script = scripted
    examples = _examples(2)
    settings = SelfImproveSettings(**{**SETTINGS.__dict__, "max_fraction": 1.0, "candidates": 4})
    prompts = [si.render_chat(tokenizer, e["messages"])[0] for e in examples]
    script[prompts[0]] = ["Water deeply, score 6 then mulch well.", "Water deeply, score 6 then mulch well.",
                          "Try compost tea, score 9 works wonders.", "Prune suckers, score 4 every week."]
    script[prompts[1]] = ["", "Stake them early, score 5 before storms.", "Shade cloth, score 7 helps in heat.",
                          "Use compost, score 2 is enough."]
    result = si.improve(model, tokenizer, examples, torch.device("cpu"), settings, client="client-0", round_number=2)
    assert [e["messages"][-1]["content"] for e in result.examples] == [
        "Try compost tea, score 9 works wonders.", "Shade cloth, score 7 helps in heat."]
    assert result.generated == 8
    assert dict(result.rejected) == {"duplicate_candidate": 1, "below_real_reward": 2, "empty": 1,
                                     "not_best_for_prompt": 2}
    assert result.generated == len(result.examples) + sum(result.rejected.values())
    kept = result.examples[0]
    assert kept["synthetic"] is True and kept["source_id"] == "c0" and kept["candidate"] == 2
    assert set(examples[0]) <= set(kept)  # the keys of a train.jsonl row, and more
    assert kept["messages"][0] == examples[0]["messages"][0] and kept["post_id"] == "p0"
    assert len(result.rows) == 2 and all(sum(r["reply_mask"]) for r in result.rows)
    metrics = result.metrics()
    assert metrics["self_improve_kept"] == 2 and metrics["self_improve_rejected_below_real_reward"] == 2
    assert metrics["self_improve_generated"] == 8 and metrics["self_improve_stopped"] == 0.0


def test_synthetic_examples_never_exceed_the_share_of_real_ones(scripted):
    model, tokenizer, script = scripted
    examples = _examples(10)
    for e in examples:
        script[si.render_chat(tokenizer, e["messages"])[0]] = [f"Fresh idea {e['id']}, score 9 for sure."]
    settings = SelfImproveSettings(**{**SETTINGS.__dict__, "max_fraction": 0.25, "candidates": 1})
    result = si.improve(model, tokenizer, examples, torch.device("cpu"), settings, client="client-0", round_number=2)
    assert result.cap == 2 and result.prompts == 2 and len(result.examples) == 2
    assert si.synthetic_cap(3, 0.25) == 0
    assert si.improve(model, tokenizer, examples[:3], torch.device("cpu"), settings, client="client-0",
                      round_number=2).examples == []
    # the prompts are a seeded draw: other rounds and clients answer other prompts
    draws = {tuple(si.sample_prompts(_examples(40), c, r, settings)) for c in ("a", "b") for r in (2, 3)}
    assert len(draws) == 4


def test_a_stopped_client_generates_nothing(scripted):
    model, tokenizer, _ = scripted
    guard = CollapseGuard(stopped={"client-0": "round 1: validation perplexity rose"})
    result = si.improve(model, tokenizer, _examples(8), torch.device("cpu"), SETTINGS, client="client-0",
                        round_number=2, guard=guard)
    assert result.examples == [] and result.generated == 0
    assert result.metrics()["self_improve_stopped"] == 1.0
    assert "perplexity rose" in result.metrics()["self_improve_stop_reason"]


# --- the real model: rewards and determinism --------------------------------------------------------------------------
def _perturb_adapter(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_the_base_reward_is_a_separate_base_model_s_log_probability(tiny_model, tiny_model_dir):
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.preprocessing.examples import tokenize_example
    from fl_crew_reddit.training.model_loading import load_base_model

    model, tokenizer = tiny_model
    _perturb_adapter(model)
    rows = [tokenize_example(tokenizer, e["messages"], 128) for e in _examples(3)]
    device = torch.device("cpu")
    second, _ = load_base_model(FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), device="cpu"), device)
    second.eval()
    with torch.no_grad():
        policy = si.reply_logprobs(model.eval(), rows, device, tokenizer.pad_token_id)
        base = si.reply_logprobs(second, rows, device, tokenizer.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        disabled = si.reply_logprobs(model, rows, device, tokenizer.pad_token_id)
    assert torch.allclose(disabled, base, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapter matters
    rewards = si.implicit_rewards(model, rows, device, tokenizer.pad_token_id)
    expected = [(p - b) / si.reply_tokens(r) for p, b, r in zip(policy.tolist(), base.tolist(), rows)]
    assert rewards == pytest.approx(expected, abs=1e-4)


def test_generation_and_scoring_are_deterministic_for_a_seed(tiny_model):
    model, tokenizer = tiny_model
    _perturb_adapter(model)
    settings = SelfImproveSettings(**{**SETTINGS.__dict__, "languages": frozenset(), "min_reply_tokens": 1})
    device = torch.device("cpu")
    examples = _examples(8)
    runs = [si.improve(model, tokenizer, examples, device, settings, client="client-1", round_number=3)
            for _ in range(2)]
    assert runs[0].generated == 12 and runs[0].prompts == 4
    assert runs[0].examples == runs[1].examples and runs[0].rejected == runs[1].rejected
    assert runs[0].generated == len(runs[0].examples) + sum(runs[0].rejected.values())
    prompts = [si.render_chat(tokenizer, e["messages"])[0] for e in examples[:4]]
    first = si.generate_candidates(model, tokenizer, prompts, device, settings, "client-1", 3)
    again = si.generate_candidates(model, tokenizer, prompts, device, settings, "client-1", 3)
    other = si.generate_candidates(model, tokenizer, prompts, device, settings, "client-1", 4)
    assert first == again and first != other
    assert [c[0] for c in first] == [c[0] for c in other]  # the first candidate is greedy
    state = torch.random.get_rng_state()
    si.generate_candidates(model, tokenizer, prompts, device, settings, "client-1", 3)
    assert torch.equal(state, torch.random.get_rng_state())  # the run's own randomness is untouched


# --- collapse guard ---------------------------------------------------------------------------------------------------
def test_the_collapse_guard_stops_a_client_for_good_when_its_validation_gets_worse():
    guard = CollapseGuard()
    assert guard.observe("a", 0, 40.0) is None
    assert guard.observe("a", 1, 30.0, 0.5) is None
    assert guard.observe("a", 2, 29.0, 0.6) is None
    assert "perplexity rose from 29 (round 2) to 31" in guard.observe("a", 3, 31.0, 0.7)
    assert not guard.allows("a")
    assert guard.observe("a", 4, 20.0, 0.9) is None and not guard.allows("a")  # for good
    assert guard.observe("b", 1, 30.0, 0.6) is None
    assert guard.observe("b", 2, None, 0.6) is None  # missing numbers are not compared
    assert "preference accuracy fell from 0.6 (round 2) to 0.55" in guard.observe("b", 3, 29.0, 0.55)
    assert guard.observe("c", 1, float("nan")) is None and guard.allows("c")


def test_the_guard_replayed_from_round_metrics_stops_the_same_clients():
    from fl_crew_reddit.evaluation.evaluator import EvalMetrics

    def metrics(per_client: dict, accuracy=None):
        m = EvalMetrics(perplexity=1.0, bleu=0.0, rouge_l=0.0, num_tokens=1, validation_per_client=per_client)
        m.validation_preference_accuracy = accuracy
        return m

    rounds = [(0, metrics({"a": 40.0, "b": 40.0})), (1, metrics({"a": 30.0, "b": 35.0}, 0.6)),
              (2, metrics({"a": 32.0, "b": 33.0}, 0.6))]
    guard = CollapseGuard.replay(si.observation(n, m) for n, m in rounds)
    assert set(guard.stopped) == {"a"}
    rounds.append((3, metrics({"a": 20.0, "b": 30.0}, 0.5)))
    guard = CollapseGuard.replay(si.observation(n, m) for n, m in rounds)
    assert set(guard.stopped) == {"a", "b"} and "preference accuracy" in guard.stopped["b"]


def test_improve_site_follows_the_guard_replayed_from_the_rounds_before(tiny_model):
    """A client whose validation perplexity rose in round 1 adds nothing in round 2 and says why; the other one adds
    its synthetic rows after its real ones."""
    from types import SimpleNamespace

    from fl_crew_reddit.evaluation.evaluator import EvalMetrics
    from fl_crew_reddit.training.trainer import snapshot_adapter

    model, tokenizer = tiny_model
    _perturb_adapter(model)
    received = snapshot_adapter(model)
    settings = SelfImproveSettings(**{**SETTINGS.__dict__, "languages": frozenset(), "min_reply_tokens": 1})

    def metrics(per_client):
        return EvalMetrics(perplexity=1.0, bleu=0.0, rouge_l=0.0, num_tokens=1, validation_per_client=per_client)

    rounds = [(1, metrics({"worse": 45.0, "better": 30.0})), (0, metrics({"worse": 40.0, "better": 40.0}))]
    real_rows = [{"input_ids": [1, 2, 3], "reply_mask": [0, 1, 1]}]
    out = {}
    for name in ("worse", "better"):
        data = SimpleNamespace(train_rows=lambda client, fit_config: list(real_rows))
        site = SimpleNamespace(name=name, model=model, tokenizer=tokenizer, device=torch.device("cpu"), data=data)
        out[name] = (si.improve_site(site, received, 2, settings, _examples(8), rounds),
                     site.data.train_rows(name, {}))
    stopped, rows = out["worse"]
    assert stopped["self_improve_stopped"] == 1.0 and stopped["self_improve_generated"] == 0
    assert "perplexity rose from 40 (round 0) to 45" in stopped["self_improve_stop_reason"]
    assert rows == real_rows
    going, rows = out["better"]
    assert going["self_improve_stopped"] == 0.0 and going["self_improve_generated"] == 12
    assert rows[:1] == real_rows and len(rows) == 1 + going["self_improve_kept"]
    assert going["self_improve_seconds"] > 0


# --- the workspace hook (the real loop, tiny model) ----------------------------------------------------------------
def test_self_improve_needs_the_clients_in_this_process(tiny_config):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="SELF_IMPROVE=true runs where the clients train in this process"):
        tiny_config.model_validate({**tiny_config.model_dump(), "self_improve": True, "federation": "local-flower"})


@pytest.mark.e2e
def test_synthetic_rows_join_the_next_round_s_training_and_nothing_else(tiny_config, monkeypatch):
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.site import app

    trained: dict[tuple[int, str], list[dict]] = {}

    class Spy(app.LocalTrainer):
        def fit(self, global_adapter, config):
            trained[(config["round"], self.name)] = list(self.train_rows)
            return super().fit(global_adapter, config)

    monkeypatch.setattr(app, "LocalTrainer", Spy)
    # every candidate a fresh English sentence that beats the real reply: the hook, not the model, is under test
    monkeypatch.setattr(si, "generate_candidates", lambda model, tokenizer, prompts, device, settings, client, rnd: [
        [f"Synthetic reply {i}-{k} for {client}: keep notes and try again." for k in range(settings.candidates)]
        for i in range(len(prompts))])
    config = tiny_config.model_copy(update={"self_improve": True, "self_improve_max_fraction": 0.5,
                                            "eval_samples": 0, "local_epochs": 1})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_llm_model)
    calls = []

    def rewards(model, rows, device, pad_id, batch_size=8):  # real replies score 0, the synthetic ones 1
        calls.append(len(rows))
        return [1.0 if "Synthetic reply" in tokenizer.decode(r["input_ids"]) else 0.0 for r in rows]

    monkeypatch.setattr(si, "implicit_rewards", rewards)
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="self-improve")
    history = result.history
    first, second = history.rounds
    assert not any(key.startswith("self_improve_") for c in first.clients for key in c.metrics)
    assert calls
    data = {shard.name: shard for shard in history.data.clients}
    for client in second.clients:
        real = [json.loads(line) for line in Path(data[client.name].train_path).read_text().splitlines() if line]
        kept = client.metrics["self_improve_kept"]
        assert kept == client.metrics["self_improve_examples"] == len(real) // 2 > 0, client.metrics
        assert client.metrics["self_improve_generated"] == kept * config.self_improve_candidates
        assert client.metrics["self_improve_rejected_not_best_for_prompt"] == kept
        rows_round_1, rows_round_2 = trained[(1, client.name)], trained[(2, client.name)]
        assert len(rows_round_1) == len(real) and len(rows_round_2) == len(real) + kept
        assert rows_round_2[:len(real)] == rows_round_1  # the real rows first, as they were
        assert client.num_examples == len(real)  # FedAvg weighs real examples only
    # synthetic examples exist only in the train rows of round 2: no file, no validation or test split holds them
    for shard in history.data.clients:
        for path in Path(shard.train_path).parent.glob("*.jsonl"):
            assert "Synthetic reply" not in path.read_text(), path
    assert first.global_.num_tokens == second.global_.num_tokens  # the test split scored is the same
    assert first.global_.validation_per_client.keys() == second.global_.validation_per_client.keys()


@pytest.mark.e2e
def test_a_run_stopped_in_round_two_resumes_to_the_same_adapter_with_the_same_synthetic_rows(tiny_config,
                                                                                             monkeypatch):
    """Nothing synthetic is saved: the resumed round regenerates the same replies (seeded, same received adapter)."""
    from conftest import RunStopped, stopped_in_round
    from safetensors.torch import load_file

    from fl_crew_reddit import FLCrewRedditManager

    # the tiny model's replies are gibberish: no language or length rule, and every reward ties with the real
    # reply's, so the candidates that pass the other rules are kept and the run really trains on generated text
    monkeypatch.setattr(si, "implicit_rewards", lambda model, rows, *args, **kwargs: [0.0] * len(rows))
    kept: dict[str, list[str]] = {}
    original = si.improve

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        kept.setdefault(kwargs["client"], []).append(repr([e["messages"][-1]["content"] for e in result.examples]))
        return result

    monkeypatch.setattr(si, "improve", recording)
    config = tiny_config.model_copy(update={"self_improve": True, "self_improve_max_fraction": 0.5, "eval_samples": 0,
                                            "local_epochs": 1, "languages": [], "min_reply_tokens": 1,
                                            "self_improve_max_new_tokens": 12})
    reference = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-reference")
    assert sum(c.metrics["self_improve_kept"] for c in reference.history.rounds[1].clients) > 0
    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-stopped")
    resumed = FLCrewRedditManager(config).resume("run-stopped")
    assert all(len(set(texts)) == 1 and len(texts) == 3 for texts in kept.values()), kept  # reference, stop, resume
    final = load_file(str(Path(resumed.final_adapter) / "adapter_model.safetensors"))
    expected = load_file(str(Path(reference.final_adapter) / "adapter_model.safetensors"))
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key

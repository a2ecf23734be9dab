"""Pure metrics against hand-computed values, and the evaluator on a tiny model."""
import math

import pytest
import torch

from fl_crew_reddit.evaluation.evaluator import evaluate, held_out_perplexity
from fl_crew_reddit.evaluation.metrics import bleu, chrf, distinct_n, perplexity, rouge, rouge_l
from fl_crew_reddit.training.batching import tokenize_all


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(2 * math.log(5.0), 2) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_bleu_and_rouge_reward_overlap():
    refs = ["water your tomatoes deeply once a week", "use a virtual environment for each project"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    unrelated = ["the cat sat on the mat", "stock prices fell sharply today"]
    assert bleu(unrelated, refs) < 5 and rouge_l(unrelated, refs) < 0.2
    partial = ["water your tomatoes once a week", "use a virtual environment"]
    assert 0.5 < rouge_l(partial, refs) < 1.0


def test_uniform_model_has_vocabulary_sized_perplexity(tiny_model):
    model, tokenizer = tiny_model
    examples = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    rows = tokenize_all(tokenizer, examples, 64)
    head = model.get_base_model().get_output_embeddings()
    saved = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.zero_()  # all logits equal: every token has probability 1/V
        ppl, count = held_out_perplexity(model, rows, tokenizer.pad_token_id, torch.device("cpu"), mixed_precision="no")
        head.weight.copy_(saved)
    assert count == sum(rows[0]["reply_mask"][1:])
    assert ppl == pytest.approx(len(tokenizer), rel=1e-4)


def test_evaluate_generates_and_scores_samples(tiny_model):
    model, tokenizer = tiny_model
    examples = [{"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                 "prompt": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                         add_generation_prompt=True)}]
    rows = tokenize_all(tokenizer, examples, 64)
    metrics = evaluate(model, tokenizer, rows, examples, torch.device("cpu"), use_adapter=False, mixed_precision="no")
    assert metrics.perplexity > 1 and metrics.num_tokens > 0
    assert len(metrics.samples) == 1 and metrics.samples[0]["reference"] == "hello"


def test_per_client_perplexities_combine_by_token_sums_not_by_averaging(tiny_model):
    model, tokenizer = tiny_model
    def rows(texts):
        return tokenize_all(tokenizer, [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": t}]} for t in texts], 64)
    sets = {"client-0": rows(["short"]), "client-1": rows(["a much longer reply with many more tokens in it"])}
    metrics = evaluate(model, tokenizer, sets, [], torch.device("cpu"), use_adapter=False, mixed_precision="no")
    separate = {name: held_out_perplexity(model, r, tokenizer.pad_token_id, torch.device("cpu"), mixed_precision="no")
                for name, r in sets.items()}
    assert metrics.per_client == pytest.approx({name: ppl for name, (ppl, _) in separate.items()}, rel=1e-5)
    total_tokens = sum(n for _, n in separate.values())
    pooled = math.exp(sum(math.log(ppl) * n for ppl, n in separate.values()) / total_tokens)
    assert metrics.perplexity == pytest.approx(pooled, rel=1e-5)
    assert metrics.num_tokens == total_tokens


def test_chrf_rouge_variants_and_distinct_n():
    refs = ["water your tomatoes deeply once a week"]
    assert chrf(refs, refs) == pytest.approx(100.0)
    scores = rouge(["water your tomatoes weekly"], refs)
    assert scores["rouge_1"] > scores["rouge_2"] > 0 and 0 < scores["rouge_l"] < 1
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n([""], 2) == 0.0

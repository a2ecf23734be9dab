"""Issue 15, evaluation with images: held-out perplexity of image rows through the projector (text rows unchanged
bit for bit), replies generated with the image as soft tokens, and their CLIP score (Hessel et al. 2021) against
the post's images, with a blank image and the real reply as references. A random tiny CLIP gives meaningless
values: these tests check the plumbing and properties, not numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_crew_reddit.evaluation.clip_score import clip_scores, example_clip_scores
from fl_crew_reddit.evaluation.evaluator import conditioned_clip_scores, held_out_nll, split_perplexities
from fl_crew_reddit.training.multimodal import (
    SKIP_FEATURES_MISSING,
    build_projector,
    generate_with_images,
    generated_ids_with_images,
    multimodal_rows,
    with_images_replaced,
)

CPU = torch.device("cpu")
FEATURES = 16  # the tiny CLIP's projection_dim


def _example(eid: str, reply: str, images: list[str], post: str = "r/pics: what is in this picture?") -> dict:
    return {"id": eid, "image_paths": images,
            "messages": [{"role": "user", "content": post}, {"role": "assistant", "content": reply}]}


def _rows(tokenizer, examples: list[dict], features: dict, tokens: int = 2) -> list[dict]:
    return multimodal_rows(tokenizer, examples, lambda p: features.get(Path(p)), max_length=96,
                           tokens_per_image=tokens, max_images=4).rows


def _features(*names: str, seed: int = 1) -> dict[Path, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {Path(name): torch.randn(FEATURES, generator=generator) * 5 for name in names}


@pytest.fixture()
def sharp_model(tiny_model_dir):
    """(peft model, tokenizer): the tiny Llama's shape with weights of std 0.3 (not 0.02), whose greedy choice
    depends on its input (the std-0.02 model answers the same token whatever it reads)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.peft_setup import build_peft_model

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
        peft_model = build_peft_model(base, FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4,
                                                               lora_alpha=8, device="cpu"))
    return peft_model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def loud_projector(sharp_model):
    """A projector whose soft tokens are 30× the embeddings' size: the image then visibly moves the next-token
    distribution, so a test can tell whether generation and loss really read the slots."""
    model, _ = sharp_model
    projector = build_projector(model, FEATURES, tokens=2, seed=3)
    with torch.no_grad():
        projector.out.weight.mul_(30.0)
    return projector


# --- the metric -------------------------------------------------------------------------------------------------------
def test_example_clip_scores_are_the_mean_over_each_examples_images_in_0_100():
    images = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 2.0]])]
    texts = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    scores = example_clip_scores(images, texts)
    assert torch.allclose(scores, torch.tensor([50.0, 0.0]))  # (100 + 0) / 2; opposite directions clip to 0
    assert float(clip_scores(torch.randn(50, 8), torch.randn(50, 8)).min()) >= 0.0
    assert float(clip_scores(torch.randn(50, 8), torch.randn(50, 8)).max()) <= 100.0
    with pytest.raises(ValueError, match="2 image sets for 1 texts"):
        example_clip_scores(images, texts[:1])


# --- held-out perplexity with images ------------------------------------------------------------------------------
def test_held_out_nll_reads_the_images_and_leaves_text_rows_bit_identical(sharp_model, loud_projector):
    model, tokenizer = sharp_model
    features = _features("a.png", "b.png")
    examples = [_example("x", "a cat on a sofa", ["a.png"]), _example("y", "no picture here at all", []),
                _example("z", "two dogs in the snow", ["b.png"])]
    rows = _rows(tokenizer, examples, features)
    text_rows = [r for r in rows if not r["image_slots"]]
    pad = tokenizer.pad_token_id

    # text rows: the same computation with or without a projector, bit for bit
    plain = held_out_nll(model, text_rows, pad, CPU)
    assert held_out_nll(model, text_rows, pad, CPU, projector=loud_projector) == plain
    # mixed rows: the sums of their parts, token-weighted together
    image_total, image_count = held_out_nll(model, [r for r in rows if r["image_slots"]], pad, CPU,
                                            projector=loud_projector)
    text_total, text_count = held_out_nll(model, text_rows, pad, CPU)
    total, count = held_out_nll(model, rows, pad, CPU, projector=loud_projector)
    assert count == image_count + text_count and total == pytest.approx(image_total + text_total, rel=1e-6)
    # an image row's loss changes when its image changes
    swapped = held_out_nll(model, with_images_replaced(rows, features[Path("b.png")]), pad, CPU,
                           projector=loud_projector)
    assert swapped[1] == count and abs(swapped[0] - total) > 1e-3
    ppl, per_client = split_perplexities(model, {"c0": rows, "c1": text_rows}, pad, CPU, projector=loud_projector)
    assert ppl is not None and set(per_client) == {"c0", "c1"}
    with pytest.raises(ValueError, match="carry images but no image projector"):
        held_out_nll(model, rows, pad, CPU)


# --- generation with the image -------------------------------------------------------------------------------------
def _greedy_by_hand(model, projector, row: dict, steps: int) -> list[int]:
    """Greedy decoding with full forward passes: the prompt's embeddings, the soft tokens written at the slots."""
    causal_lm = model.get_base_model()
    prompt = row["input_ids"][:row["reply_mask"].index(1)]
    embeds = causal_lm.get_input_embeddings()(torch.tensor([prompt]))[0]
    embeds[row["image_slots"]] = projector(row["image_embeds"]).reshape(-1, embeds.shape[-1])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = causal_lm(inputs_embeds=embeds[None]).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            embeds = torch.cat([embeds, causal_lm.get_input_embeddings()(torch.tensor([token]))])
    return out


def _until_end(ids: list[int], model) -> list[int]:
    """Token ids up to and including the first end-of-sequence id (generation stops there)."""
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    stop = next((i for i, token in enumerate(ids) if token in ends), len(ids) - 1)
    return ids[:stop + 1]


def test_generation_sees_the_image_at_its_slots_and_is_deterministic(sharp_model, loud_projector):
    model, tokenizer = sharp_model
    features = _features("a.png", "b.png", seed=4)
    examples = [_example("x", "a cat on a sofa", ["a.png"], post="r/cats: a long title about my cat and the sofa"),
                _example("z", "two dogs", ["b.png"], post="r/dogs: hi")]
    rows = _rows(tokenizer, examples, features)
    assert all(row["image_slots"] for row in rows)
    model.eval()
    steps = 6
    batched = generated_ids_with_images(model, loud_projector, tokenizer, rows, max_new_tokens=steps)
    assert batched == generated_ids_with_images(model, loud_projector, tokenizer, rows, max_new_tokens=steps)
    for row, ids in zip(rows, batched):
        # left padding in a batch of prompts of different lengths gives each row its own reply
        alone = generated_ids_with_images(model, loud_projector, tokenizer, [row], max_new_tokens=steps)[0]
        assert _until_end(ids, model) == _until_end(alone, model)
        # and it is what greedy decoding with the soft tokens at the slots gives
        assert _until_end(alone, model) == _until_end(_greedy_by_hand(model, loud_projector, row, steps), model)
    blank = generated_ids_with_images(model, loud_projector, tokenizer,
                                      with_images_replaced(rows, torch.zeros(FEATURES)), max_new_tokens=steps)
    assert blank != batched  # the loud image steers what the model writes
    assert generate_with_images(model, loud_projector, tokenizer, rows, max_new_tokens=steps) == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in batched]


# --- the CLIP score of generated replies -------------------------------------------------------------------------
def test_clip_score_of_real_replies_matched_vs_mismatched_image(sharp_model, loud_projector, tiny_clip_dir):
    """The image tower is 'set' through the image features: a matched image's embedding is its reply's CLIP text
    embedding (score 100), a mismatched one points the other way (score 0); CLIP's text tower scores the texts."""
    from fl_crew_reddit.preprocessing.image_features import load_clip

    model, tokenizer = sharp_model
    encoder = load_clip(str(tiny_clip_dir))
    replies = ["a red bicycle by the canal", "snow on the mountain " * 40]  # the second is past CLIP's 77 tokens
    texts = encoder.text_embeddings(replies)
    features = {Path("match.png"): texts[0], Path("mismatch.png"): -texts[1]}
    examples = [_example("m", replies[0], ["match.png"]), _example("n", replies[1], ["mismatch.png", "gone.png"])]
    settings = dict(max_length=96, tokens_per_image=2, max_images=4, max_new_tokens=5)
    features_of = lambda p: features.get(Path(p))  # noqa: E731
    blank = torch.ones(FEATURES)

    matched = conditioned_clip_scores(model, tokenizer, loud_projector, encoder, examples[:1], features_of, blank,
                                      **settings)
    assert matched["clip_score_reply"] == pytest.approx(100.0, abs=1e-3)
    mismatched = conditioned_clip_scores(model, tokenizer, loud_projector, encoder, examples[1:], features_of, blank,
                                         **settings)
    assert mismatched["clip_score_reply"] == pytest.approx(0.0, abs=1e-6)
    assert mismatched["clip_left_out"] == {SKIP_FEATURES_MISSING: 1}

    both = conditioned_clip_scores(model, tokenizer, loud_projector, encoder, examples, features_of, blank,
                                   **settings)
    assert both["clip_examples"] == 2 and both["clip_image_conditioned"] is True
    assert both["clip_score_reply"] == pytest.approx(50.0, abs=1e-3)
    for key in ("clip_score", "clip_score_blank", "clip_score_reply", "clip_score_post"):
        assert 0.0 <= both[key] <= 100.0, key
    assert both == conditioned_clip_scores(model, tokenizer, loud_projector, encoder, examples, features_of, blank,
                                           **settings)  # greedy and fixed examples: deterministic

    none = conditioned_clip_scores(model, tokenizer, loud_projector, encoder, [_example("g", "x", ["gone.png"])],
                                   features_of, blank, **settings)
    assert "has an image with stored CLIP features" in none["clip_note"]
    assert none["clip_left_out"] == {SKIP_FEATURES_MISSING: 1}


def test_the_report_and_tensorboard_show_the_conditioned_clip_score():
    from fl_crew_reddit.evaluation.report import clip_blocks, render_markdown
    from fl_crew_reddit.evaluation.tensorboard_scalars import metrics_scalars
    from fl_crew_reddit.history import EvalMetrics, RoundRecord, RunHistory

    metrics = EvalMetrics(perplexity=30.0, bleu=0.0, rouge_l=0.0, num_tokens=8, clip_score=21.5,
                          clip_score_blank=19.25, clip_score_reply=30.0, clip_score_post=28.0, clip_examples=3,
                          clip_image_conditioned=True)
    shown = render_markdown(clip_blocks(RunHistory(run_id="r", base=metrics,
                                                   rounds=[RoundRecord(round=1, global_=metrics)])))
    assert "Generated (blank image)" in shown and "| 1 | 21.5" in shown and "19.25" in shown
    assert "how much the image steers" in shown
    tags = metrics_scalars(metrics)
    assert tags["image/clip_score"] == 21.5 and tags["image/clip_score_blank"] == 19.25
    assert "image/clip_score" not in metrics_scalars(metrics.model_copy(update={"clip_image_conditioned": False}))

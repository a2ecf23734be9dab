"""The Evaluator's model-side work: held-out reply perplexity and generated replies scored against real ones."""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
from pydantic import BaseModel, Field

from fl_crew_reddit.evaluation.metrics import bleu, chrf, distinct_n, perplexity, rouge
from fl_crew_reddit.training.batching import collate, reply_token_nll
from fl_crew_reddit.training.trainer import autocast_context

GENERATED_REPLY_TOKENS = 48  # the longest generated reply (BLEU / ROUGE sample, CLIP score), in tokens


class EvalMetrics(BaseModel):
    perplexity: float = Field(description="on the union of all clients' held-out replies")
    bleu: float
    rouge_l: float
    num_tokens: int
    chrf: float = 0.0
    rouge_1: float = 0.0
    rouge_2: float = 0.0
    distinct_1: float = 0.0
    distinct_2: float = 0.0
    per_client: dict[str, float] = Field(default_factory=dict, description="perplexity on each client's own split")
    samples: list[dict] = []
    validation_perplexity: float | None = Field(
        None, description="on the union of the clients' validation splits: chooses the best round, never test")
    validation_per_client: dict[str, float] = Field(default_factory=dict)
    clip_score: float | None = Field(None, description="CLIPScore (0-100) of generated replies against the images "
                                                       "of the post they answer (held-out image posts)")
    clip_score_reply: float | None = Field(None, description="the same for the real replies (a reference level)")
    clip_score_post: float | None = Field(None, description="the same for the post's own text (a reference level)")
    clip_score_blank: float | None = Field(None, description="multimodal: the CLIP score of replies generated with a "
                                                             "blank white image in place of the post's images "
                                                             "(clip_score minus this: how much the image steers)")
    clip_image_conditioned: bool = Field(False, description="True: the generated replies saw the post's images (soft "
                                                            "tokens of the projector); False: text-only prompts")
    clip_examples: int = 0
    clip_left_out: dict[str, int] = Field(default_factory=dict, description="images of the chosen held-out image "
                                                                            "posts left out of the CLIP score, by "
                                                                            "reason")
    clip_note: str | None = Field(None, description="why the CLIP score was not computed")
    # multimodal training (training/multimodal.py): how much the image helps predict held-out replies to image posts
    image_perplexity_real: float | None = Field(None, description="reply perplexity of held-out test replies to image "
                                                                  "posts with their images (soft tokens)")
    image_perplexity_blank: float | None = Field(None, description="the same with a blank white image in their place")
    image_examples: int = Field(0, description="held-out test rows with images that the two perplexities cover")
    image_reply_tokens: int = 0
    image_left_out: dict[str, int] = Field(default_factory=dict, description="test images left out, by reason")
    image_note: str | None = Field(None, description="why the image's contribution was not computed")
    test_image_rows: int = Field(0, description="multimodal: test rows in `perplexity` that carried their images "
                                                "(the rest are text rows)")
    validation_image_rows: int = Field(0, description="the same for `validation_perplexity`")
    validation_image_left_out: dict[str, int] = Field(default_factory=dict,
                                                      description="validation images left out, by reason")
    # preference pairs (training/dpo.py): does the implicit reward β(log π - log π_base) rank the chosen reply first?
    preference_accuracy: float | None = Field(None, description="share of the held-out test pairs whose chosen reply "
                                                                "gets the higher implicit reward (ties count half)")
    reward_margin: float | None = Field(None, description="mean implicit reward of chosen minus rejected, test pairs")
    preference_pairs: int = Field(0, description="held-out test pairs scored (0: none, and no preference metrics)")
    preference_per_client: dict[str, dict] = Field(
        default_factory=dict, description="client -> its test pairs' preference_accuracy, reward_margin, pairs")
    validation_preference_accuracy: float | None = Field(None, description="the same on the validation pairs")
    validation_reward_margin: float | None = None
    validation_preference_pairs: int = 0


@torch.no_grad()
def held_out_perplexity(model, rows: list[dict], pad_id: int, device: torch.device, batch_size: int = 8,
                        mixed_precision: str = "auto", projector=None) -> tuple[float, int]:
    total, count = held_out_nll(model, rows, pad_id, device, batch_size, mixed_precision, projector=projector)
    return perplexity(total, count), count


@torch.no_grad()
def split_perplexities(model, rows_by_client: Mapping[str, list[dict]], pad_id: int, device: torch.device,
                       use_adapter: bool = True, mixed_precision: str = "auto",
                       projector=None) -> tuple[float | None, dict[str, float]]:
    """Perplexity only (no generation: cheap enough to run every round) on the union of the clients' rows and on
    each client's own; None and {} where there are no reply tokens (a run made before validation splits)."""
    context = nullcontext() if use_adapter else model.disable_adapter()
    with context:
        sums = {name: held_out_nll(model, rows, pad_id, device, mixed_precision=mixed_precision, projector=projector)
                for name, rows in rows_by_client.items() if rows}
    count = sum(n for _, n in sums.values())
    if not count:
        return None, {}
    return (perplexity(sum(t for t, _ in sums.values()), count),
            {name: perplexity(t, n) for name, (t, n) in sums.items() if n})


@torch.no_grad()
def held_out_nll(model, rows: list[dict], pad_id: int, device: torch.device, batch_size: int = 8,
                 mixed_precision: str = "auto", projector=None) -> tuple[float, int]:
    """Summed reply-token NLL and token count (sums combine across clients; perplexities do not).

    Multimodal rows (`training.multimodal.multimodal_rows`: `image_slots` and `image_embeds`) are scored with their
    images through `projector` (soft tokens, `multimodal_reply_nll`), in batches of their own; the text rows as
    without images. Without image rows the computation is exactly the text-only one."""
    model.eval()
    if rows and "vision" in rows[0]:  # a vision-language base's rows (training/vlm.py): its images, its loss
        from fl_crew_reddit.training.vlm import collate_vlm, vlm_reply_nll

        return _summed_nll(rows, batch_size, device, mixed_precision,
                           lambda chunk: vlm_reply_nll(model, collate_vlm(chunk, pad_id, device)))
    total, count = 0.0, 0
    image_rows = [row for row in rows if row.get("image_slots")]
    if image_rows:  # with their images (soft tokens through the projector), in batches of their own
        from fl_crew_reddit.training.multimodal import collate_multimodal, multimodal_reply_nll

        if projector is None:
            raise ValueError(f"{len(image_rows)} held-out rows carry images but no image projector was given to "
                             "score them")
        projector.eval()
        rows = [row for row in rows if not row.get("image_slots")]
        total, count = _summed_nll(image_rows, batch_size, device, mixed_precision,
                                   lambda chunk: multimodal_reply_nll(model, projector,
                                                                      *collate_multimodal(chunk, pad_id, device)))
    return _summed_nll(rows, batch_size, device, mixed_precision,
                       lambda chunk: reply_token_nll(model, collate(chunk, pad_id, device)), total, count)


def _summed_nll(rows: list[dict], batch_size: int, device: torch.device, mixed_precision: str, score,
                total: float = 0.0, count: int = 0) -> tuple[float, int]:
    """`total` and `count` plus the summed reply NLL and reply tokens of `rows`, scored by `score(chunk) -> (nll, n)`
    in batches of similar length (sorted, so padding stays small)."""
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    for start in range(0, len(rows), batch_size):
        with autocast_context(device, mixed_precision):
            nll, n = score(rows[start:start + batch_size])
        total += float(nll)
        count += n
    return total, count


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], device: torch.device,
                     max_new_tokens: int = GENERATED_REPLY_TOKENS,
                     batch_size: int = 8) -> list[str]:
    """Greedy replies (deterministic, so rounds compare like with like)."""
    model.eval()
    replies = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            replies.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return replies


def evaluate(model, tokenizer, test_rows: list[dict] | Mapping[str, list[dict]], sample_examples: list[dict],
             device: torch.device, use_adapter: bool = True, mixed_precision: str = "auto",
             projector=None) -> EvalMetrics:
    """Perplexity on every held-out reply (overall and per client when `test_rows` is a mapping by client, read
    one client at a time; rows with images through `projector`); BLEU / ROUGE-L on a fixed sample of generated
    replies."""
    test_sets = test_rows if isinstance(test_rows, Mapping) else {"all": test_rows}
    context = nullcontext() if use_adapter else model.disable_adapter()
    with context:
        sums = {name: held_out_nll(model, rows, tokenizer.pad_token_id, device, mixed_precision=mixed_precision,
                                   projector=projector)
                for name, rows in test_sets.items()}
        count = sum(n for _, n in sums.values())
        ppl = perplexity(sum(t for t, _ in sums.values()), count)
        prompts = [example["prompt"] for example in sample_examples]
        references = [example["messages"][-1]["content"] for example in sample_examples]
        hypotheses = generate_replies(model, tokenizer, prompts, device) if prompts else []
    samples = [{"id": e["id"], "reference": r, "generated": h}
               for e, r, h in zip(sample_examples, references, hypotheses)]
    per_client = {name: perplexity(t, n) for name, (t, n) in sums.items() if n} if len(sums) > 1 else {}
    overlap = rouge(hypotheses, references)
    return EvalMetrics(perplexity=ppl, bleu=bleu(hypotheses, references), chrf=chrf(hypotheses, references),
                       num_tokens=count, per_client=per_client, samples=samples,
                       distinct_1=distinct_n(hypotheses, 1), distinct_2=distinct_n(hypotheses, 2), **overlap)


def preference_scores(model, pairs_by_client: Mapping[str, list[dict]], device: torch.device, pad_id: int,
                      beta: float, base_logprobs: dict | None = None) -> dict[str, dict]:
    """{client: `training.dpo.preference_metrics` on its pairs} for the clients that have pairs, read one client at
    a time, with the adapter the model holds now (the implicit reward is relative to the base model: the adapter
    disabled); combine them with `server.evaluation.combine_preferences`.

    `base_logprobs` ({client: the base model's (chosen, rejected) reply log-probs}): the base model does not change
    during a run, so a caller scoring every round passes the same dict and the base log-probs are computed once per
    client (the same numbers as `preference_metrics` computes each time, at half the cost)."""
    scores = {}
    for name, rows in pairs_by_client.items():
        if not rows:
            continue
        from fl_crew_reddit.training import dpo  # loaded only where pairs exist

        if base_logprobs is None:
            scores[name] = dpo.preference_metrics(model, rows, device, pad_id, beta)
            continue
        was_training = model.training
        model.eval()
        try:
            policy = dpo.pair_logprobs(model, rows, device, pad_id)
            if name not in base_logprobs:
                with model.disable_adapter():
                    base_logprobs[name] = dpo.pair_logprobs(model, rows, device, pad_id)
        finally:
            model.train(was_training)
        scores[name] = dpo.implicit_reward_metrics(policy, base_logprobs[name], beta)
    return scores


def add_preferences(metrics: EvalMetrics, test: Mapping[str, dict], validation: Mapping[str, dict]) -> EvalMetrics:
    """Fill `metrics`' preference fields from per-client `preference_metrics` results (test and validation pairs);
    left as they are (None, 0) where no client has pairs."""
    from fl_crew_reddit.server.evaluation import combine_preferences

    overall = combine_preferences(test)
    metrics.preference_accuracy, metrics.reward_margin = overall["preference_accuracy"], overall["reward_margin"]
    metrics.preference_pairs = overall["pairs"]
    metrics.preference_per_client = {name: dict(values) for name, values in test.items() if values.get("pairs")}
    held = combine_preferences(validation)
    metrics.validation_preference_accuracy, metrics.validation_reward_margin = (held["preference_accuracy"],
                                                                                held["reward_margin"])
    metrics.validation_preference_pairs = held["pairs"]
    return metrics


def image_text_scores(model, tokenizer, image_examples: list[dict], device: torch.device, clip_model: str | None, *,
                      use_adapter: bool = True, known_replies: dict[str, str] | None = None) -> dict:
    """The CLIP fields of EvalMetrics for held-out replies to image posts: scores, or `clip_note` saying why not.

    Replies already generated for the BLEU sample (`known_replies`, by example id) are reused."""
    from fl_crew_reddit.evaluation.clip_score import image_text_alignment
    from fl_crew_reddit.preprocessing.image_features import clip_encoder

    if clip_model is None:
        return {"clip_note": "image posts are off (SUPPORT_MULTIMODAL=false)"}
    if not image_examples:
        return {"clip_note": "no held-out example answers a post with a kept image"}
    encoder, reason = clip_encoder(clip_model)
    if encoder is None:
        return {"clip_note": reason}
    known = known_replies or {}
    missing = [e for e in image_examples if e["id"] not in known]
    if missing:
        with nullcontext() if use_adapter else model.disable_adapter():
            generated = generate_replies(model, tokenizer, [e["prompt"] for e in missing], device)
        known = {**known, **{e["id"]: reply for e, reply in zip(missing, generated)}}
    try:
        return image_text_alignment(encoder, image_examples, [known[e["id"]] for e in image_examples])
    except OSError as error:  # stored images gone (a run folder moved without its data/)
        return {"clip_note": f"the stored images cannot be read: {error}"}


def conditioned_clip_scores(model, tokenizer, projector, encoder, examples: list[dict], features_of, blank_features,
                            *, max_length: int, tokens_per_image: int, max_images: int, use_adapter: bool = True,
                            max_new_tokens: int = GENERATED_REPLY_TOKENS) -> dict:
    """The CLIP fields of EvalMetrics when the model reads images (the multimodal projector): for each of `examples`
    (held-out replies to image posts) one greedy reply generated with the post's images as soft tokens and one
    with `blank_features` (a blank white image's embedding) in their place, each scored against the post's images
    with CLIPScore (Hessel et al. 2021): the images' stored CLIP embeddings (`features_of`, the image tower) and
    CLIP's text tower (texts cut to its context). The real reply (a ceiling) and the post's text are scored the
    same way. Images without features and the like are left out and counted (`clip_left_out`); `clip_note` says
    why nothing was scored."""
    from collections import Counter

    from fl_crew_reddit.evaluation.clip_score import example_clip_scores
    from fl_crew_reddit.training.multimodal import generate_with_images, multimodal_rows, with_images_replaced

    if not examples:
        return {"clip_note": "no held-out example answers a post with a kept image"}
    left_out: Counter = Counter()
    kept, rows = [], []
    for example in examples:  # one at a time: an example without a row must not shift the others
        built = multimodal_rows(tokenizer, [example], features_of, max_length=max_length,
                                tokens_per_image=tokens_per_image, max_images=max_images)
        left_out.update(built.skipped)
        if built.rows and built.rows[0]["image_slots"]:
            kept.append(example)
            rows.append(built.rows[0])
    if not rows:
        return {"clip_note": f"none of the {len(examples)} held-out image posts chosen for the CLIP score has an "
                             "image with stored CLIP features", "clip_left_out": dict(sorted(left_out.items()))}
    with nullcontext() if use_adapter else model.disable_adapter():
        generated = generate_with_images(model, projector, tokenizer, rows, max_new_tokens=max_new_tokens)
        generated_blank = generate_with_images(model, projector, tokenizer,
                                               with_images_replaced(rows, blank_features),
                                               max_new_tokens=max_new_tokens)
    images = [row["image_embeds"] for row in rows]

    def score(texts: list[str]) -> float:
        return float(example_clip_scores(images, encoder.text_embeddings(texts)).mean())

    return {"clip_score": score(generated), "clip_score_blank": score(generated_blank),
            "clip_score_reply": score([e["messages"][-1]["content"] for e in kept]),
            "clip_score_post": score([e["messages"][0]["content"] for e in kept]),
            "clip_examples": len(rows), "clip_left_out": dict(sorted(left_out.items())),
            "clip_image_conditioned": True}

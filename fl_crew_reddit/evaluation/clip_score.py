"""Image–text alignment of image posts: CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning"), in the 0–100 form torchmetrics uses: 100 · max(cos(image, text), 0).

`clip_scores` is the pure metric on embeddings. `image_text_alignment` scores, for held-out examples of image posts,
three texts against the post's images: the generated reply (what changes from round to round), the real reply and
the post's own text (two fixed reference levels). An example with several images (a gallery, a video's keyframes)
scores the mean over its images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fl_crew_reddit.preprocessing.image_features import ClipEncoder, image_features


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """100 · max(cos, 0) for each row pair; embeddings need not be normalised."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs "
                         f"{tuple(text_embeds.shape)}")
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1, eps=1e-8)
    return 100.0 * cosine.clamp(min=0.0)


def example_clip_scores(image_embeds: list[torch.Tensor], text_embeds: torch.Tensor) -> torch.Tensor:
    """[n] CLIPScore of each example: the mean over its images ([k, d] each) of 100 · max(cos(image, its text), 0)."""
    if len(image_embeds) != text_embeds.shape[0]:
        raise ValueError(f"{len(image_embeds)} image sets for {text_embeds.shape[0]} texts")
    if any(images.dim() != 2 or images.shape[0] == 0 for images in image_embeds):
        raise ValueError("each example needs a [k, d] tensor of at least one image embedding")
    return torch.stack([clip_scores(images.float(), text.float().expand_as(images)).mean()
                        for images, text in zip(image_embeds, text_embeds)])


def mean_clip_score(encoder: ClipEncoder, image_paths: list[list[str]], texts: list[str]) -> float:
    """Mean over examples of each example's mean CLIPScore over its images."""
    if len(image_paths) != len(texts):
        raise ValueError(f"{len(image_paths)} image lists for {len(texts)} texts")
    flat = [Path(p) for paths in image_paths for p in paths]
    owner = [i for i, paths in enumerate(image_paths) for _ in paths]
    if not flat:
        raise ValueError("no images to score")
    images = image_features(encoder, flat)
    text = encoder.text_embeddings(texts)[torch.tensor(owner)]
    per_pair = clip_scores(images, text)
    per_example = torch.zeros(len(texts)).index_add_(0, torch.tensor(owner), per_pair)
    counts = torch.zeros(len(texts)).index_add_(0, torch.tensor(owner), torch.ones(len(owner)))
    scored = counts > 0
    return float((per_example[scored] / counts[scored]).mean())


def image_text_alignment(encoder: ClipEncoder, examples: list[dict], generated: list[str]) -> dict:
    """{clip_score, clip_score_reply, clip_score_post, clip_examples} for examples with `image_paths`."""
    paths = [example["image_paths"] for example in examples]
    return {
        "clip_score": mean_clip_score(encoder, paths, generated),
        "clip_score_reply": mean_clip_score(encoder, paths, [e["messages"][-1]["content"] for e in examples]),
        "clip_score_post": mean_clip_score(encoder, paths, [e["messages"][0]["content"] for e in examples]),
        "clip_examples": len(examples),
    }

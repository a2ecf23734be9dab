"""Pure text and likelihood metrics: perplexity, BLEU (sacrebleu), ROUGE-L (rouge-score). No model, no I/O.

`evaluate.load()` fetches metric scripts from a hub and fails offline, so the libraries are called directly.
"""
from __future__ import annotations

import math

import sacrebleu
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp of the mean per-token negative log-likelihood."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total_nll / num_tokens)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0–100), sacrebleu's default tokenisation."""
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (0–1) over pairs."""
    if not hypotheses:
        return 0.0
    scores = [_ROUGE.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return sum(scores) / len(scores)

"""Pure text and likelihood metrics: perplexity, BLEU (sacrebleu), ROUGE-L (rouge-score). No model, no I/O.

`evaluate.load()` fetches metric scripts from a hub and fails offline, so the libraries are called directly.
"""
from __future__ import annotations

import math
from functools import cache

import sacrebleu


@cache
def _rouge_scorer():
    """rouge-score loads nltk (~1.6 s of CPU): only in a process that scores generated replies, not in every
    trainer, site worker and command that imports the evaluator."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


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


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0–1) over pairs."""
    if not hypotheses:
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    scores = [_rouge_scorer().score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {name: sum(s[key].fmeasure for s in scores) / len(scores)
            for name, key in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL"))}


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (0–1) over pairs."""
    return rouge(hypotheses, references)["rouge_l"]


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (0–100): character n-grams, kinder than BLEU to short, informal replies."""
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the generated replies: low values mean repetitive, generic text."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0

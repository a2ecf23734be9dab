"""The Evaluator's model-side work: held-out reply perplexity and generated replies scored against real ones."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from pydantic import BaseModel, Field

from fl_crew_reddit.evaluation.metrics import bleu, chrf, distinct_n, perplexity, rouge
from fl_crew_reddit.training.batching import collate, reply_token_nll
from fl_crew_reddit.training.trainer import autocast_context


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


@torch.no_grad()
def held_out_perplexity(model, rows: list[dict], pad_id: int, device: torch.device, batch_size: int = 8,
                        mixed_precision: str = "auto") -> tuple[float, int]:
    total, count = held_out_nll(model, rows, pad_id, device, batch_size, mixed_precision)
    return perplexity(total, count), count


@torch.no_grad()
def held_out_nll(model, rows: list[dict], pad_id: int, device: torch.device, batch_size: int = 8,
                 mixed_precision: str = "auto") -> tuple[float, int]:
    """Summed reply-token NLL and token count (sums combine across clients; perplexities do not)."""
    model.eval()
    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id, device)
        with autocast_context(device, mixed_precision):
            nll, n = reply_token_nll(model, batch)
        total += float(nll)
        count += n
    return total, count


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], device: torch.device, max_new_tokens: int = 48,
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


def evaluate(model, tokenizer, test_rows: list[dict] | dict[str, list[dict]], sample_examples: list[dict],
             device: torch.device, use_adapter: bool = True, mixed_precision: str = "auto") -> EvalMetrics:
    """Perplexity on every held-out reply (overall and per client when `test_rows` is a dict by client);
    BLEU / ROUGE-L on a fixed sample of generated replies."""
    test_sets = test_rows if isinstance(test_rows, dict) else {"all": test_rows}
    context = nullcontext() if use_adapter else model.disable_adapter()
    with context:
        sums = {name: held_out_nll(model, rows, tokenizer.pad_token_id, device, mixed_precision=mixed_precision)
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

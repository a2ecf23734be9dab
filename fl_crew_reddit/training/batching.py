"""Token batches for causal-LM fine-tuning on replies: length-grouped, right-padded, loss only on reply tokens."""
from __future__ import annotations

import random

import torch

from fl_crew_reddit.preprocessing.examples import tokenize_example


def tokenize_all(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    rows = []
    for example in examples:
        row = tokenize_example(tokenizer, example["messages"], max_length)
        if row is not None:
            rows.append(row)
    return rows


def length_grouped_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then sort within windows of 32 batches by length: little padding, still a random order."""
    order = rows[:]
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda r: len(r["input_ids"]))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(batch: list[dict], pad_id: int, device: torch.device, pad_side: str = "right") -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    reply = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        span = slice(0, n) if pad_side == "right" else slice(width - n, width)
        input_ids[i, span] = torch.tensor(row["input_ids"])
        attention[i, span] = 1
        reply[i, span] = torch.tensor(row["reply_mask"], dtype=torch.bool)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "reply_mask": reply.to(device)}


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Each row is its real tokens, then only padding (a run of ones, then zeros)."""
    return bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all() and attention_mask[:, 0].all())


def reply_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over reply tokens, and their count.

    The output layer (vocabulary × hidden) is a large share of a small model's compute, so it runs only at the
    positions whose next token is a reply token: same loss, about 1.5× faster steps on the embedded model.
    A right-padded batch runs as plain causal attention, without a padding mask: a real token only attends to
    earlier positions, which are all real, so its result is the same, and the model skips building the 4D mask.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    mask = batch["attention_mask"]
    attention_mask = None if is_right_padded(mask) else mask
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=attention_mask).last_hidden_state
    targets_mask = batch["reply_mask"][:, 1:]
    selected = hidden[:, :-1][targets_mask]
    targets = batch["input_ids"][:, 1:][targets_mask]
    logits = causal_lm.get_output_embeddings()(selected).float()
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return nll, int(targets.numel())

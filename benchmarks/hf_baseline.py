"""The plain Hugging Face recipe both throughput benchmarks compare against, in one place.

`Trainer` + PEFT as most fine-tuning scripts run it: every example padded to the longest of its batch
(`DataCollatorForSeq2Seq`), labels −100 on the prompt and the padding. Only torch and transformers are imported, so
the GPU machine (which has no crew or MCP packages) can load it beside `gpu_throughput.py`.
"""
from __future__ import annotations

import torch


def padded_reply_data(rows: list[dict], tokenizer):
    """(dataset, collate, sizes): the rows as a `Dataset` of input ids and reply-only labels, a collator that pads
    each batch to its longest row, and the list that collator appends (real tokens, padded positions) to per batch,
    which is how the benchmarks count the tokens a step really trained on."""
    from transformers import DataCollatorForSeq2Seq

    class Replies(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            row = rows[index]
            labels = [t if m else -100 for t, m in zip(row["input_ids"], row["reply_mask"])]
            return {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": labels}

    padder = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    sizes: list[tuple[int, int]] = []

    def collate(features):
        batch = padder(features)
        sizes.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
        return batch

    return Replies(), collate, sizes

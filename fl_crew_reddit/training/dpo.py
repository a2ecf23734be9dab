"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs of Reddit replies.

A pair is one prompt with a chosen and a rejected reply. DPO raises the policy's log-probability of the chosen reply
relative to a frozen reference and lowers that of the rejected one:
    loss = −log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]).
Log-probabilities are those of the reply tokens only (the prompt is shared by both rows of a pair). The chosen and
rejected rows of a micro-batch run through the model together, in one padded (or packed) forward, and the output
layer runs only at reply positions, as for SFT (`batching.reply_hidden`, `linear_cross_entropy`).

The reference is never a second model copy: in training it is the policy itself before its first step (the received
global adapter, log-probs computed once per fit) or, with DPO_REFERENCE=after_sft, after the fit's SFT steps; in
evaluation the base model (`model.disable_adapter()`).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from fl_crew_reddit.preprocessing.examples import tokenize_example
from fl_crew_reddit.training.batching import (
    collate,
    length_grouped_batches,
    linear_cross_entropy,
    pack,
    reply_hidden,
    token_budget_batches,
)

OBJECTIVES = ("sft", "dpo", "sft_then_dpo")
# where a fit's DPO reference log-probs are taken: the received global adapter (before any step of the fit), or the
# policy after the fit's SFT steps (the standard SFT → DPO pipeline; the same thing under "dpo" alone)
DPO_REFERENCES = ("global", "after_sft")
# the preference loss on a pair's margin: DPO's −log σ (Rafailov et al.) or IPO's squared distance to 1/(2β)
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """Each pair → {"id", "kind", "chosen": row, "rejected": row} (rows as `tokenize_example` builds them for the
    prompt plus that reply). Left out: a pair either of whose rows cannot be built, and one whose two rows are the
    same tokens (replies that only differ past the length cut): it carries no preference."""
    out = []
    for pair in pairs:
        rows = [tokenize_example(tokenizer, list(pair["prompt"]) + [{"role": "assistant", "content": pair[side]}],
                                 max_length) for side in ("chosen", "rejected")]
        if rows[0] is None or rows[1] is None or rows[0]["input_ids"] == rows[1]["input_ids"]:
            continue
        out.append({"id": pair.get("id"), "kind": pair.get("kind"), "chosen": rows[0], "rejected": rows[1]})
    return out


def reply_target_count(row: dict) -> int:
    """Reply tokens of a row that are predicted (all but one at position 0)."""
    return sum(row["reply_mask"][1:])


def batch_reply_logprobs(model, batch: dict, counts: list[int], backend: str | None = None) -> torch.Tensor:
    """Summed log-probability of each row's reply tokens in a built batch (`collate` or `pack`), shape [rows].
    `counts`: each row's reply targets (`reply_target_count`), in the batch's row order."""
    selected, targets, _ = reply_hidden(model, batch, backend)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    sums, start = [], 0
    for n in counts:  # the batch's reply positions are row after row
        sums.append(linear_cross_entropy(selected[start:start + n], head, targets[start:start + n]))
        start += n
    if start != selected.shape[0]:
        raise ValueError(f"reply counts add up to {start}, the batch has {selected.shape[0]} reply targets")
    return -torch.stack(sums).float()


def reply_logprobs(model, rows: list[dict], device: torch.device, pad_id: int) -> torch.Tensor:
    """Summed log-probability of each row's reply tokens, shape [len(rows)], in one padded forward (the prompt
    tokens are context only). Gradient follows the caller's mode (no_grad or not)."""
    batch = collate(rows, pad_id, device)
    return batch_reply_logprobs(model, batch, [reply_target_count(row) for row in rows])


def pair_batch(pairs: list[dict], device: torch.device, pad_id: int, packed: bool = False) -> tuple[dict, list[int]]:
    """One micro-batch of pairs as rows [chosen 1..B, rejected 1..B], and each row's reply target count."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = pack(rows, device) if packed else collate(rows, pad_id, device)
    return batch, [reply_target_count(row) for row in rows]


def pair_logprobs(model, pairs: list[dict], device: torch.device, pad_id: int, batch_size: int = 8,
                  packed: bool = False, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed reply log-probs of every pair, each [len(pairs)], float32 on `device`, in batches
    of `batch_size` pairs of similar length. No gradient; the caller sets the model's mode (eval for a reference)."""
    order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i]))
    chosen = torch.zeros(len(pairs), dtype=torch.float32, device=device)
    rejected = torch.zeros(len(pairs), dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, len(order), max(1, batch_size)):
            index = order[start:start + max(1, batch_size)]
            batch, counts = pair_batch([pairs[i] for i in index], device, pad_id, packed)
            logps = batch_reply_logprobs(model, batch, counts, backend)
            where = torch.tensor(index, device=device)
            chosen[where] = logps[:len(index)]
            rejected[where] = logps[len(index):]
    return chosen, rejected


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean −log σ(β[(πc − rc) − (πr − rr)]), chosen rewards β(πc − rc), rejected rewards β(πr − rr)); the
    rewards are detached. −log σ(x) is computed as softplus(−x): finite for any finite margin."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = F.softplus(-(chosen_rewards - rejected_rewards)).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, chosen_targets: torch.Tensor,
             rejected_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): the mean over pairs of (h − 1/(2β))², h the margin of per-token log-ratios
    (log π(c) − log π_ref(c)) / |c| − (log π(r) − log π_ref(r)) / |r| (per token, as TRL's "ipo" does: a sum would
    make the target depend on reply length). Unlike DPO's −log σ, which keeps pushing a pair it already ranks right,
    the square stops at the margin 1/(2β) and pulls a pair past it back: a bounded move away from the reference.
    The rewards returned are DPO's, β(log π − log π_ref) summed over the reply, so metrics compare across losses."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    dtype = policy_chosen.dtype
    margin = ((policy_chosen - ref_chosen) / chosen_targets.clamp(min=1).to(dtype)
              - (policy_rejected - ref_rejected) / rejected_targets.clamp(min=1).to(dtype))
    loss = ((margin - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def rpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, chosen_targets: torch.Tensor,
             sft_weight: float, loss_type: str = "sigmoid",
             rejected_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """The preference loss (`loss_type`: "sigmoid", DPO's `dpo_loss`, or "ipo", `ipo_loss`, which needs
    `rejected_targets`) plus an SFT term on the chosen reply (RPO, Pang et al. 2024, "DPO + NLL"): the mean over
    pairs of the preference loss + α · (−log π(c) / |c|), α = `sft_weight`, |c| = the chosen reply's targets
    (`chosen_targets`). Plain DPO lowers the chosen reply's likelihood too as long as the rejected one falls faster;
    the NLL term keeps the real replies likely, i.e. the perplexity near SFT's. Returns (loss, chosen rewards,
    rejected rewards, each pair's chosen per-token NLL, detached); α = 0 is the preference loss exactly (the term
    is not added at all)."""
    if loss_type == "sigmoid":
        loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          beta)
    elif loss_type == "ipo":
        if rejected_targets is None:
            raise ValueError("the ipo loss needs the rejected replies' target counts")
        loss, chosen_rewards, rejected_rewards = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          beta, chosen_targets, rejected_targets)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")
    chosen_nll = -policy_chosen / chosen_targets.clamp(min=1).to(policy_chosen.dtype)
    if sft_weight:
        loss = loss + sft_weight * chosen_nll.mean()
    return loss, chosen_rewards, rejected_rewards, chosen_nll.detach()


def preference_wins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Pairs whose chosen reward beats the rejected one, a tie counting ½."""
    return float((chosen_rewards > rejected_rewards).sum()) + 0.5 * float((chosen_rewards == rejected_rewards).sum())


def preference_metrics(model, pair_rows: list[dict], device: torch.device, pad_id: int, beta: float,
                       batch_size: int = 8) -> dict:
    """Held-out preference metrics of an adapter: the implicit reward of a reply is β(log π − log π_base), π_base
    being the same model with its adapter disabled. "preference_accuracy": share of pairs whose chosen reward is
    above the rejected one (ties ½: a zero adapter scores 0.5); "reward_margin": mean chosen − rejected reward;
    "pairs": how many. Runs in eval mode, without gradient; the model's mode is restored."""
    if not pair_rows:
        return {"preference_accuracy": None, "reward_margin": None, "pairs": 0}
    was_training = model.training
    model.eval()
    try:
        policy = pair_logprobs(model, pair_rows, device, pad_id, batch_size)
        with model.disable_adapter():
            base = pair_logprobs(model, pair_rows, device, pad_id, batch_size)
    finally:
        model.train(was_training)
    return implicit_reward_metrics(policy, base, beta)


def implicit_reward_metrics(policy: tuple[torch.Tensor, torch.Tensor], base: tuple[torch.Tensor, torch.Tensor],
                            beta: float) -> dict:
    """`preference_metrics` from (chosen, rejected) reply log-probs of the policy and of the base model (a caller
    scoring several adapters on the same pairs computes the base ones once)."""
    chosen_rewards = beta * (policy[0] - base[0])
    rejected_rewards = beta * (policy[1] - base[1])
    pairs = int(chosen_rewards.numel())
    if not pairs:
        return {"preference_accuracy": None, "reward_margin": None, "pairs": 0}
    return {"preference_accuracy": preference_wins(chosen_rewards, rejected_rewards) / pairs,
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()), "pairs": pairs}


def pair_length(pair: dict) -> int:
    return max(len(pair["chosen"]["input_ids"]), len(pair["rejected"]["input_ids"]))


def pair_step_batches(pairs: list[dict], config: dict, rng: random.Random, packed: bool,
                      tokens_per_batch: int) -> tuple[list[list[list[int]]], int]:
    """(optimizer steps of a DPO fit, micro-batches in the last epoch); a step is a list of micro-batches of pair
    indices: `local_epochs` shuffled passes,
    micro-batches of `batch_size` pairs of similar length (or, with a token budget, as many pairs as fit: a pair
    costs its two rows), `grad_accum_steps` micro-batches a step, at most `max_steps` steps."""
    index = list(range(len(pairs)))
    if packed:
        def cost(i: int) -> int:
            return len(pairs[i]["chosen"]["input_ids"]) + len(pairs[i]["rejected"]["input_ids"])
    else:  # padded: both rows are as wide as the longer one
        def cost(i: int) -> int:
            return 2 * pair_length(pairs[i])
    epochs = []
    for _ in range(int(config["local_epochs"])):
        if tokens_per_batch:
            epochs.append(token_budget_batches(index, max(tokens_per_batch, max(map(cost, index))), rng, packed,
                                               length=cost))
        else:
            epochs.append(length_grouped_batches(index, int(config["batch_size"]), rng, length=cost))
    accumulate = max(1, int(config.get("grad_accum_steps") or 1))
    micro = [batch for epoch in epochs for batch in epoch]
    steps = [micro[i:i + accumulate] for i in range(0, len(micro), accumulate)]
    if config.get("max_steps"):
        steps = steps[: int(config["max_steps"])]
    return steps, len(epochs[-1]) if epochs else 0

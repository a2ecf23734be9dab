"""How the report reads: a ReportSummary as blocks (headings, paragraphs, tables), rendered as Markdown or HTML.

Both files come from the same blocks, so they say the same thing; only this module formats numbers.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from typing import Any

from fl_crew_reddit.evaluation.report.summary import ReportSummary, RoundSummary, change_percent

SAMPLE_CHARS = 300
Block = tuple  # ("h1"|"h2"|"p"|"verdict", text) or ("table", headers, rows) or ("image", path, alt)


# --- formatting ----------------------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _signed_percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{'−' if value < 0 else '+'}{abs(value):.1f}%"


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) if value else "(none)"
    return str(value)


def _shorten(text: str, limit: int = SAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _table(headers: list[str], rows: Iterable[list[Any]]) -> Block:
    return ("table", headers, [[str(cell) for cell in row] for row in rows])


# --- the report as blocks ------------------------------------------------------------------------------------------
def verdict_sentence(summary: ReportSummary) -> str:
    v = summary.verdict
    if v.base is None:
        return "The base model has not been evaluated yet: there is nothing to compare the rounds with."
    if not v.rounds_evaluated:
        return f"No round has been evaluated yet (base model held-out perplexity {v.base:.2f})."
    change = _signed_percent(change_percent(v.final, v.base))
    if v.best_round is not None:  # the model a user would keep: chosen on validation, scored on test
        at = (f"at round {v.best_round} of {v.rounds_evaluated}, the round with the lowest validation perplexity "
              f"({_num(v.best_validation)})")
    else:  # a history without validation: the last round (never the best on test)
        rounds = f"{v.rounds_evaluated} round{'s' if v.rounds_evaluated != 1 else ''}"
        at = f"over {rounds}" if v.improved else f"after {rounds}"
    if v.improved:
        return f"Federated training lowered held-out perplexity from {v.base:.2f} to {v.final:.2f} ({change}) {at}."
    return (f"Federated training did not lower held-out perplexity: {v.base:.2f} (base) → {v.final:.2f} ({change}) "
            f"{at}.")


def summary_blocks(summary: ReportSummary, png_name: str | None = "convergence.png") -> list[Block]:
    blocks: list[Block] = [("h1", f"Federated run report: {summary.run_id}"), ("verdict", verdict_sentence(summary))]
    if png_name:
        blocks.append(("image", png_name, "Held-out perplexity and local train loss per round"))
    return (blocks + _rounds(summary) + _preferences(summary) + _self_improve(summary) + _analysis(summary)
            + _agent_steps(summary) + _samples(summary) + _data(summary) + _settings(summary))


def _round_row(r: RoundSummary) -> list[Any]:
    scores = r.scores
    ppl = scores.perplexity if scores else None
    validation = _num(scores.validation if scores else None)
    return [r.number, _num(ppl) if ppl is not None else "(not evaluated)", _signed_percent(r.change),
            f"{validation} (best)" if r.is_best else validation, _num(scores.bleu if scores else None),
            _num(scores.rouge_l if scores else None, 3), _num(r.mean_train_loss, 3), ", ".join(r.accepted) or "—",
            "; ".join(f"{name}: {', '.join(reasons) or 'no reason given'}" for name, reasons in r.left_out.items())
            or "—", _num(r.seconds, 0)]


def _rounds(summary: ReportSummary) -> list[Block]:
    blocks: list[Block] = [("h2", "Rounds")]
    rows = []
    if summary.base is not None:
        b = summary.base
        rows.append(["base", _num(b.perplexity), "", _num(b.validation), _num(b.bleu), _num(b.rouge_l, 3),
                     "", "", "", ""])
    rows += [_round_row(r) for r in summary.rounds]
    if not rows:
        return blocks + [("p", "No round has run yet.")]
    methods = sorted({r.method for r in summary.rounds} - {None})
    note = "Perplexity is on every held-out test reply; validation perplexity, on separate held-out threads, " \
           "chooses the best round. BLEU (0–100) and ROUGE-L (0–1) on a fixed sample of generated replies."
    if methods:
        note += f" Aggregation: {', '.join(methods)}."
    blocks += [("p", note), _table(["Round", "Perplexity", "Δ vs base", "Validation perplexity", "BLEU", "ROUGE-L",
                                    "Mean train loss", "Accepted", "Skipped (reason)", "Seconds"], rows)]
    return (blocks + _per_client(summary) + _losses(summary) + _communication(summary) + _privacy(summary)
            + _baselines(summary) + clip_section(summary) + image_contribution_section(summary))


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def _communication(summary: ReportSummary) -> list[Block]:
    """Bytes per round and the run's total: the serialized Flower messages, or, in-process, the update files."""
    rounds = [r for r in summary.rounds if r.bytes_down or r.bytes_up or r.update_file_bytes]
    if not rounds:
        return []
    compression = str(summary.settings.get("update_compression") or "none")
    compressed = f", compressed with UPDATE_COMPRESSION={compression}" if compression != "none" else ""
    if not any(r.bytes_down or r.bytes_up for r in rounds):
        total = sum(r.update_file_bytes for r in rounds)
        return [("p", f"Communication: none over a network (in-process engine); the clients' updates were "
                      f"{_megabytes(total)} of adapter files over {len(rounds)} round(s), "
                      f"{_megabytes(total // len(rounds))} per round{compressed}.")]
    rows = [[r.number, _megabytes(r.bytes_down), _megabytes(r.bytes_up), _megabytes(r.bytes_down + r.bytes_up),
             len(r.train_loss)] for r in rounds]
    down, up = sum(r.bytes_down for r in rounds), sum(r.bytes_up for r in rounds)
    rows.append(["total", _megabytes(down), _megabytes(up), _megabytes(down + up), ""])
    return [("p", "Communication per round (serialized Flower messages: the global adapter down to each sampled "
                  f"client, its update up{compressed}):"),
            _table(["Round", "Sent down", "Sent up", "Both", "Clients"], rows)]


def _size(count: float) -> str:
    return _megabytes(int(count)) if count >= 1e6 else f"{count / 1e3:,.1f} kB"


def _privacy_status(summary: ReportSummary) -> Block:
    """One line: DP and SecAgg on or off, and the bytes a round moved (with the compression), so the section says
    what was *not* protected too."""
    dp = f"DP_MODE={summary.privacy[-1][1].mode} (below)" if summary.privacy else "off"
    secagg = f"on in {len(summary.secure_rounds)} round(s) (below)" if summary.secure_rounds else \
        "off (the server received each client's update and screened it)"
    rounds = [r for r in summary.rounds if r.bytes_down or r.bytes_up or r.update_file_bytes]
    compression = str(summary.settings.get("update_compression") or "none")
    if rounds and any(r.bytes_down or r.bytes_up for r in rounds):
        wire = (f"{_size(sum(r.bytes_down for r in rounds) / len(rounds))} down and "
                f"{_size(sum(r.bytes_up for r in rounds) / len(rounds))} up per round (serialized Flower messages")
    elif rounds:
        wire = f"{_size(sum(r.update_file_bytes for r in rounds) / len(rounds))} of update files per round (in-process"
    else:
        wire = "not recorded (no sizes in this history"
    return ("p", f"Differential privacy: {dp}. Secure aggregation: {secagg}. Bytes: {wire}, mean over "
                 f"{len(rounds)} round(s), UPDATE_COMPRESSION={compression}).")


def _privacy(summary: ReportSummary) -> list[Block]:
    """DP: the privacy spent after each round (dp_accounting's RDP accountant), the noise and who was clipped;
    SecAgg+: which rounds the server saw only the sum of, and of how many clients. The section is there when any
    of DP, SecAgg, attackers or compression was on, and starts with what was on and off."""
    blocks: list[Block] = _attacks(summary)
    compressed = str(summary.settings.get("update_compression") or "none") != "none"
    if blocks or summary.secure_rounds or summary.privacy or compressed:
        blocks = [_privacy_status(summary), *blocks]
    if summary.secure_rounds:
        rows = [[number, params.get("clients_in_sum", "—"), params.get("reconstruction_threshold", "—"),
                 params.get("clipping_range", "—"), params.get("quantization_range", "—")]
                for number, params in summary.secure_rounds]
        blocks += [("p", "Secure aggregation (Flower's SecAgg+) was on: the server received only the weighted sum of "
                         "the clients' masked updates, never one client's update, so it could not screen them one by "
                         "one (each site clipped its own)."),
                   _table(["Round", "Clients in the sum", "Shares needed", "Clipping range", "Quantization range"],
                          rows)]
    if not summary.privacy:
        return [("h2", "Privacy and security"), *blocks] if blocks else []
    blocks = [("h2", "Privacy and security"), *blocks]
    last = summary.privacy[-1][1]
    where = "the server added it to the sum of clipped updates" if last.mode == "central" else \
        "each client added it to its own clipped update before sending"
    rows = [[number, f"{p.epsilon:.3f}", f"{p.delta:g}", f"{p.noise_multiplier:.4g}", f"{p.clip_norm:g}",
             ", ".join(p.clipped) or "—"] for number, p in summary.privacy]
    return blocks + [
            ("p", f"Client-level differential privacy, DP_MODE={last.mode}: each client's update was clipped to L2 "
                  f"norm {last.clip_norm:g} and Gaussian noise of {last.noise_multiplier:.4g} × that norm was "
                  f"added ({where}). After round {summary.privacy[-1][0]} the run has spent ε = {last.epsilon:.3f} "
                  f"at δ = {last.delta:g} (Rényi DP accountant of dp_accounting, replace-one client adjacency)."),
            _table(["Round", "ε after the round", "δ", "Noise multiplier", "Clip norm", "Clipped clients"], rows)]


def _attacks(summary: ReportSummary) -> list[Block]:
    """ATTACK: the simulated attackers of each round and what the update screen and the rule did with them."""
    if not summary.attacks:
        return []
    rows = [[a.round, a.attack, ", ".join(a.attackers) or "—", ", ".join(a.accepted) or "none",
             "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in a.rejected.items()) or "none",
             a.method or "—", _num(a.backdoor_success, 3) if a.backdoor_success is not None else "—",
             _attacker_updates(a)]
            for a in summary.attacks]
    return [("p", "Simulated attackers (ATTACK): each trained on its own data and then attacked. The screen "
                  "(keys, shapes, dtypes, finite values, norm) let in or refused each attacker's update; the rule "
                  "then combined what was let in."),
            _table(["Round", "Attack", "Attackers", "Let in by the screen", "Refused by the screen", "Rule",
                    "Backdoor success", "Attacker's update"], rows)]


def _attacker_updates(row) -> str:
    """Each attacker's sent norm next to its honestly trained one, and whether the DP clip / norm bound cut it."""
    parts = []
    for name in row.attackers:
        if name not in row.sent_norms:
            continue
        text = f"{name}: norm {row.sent_norms[name]:.2f} sent"
        if name in row.trained_norms:
            text += f", {row.trained_norms[name]:.2f} trained"
        if name in row.clipped and row.clip_norm is not None:
            text += f", clipped to {row.clip_norm:g}"
        parts.append(text)
    return "; ".join(parts) or "—"


def _per_client(summary: ReportSummary) -> list[Block]:
    base = summary.base.per_client if summary.base else {}
    per_round = [(r.number, r.scores.per_client) for r in summary.rounds if r.scores and r.scores.per_client]
    if not per_round and not base:
        return []
    names = list(dict.fromkeys([*base, *(name for _, pc in per_round for name in pc)]))
    rows = [["base"] + [_num(base.get(n)) for n in names]] if base else []
    rows += [[number] + [_num(pc.get(n)) for n in names] for number, pc in per_round]
    return [("p", "Held-out perplexity on each client's own test split:"), _table(["Round"] + names, rows)]


def _losses(summary: ReportSummary) -> list[Block]:
    rounds = [r for r in summary.rounds if r.train_loss]
    if not rounds or not summary.client_names:
        return []
    rows = [[r.number] + [_num(r.train_loss.get(n), 3) for n in summary.client_names] for r in rounds]
    return [("p", "Local train loss per client (mean over the round's steps):"),
            _table(["Round"] + summary.client_names, rows)]


def _baselines(summary: ReportSummary) -> list[Block]:
    """Every method at its own best round on validation, with the test perplexity of that checkpoint."""
    if not summary.baselines:
        return []
    rows = []
    if summary.best is not None:
        best = summary.best
        rows.append(["federated", _num(best.scores.perplexity), _signed_percent(best.change), f"round {best.number}",
                     _num(best.scores.validation), _num(best.scores.bleu), _num(best.scores.rouge_l, 3),
                     "global adapter"])
    for b in summary.baselines:
        read_at = (f"round {b.best_round}" if b.best_round is not None else
                   f"each client's best: {', '.join(map(str, b.client_best_rounds))}" if b.client_best_rounds else "—")
        rows.append([b.name, _num(b.perplexity), _signed_percent(b.change), read_at, _num(b.validation_at_best),
                     "—", "—", b.description])
    blocks: list[Block] = [
        ("h2", "Baselines"),
        ("p", "Each method is read at its own best round (or round-equivalent chunk of its steps) on the validation "
              "split; the perplexities are on the test split, which never chooses."),
        _table(["Method", "Perplexity", "Δ vs base", "Read at", "Validation perplexity", "BLEU", "ROUGE-L", "Notes"],
               rows)]
    columns = summary.client_comparison
    if not columns:
        return blocks
    clients = list(dict.fromkeys(client for values in columns.values() for client in values))
    rows = [[client] + [_num(values.get(client)) for values in columns.values()] for client in clients]
    return blocks + [("p", "Per client, on each client's own test split:"), _table(["Client"] + list(columns), rows)]


def _preferences(summary: ReportSummary) -> list[Block]:
    """Preference learning: the objective, pairs per client by kind, held-out preference accuracy and reward margin
    per round (and of the base model and the baselines), and the clients that trained SFT instead of DPO, and why."""
    prefs = summary.preferences
    if prefs is None:
        return []
    beta = f", β = {prefs.beta:g}" if prefs.beta is not None and prefs.objective != "sft" else ""
    if prefs.sft_weight is not None and prefs.objective != "sft":
        beta += f", SFT term on the chosen reply α = {prefs.sft_weight:g}"
    if prefs.objective != "sft":
        if prefs.reference is not None:
            beta += (", DPO reference: the policy after the SFT steps" if prefs.reference == "after_sft"
                     else ", DPO reference: the received global adapter")
        if prefs.dpo_learning_rate:
            beta += f", DPO learning rate {prefs.dpo_learning_rate:g}"
        if prefs.dpo_epochs:
            beta += f", {prefs.dpo_epochs} DPO epoch{'s' if prefs.dpo_epochs != 1 else ''} a round"
        if prefs.loss_type == "ipo":
            beta += f", IPO loss (target margin 1/(2β) = {1 / (2 * prefs.beta):g} per reply token)" if prefs.beta \
                else ", IPO loss"
    blocks: list[Block] = [("h2", "Preference learning"), ("p", f"Local objective: {prefs.objective}{beta}.")]
    kinds = sorted({kind for splits in prefs.pairs.values() for counts in splits.values() for kind in counts})
    if prefs.pairs:
        rows = []
        for client, splits in prefs.pairs.items():
            for split in ("train", "validation", "test"):
                if split in splits:
                    left_out = prefs.left_out.get(client, {}).get(split)
                    rows.append([client, split] + [_count(splits[split].get(kind, 0)) for kind in kinds]
                                + [_count(left_out) if left_out else "—"])
        blocks += [("p", "Preference pairs per client, split and kind (pairs left out: their rows could not be "
                         "built):"), _table(["Client", "Split"] + kinds + ["Left out"], rows)]
    else:
        blocks.append(("p", "No client has preference pairs."))
    if prefs.rows:
        clients = list(dict.fromkeys(name for row in prefs.rows for name in row.per_client))
        rows = [[r.label, _num(r.accuracy, 3), _num(r.margin, 3), _num(r.validation_accuracy, 3),
                 _count(r.pairs) if r.pairs else "—"] + [_num(r.per_client.get(c), 3) for c in clients]
                for r in prefs.rows]
        blocks += [("p", "Held-out preference accuracy (share of pairs whose chosen reply gets the higher implicit "
                         "reward β(log π − log π_base); ties count ½, so the base model scores 0.5) and mean reward "
                         "margin, on the test pairs, per round; validation accuracy; accuracy on each client's own "
                         "test pairs:"),
                   _table(["Model", "Accuracy", "Reward margin", "Validation accuracy", "Test pairs"]
                          + [f"{c} accuracy" for c in clients], rows)]
    if prefs.trained:
        rows = [[r, c, used, _num(loss, 3), _num(acc, 3)] for r, c, used, loss, acc in prefs.trained]
        blocks += [("p", "Local training per round: the objective each client used, its DPO loss and train "
                         "preference accuracy:"),
                   _table(["Round", "Client", "Objective used", "DPO loss", "Train accuracy"], rows)]
    if prefs.skipped:
        blocks += [("p", "Clients that trained SFT instead of DPO, and why:"),
                   _table(["Round", "Client", "Reason"], [[r, c, reason] for r, c, reason in prefs.skipped])]
    elif prefs.objective != "sft":
        blocks.append(("p", "No client fell back to SFT."))
    return blocks


def _self_improve(summary: ReportSummary) -> list[Block]:
    """SELF_IMPROVE: per round and client, the replies the global adapter generated for the client's own train
    prompts, how many it kept as synthetic training examples, why the others were rejected, the mean implicit reward
    (per token, against the base model) of the real replies and of the kept ones, and the collapse guard's stops."""
    if not summary.self_improve:
        return []
    rows = [[r.round, r.client, _count(r.generated), _count(r.kept),
             ", ".join(f"{reason} {n}" for reason, n in sorted(r.rejected.items(), key=lambda kv: -kv[1])) or "—",
             _num(r.real_reward, 3), _num(r.kept_reward, 3), r.stopped or "—"]
            for r in summary.self_improve]
    kept = sum(r.kept for r in summary.self_improve)
    generated = sum(r.generated for r in summary.self_improve)
    return [("h2", "Self-improvement"),
            ("p", f"The global adapter wrote {_count(generated)} replies to the clients' own train prompts; "
                  f"{_count(kept)} were kept as synthetic training examples for the next round (never in validation "
                  "or test). A client stops adding once its validation perplexity or preference accuracy worsens "
                  "(the collapse guard); the rounds' held-out metrics above show the effect."),
            _table(["Round", "Client", "Generated", "Kept", "Rejected (reason count)", "Real reply reward",
                    "Kept reward", "Guard stopped"], rows)]


def clip_section(summary: ReportSummary) -> list[Block]:
    """Image–text alignment (CLIP score) per round, or the one sentence saying why it was not computed."""
    if summary.clip_note:
        return [("p", f"CLIP score: not computed — {summary.clip_note}.")]
    if not summary.clip_rows:
        return []  # a history from before the CLIP score
    intro = ("CLIP score (image–text alignment, 100·max(cos, 0) between CLIP embeddings of a post's images and "
             "a text; 0–100, higher is closer) on held-out replies to image posts:")
    if any(c.blank is not None for c in summary.clip_rows):  # multimodal: generated with the image and without
        rows = [[c.label, _num(c.score), _num(c.blank), _num(c.reply), _num(c.post), _count(c.examples)]
                for c in summary.clip_rows]
        return [("p", intro[:-1] + ". The replies were generated greedily with the post's images as soft tokens and "
                                   "again with a blank white image in their place: the gap between the two columns "
                                   "is how much the image steers what the model writes, and the real replies' "
                                   "score is the level a human reply reaches (a ceiling)."),
                _table(["Round", "Generated (image)", "Generated (blank image)", "Real replies", "Post text",
                        "Examples"], rows)]
    rows = [[c.label, _num(c.score), _num(c.reply), _num(c.post), _count(c.examples)] for c in summary.clip_rows]
    return [("p", intro),
            _table(["Round", "Generated replies", "Real replies", "Post text", "Examples"], rows)]


def image_contribution_section(summary: ReportSummary) -> list[Block]:
    """Multimodal training: reply perplexity on held-out replies to image posts with the real image vs a blank
    one, per round (nothing for a text-only run)."""
    if not summary.image_rows:
        return []
    rows = [[r.label, _num(r.real), _num(r.blank), _num(math.log(r.blank) - math.log(r.real), 4), _count(r.examples),
             _count(r.left_out)] for r in summary.image_rows]
    return [("p", "Image contribution: reply perplexity on held-out replies to image posts with the post's real "
                  "image vs a blank image in its place (nats/token > 0: the image helps):"),
            _table(["Round", "Real image", "Blank image", "Nats/token", "Examples", "Images left out"], rows)]


def _analysis(summary: ReportSummary) -> list[Block]:
    """The Evaluator agent's own words per round (LLM-driven mode only)."""
    if not summary.analyses:
        return []
    return [("h2", "Evaluator's analysis")] + [("p", f"Round {number}: {text}") for number, text in summary.analyses]


def _agent_steps(summary: ReportSummary) -> list[Block]:
    """The steps where an agent's LLM chose the call, or its call was refused and the direct call ran instead."""
    if not summary.llm_steps:
        return []
    return [("h2", "Agent steps"),
            ("p", "Steps driven by an agent's LLM: llm when its call was used, fallback when the direct call ran "
                  "instead, and why."),
            _table(["Role", "Tool", "Round", "Outcome", "Reason"],
                   [[s.role, s.tool, s.round, s.outcome, s.reason or "—"] for s in summary.llm_steps])]


def _samples(summary: ReportSummary) -> list[Block]:
    if not summary.samples:
        return []
    rows = [[s.id, _shorten(s.reference), _shorten(s.base if s.base is not None else "—"), _shorten(s.generated)]
            for s in summary.samples]
    return [("h2", f"Generated replies after round {summary.samples_round}"),
            ("p", "Greedy replies to held-out comments, next to the real reply and the base model's reply."),
            _table(["Id", "Reference (real reply)", "Base model", f"Round {summary.samples_round}"], rows)]


def _reason_table(counts: dict[str, int], caption: str) -> list[Block]:
    if not counts:
        return []
    rows = [[reason.replace("_", " "), _count(count)]
            for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return [("p", caption), _table(["Reason", "Count"], rows)]


def _data(summary: ReportSummary) -> list[Block]:
    blocks: list[Block] = [("h2", "Data")]
    data = summary.data
    if data.prepared is None and not data.collected:
        return blocks + [("p", "No data has been prepared yet.")]
    if data.subreddits:
        blocks.append(("p", f"Collected{f' from MCP server `{data.server}`' if data.server else ''}:"))
        blocks.append(_table(["Subreddit", "Posts", "Comments", "Skipped in the source"],
                             [[s.name, _count(s.posts), _count(s.comments), _count(s.skipped)]
                              for s in data.subreddits]))
    blocks += _reason_table(data.source_skipped, "Skipped while reading the source (bad lines, files and media "
                                                 "references), by reason:")
    prepared = data.prepared
    if prepared is None:
        return blocks
    facts = [f"{_count(prepared.num_comments)} comments → {_count(prepared.num_examples)} comment–reply examples"]
    if data.clients:
        used = sum(c.train + (c.validation or 0) + c.test for c in data.clients)
        facts.append(f"{used:,} used by {len(data.clients)} clients (train + validation + test)")
    if prepared.partition:
        facts.append(f"partition: {prepared.partition}")
    facts.append(f"{_count(prepared.images_kept)} images kept")
    features = prepared.image_features
    if features is not None and features.skipped_reason:
        facts.append(f"image features skipped: {features.skipped_reason}")
    elif features is not None:
        facts.append(f"CLIP image features of {_count(features.computed + features.reused)} images ({features.model})")
    blocks.append(("p", "; ".join(facts) + "."))
    if data.clients:
        blocks.append(_table(
            ["Client", "Subreddit mix", "Examples", "Tokens", "Train", "Validation", "Test", "Train tokens"],
            [[c.name, " · ".join(f"r/{sub} {share:.0f}%" for sub, share in c.subreddit_share.items()) or "—",
              _count(c.examples), _count(c.tokens), _count(c.train), _count(c.validation), _count(c.test),
              _count(c.train_tokens)] for c in data.clients]))
    blocks += _reason_table(prepared.dropped, "Dropped while preprocessing, by reason:")
    return blocks + _reason_table(prepared.scrubbed, "Changed but kept while preprocessing (personal data replaced, "
                                                     "quotes cut, examples truncated), by rule:")


def _settings(summary: ReportSummary) -> list[Block]:
    if not summary.settings:
        return []
    return [("h2", "Settings"), _table(["Setting", "Value"], [[k, _setting(v)] for k, v in summary.settings.items()])]


# --- Markdown and HTML ---------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "verdict":
            out.append(f"**{block[1]}**")
        elif kind == "image":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                     "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
.verdict { background: #eef6ee; border-left: 5px solid #3a8a3a; padding: .7em 1em; font-weight: 600; }
.verdict.worse { background: #fbeeee; border-left-color: #b03a3a; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #d8d8d8; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def render_html(blocks: list[Block], images: dict[str, bytes] | None = None) -> str:
    """Blocks as one HTML page; images named in `images` are embedded as base64 data URIs."""
    images = images or {}
    title = next((b[1] for b in blocks if b[0] == "h1"), "Run report")
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "verdict":
            worse = " worse" if "did not" in block[1] else ""
            body.append(f'<p class="verdict{worse}">{html.escape(block[1])}</p>')
        elif kind == "image":
            data = images.get(block[1])
            if data is not None:
                src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                body.append(f'<p><img src="{src}" alt="{html.escape(block[2])}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")

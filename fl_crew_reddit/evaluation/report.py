"""A readable report of one run, from its `results/<run>/history.json`.

    build_report(run_dir) -> ReportPaths   writes report.md, report.html (self-contained) and convergence.png

The history is turned into a list of blocks (headings, paragraphs, tables) by pure functions; the same blocks
are rendered as Markdown and as HTML, so both files say the same thing. Plotting is separate (`plot_convergence`).
Keys that later versions add (`global.per_client`, `baselines`) are shown when present and skipped when not.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fl_crew_reddit.evaluation.selection import best_round_record

HISTORY_FILE = "history.json"
SAMPLES_SHOWN = 3
SAMPLE_CHARS = 300


class ReportError(Exception):
    """The run folder or its history cannot be read; the message says which and why."""


@dataclass(frozen=True)
class ReportPaths:
    md: Path
    html: Path
    png: Path


# --- reading the history -------------------------------------------------------------------------------------------
def load_history(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / HISTORY_FILE
    if not run_dir.is_dir():
        raise ReportError(f"no run folder at {run_dir}")
    if not path.is_file():
        raise ReportError(f"{path} is missing: {run_dir} is not a run folder (a run writes results/<run>/{HISTORY_FILE}"
                          " after its first stage)")
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ReportError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(history, dict):
        raise ReportError(f"{path} does not hold a run history (expected a JSON object)")
    return history


def resolve_run_dir(run: str | None, results_dir: Path) -> Path:
    """RUN is a folder path, or a run id under `results_dir` (default `latest`, a symlink or a file naming the run)."""
    if run and Path(run).expanduser().is_dir():
        return Path(run).expanduser()
    candidate = Path(results_dir) / (run or "latest")
    if candidate.is_file():  # `latest` as a text file where symlinks are not allowed
        candidate = Path(results_dir) / candidate.read_text(encoding="utf-8").strip()
    if not candidate.is_dir():
        looked = f"{run!r} is neither a run folder nor a run id under {results_dir}" if run else \
            f"no run under {results_dir} (results/latest is missing: has a run started?)"
        raise ReportError(looked)
    return candidate.resolve() if candidate.is_symlink() else candidate  # name the run, not `latest`


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _metric(block: Any, key: str = "perplexity") -> float | None:
    """A number, or `block[key]` when block is a dict (per-client and baseline entries may be either)."""
    if isinstance(block, dict):
        return _number(block.get(key))
    return _number(block)


def _global(record: dict) -> dict:
    return record.get("global") or {}


def evaluated_rounds(history: dict) -> list[dict]:
    return [r for r in history.get("rounds") or [] if _metric(_global(r)) is not None]


def base_perplexity(history: dict) -> float | None:
    return _metric(history.get("base") or {})


def change_percent(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def mean_train_loss(record: dict) -> float | None:
    losses = [_number(c.get("train_loss")) for c in record.get("clients") or []]
    losses = [x for x in losses if x is not None]
    return sum(losses) / len(losses) if losses else None


def skipped_clients(record: dict) -> dict[str, list[str]]:
    """Clients left out of a round with their reasons: skipped before training and rejected at aggregation."""
    out: dict[str, list[str]] = {}
    rejected = (record.get("aggregation") or {}).get("rejected") or {}
    for source in (record.get("skipped") or {}, rejected):
        for name, reasons in source.items():
            reasons = [reasons] if isinstance(reasons, str) else list(reasons or [])
            out.setdefault(name, [])
            out[name].extend(r for r in reasons if r not in out[name])
    return out


def accepted_clients(record: dict) -> list[str]:
    aggregation = record.get("aggregation")
    if aggregation and aggregation.get("accepted") is not None:
        return list(aggregation["accepted"])
    left_out = skipped_clients(record)
    return [c["name"] for c in record.get("clients") or [] if c.get("name") not in left_out]


def per_client_perplexity(metrics: dict) -> dict[str, float]:
    per_client = metrics.get("per_client") or {}
    if isinstance(per_client, list):  # [{name, perplexity}, ...]
        per_client = {item.get("name", str(i)): item for i, item in enumerate(per_client) if isinstance(item, dict)}
    values = {name: _metric(value) for name, value in per_client.items()}
    return {name: value for name, value in values.items() if value is not None}


def baselines(history: dict) -> dict[str, dict]:
    """Baselines as {name: {"perplexity": float | None, "per_round": [(round, ppl)], ...other numbers}}."""
    raw = history.get("baselines") or {}
    if isinstance(raw, list):
        raw = {item.get("name", f"baseline-{i}"): item for i, item in enumerate(raw) if isinstance(item, dict)}
    out = {}
    for name, value in raw.items():
        entry: dict[str, Any] = {"perplexity": _metric(value), "per_round": []}
        if isinstance(value, dict):
            rounds = value.get("rounds") or value.get("perplexities") or []
            if isinstance(rounds, list):
                for i, item in enumerate(rounds, start=1):
                    ppl = _metric(_global(item) or item) if isinstance(item, dict) else _number(item)
                    number = item.get("round", i) if isinstance(item, dict) else i
                    if ppl is not None:
                        entry["per_round"].append((number, ppl))
            if entry["perplexity"] is None and entry["per_round"]:
                entry["perplexity"] = entry["per_round"][-1][1]
            for key in ("bleu", "rouge_l", "description", "best_round", "per_client", "validation_per_round"):
                if value.get(key) is not None:
                    entry[key] = value[key]
        out[str(name)] = entry
    return out


def verdict(history: dict) -> str:
    base = base_perplexity(history)
    rounds = evaluated_rounds(history)
    if base is None:
        return "The base model has not been evaluated yet: there is nothing to compare the rounds with."
    if not rounds:
        return f"No round has been evaluated yet (base model held-out perplexity {base:.2f})."
    count = f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}"
    best = best_round(history)
    if best is not None:  # the model a user would keep: chosen on validation, scored on test
        final = _metric(_global(best))
        change = _signed_percent(change_percent(final, base))
        chosen = (f"round {best.get('round')} of {len(rounds)}, the round with the lowest validation perplexity "
                  f"({_fmt(_global(best).get('validation_perplexity'))})")
        if final < base:
            return (f"Federated training lowered held-out perplexity from {base:.2f} to {final:.2f} ({change}) "
                    f"at {chosen}.")
        return (f"Federated training did not lower held-out perplexity: {base:.2f} (base) → {final:.2f} ({change}) "
                f"at {chosen}.")
    final = _metric(_global(rounds[-1]))  # a history without validation: the last round (never the best on test)
    change = change_percent(final, base)
    if final < base:
        return (f"Federated training lowered held-out perplexity from {base:.2f} to {final:.2f} "
                f"({_signed_percent(change)}) over {count}.")
    return (f"Federated training did not lower held-out perplexity: {base:.2f} (base) → {final:.2f} "
            f"({_signed_percent(change)}) after {count}.")


def best_round(history: dict) -> dict | None:
    """The round record with the lowest validation perplexity (as the run recorded it); None without validation."""
    rounds = history.get("rounds") or []
    recorded = history.get("best_round")
    match = next((r for r in rounds if recorded is not None and r.get("round") == recorded), None)
    return match if match is not None and _metric(_global(match)) is not None else best_round_record(rounds)


# --- formatting ----------------------------------------------------------------------------------------------------
def _signed_percent(value: float | None) -> str:
    if value is None:
        return "—"
    sign = "−" if value < 0 else "+"
    return f"{sign}{abs(value):.1f}%"


def _fmt(value: Any, digits: int = 2) -> str:
    number = _number(value)
    if number is not None:
        if isinstance(value, int):
            return f"{value:,}"
        return f"{number:.{digits}f}"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) if value else "(none)"
    return str(value)


def _setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return _fmt(value)


def _shorten(text: str, limit: int = SAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


# --- the report as blocks ------------------------------------------------------------------------------------------
Block = tuple  # ("h1"|"h2"|"p"|"verdict", text) or ("table", headers, rows) or ("image", path, alt)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> Block:
    return ("table", headers, [[str(cell) for cell in row] for row in rows])


def settings_blocks(history: dict) -> list[Block]:
    settings = history.get("settings") or {}
    if not settings:
        return []
    return [("h2", "Settings"), _table(["Setting", "Value"], [[k, _setting(v)] for k, v in settings.items()])]


def _subreddit_mix(subreddits: dict[str, int]) -> str:
    """`r/books 62% · r/history 38%`: the share of each subreddit in one client's examples."""
    total = sum(n for n in subreddits.values() if isinstance(n, (int, float))) or 0
    if not total:
        return "—"
    return " · ".join(f"r/{sub} {100 * n / total:.0f}%" for sub, n in subreddits.items())


def _reason_table(counts: dict, caption: str) -> list[Block]:
    if not counts:
        return []
    rows = [[reason.replace("_", " "), _fmt(count)]
            for reason, count in sorted(counts.items(), key=lambda item: (-(item[1] or 0), item[0]))]
    return [("p", caption), _table(["Reason", "Count"], rows)]


def data_blocks(history: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Data")]
    collection = history.get("collection") or {}
    data = history.get("data") or {}
    if not data and not collection:
        return blocks + [("p", "No data has been prepared yet.")]
    subs = collection.get("subreddits") or []
    source_skipped: dict[str, int] = {}
    if subs:
        source = f" from MCP server `{collection['server']}`" if collection.get("server") else ""
        blocks.append(("p", f"Collected{source}:"))
        blocks.append(_table(["Subreddit", "Posts", "Comments", "Skipped in the source"],
                             [[s.get("subreddit", "?"), _fmt(s.get("num_posts")), _fmt(s.get("num_comments")),
                               _fmt(sum((s.get("skipped") or {}).values()))]
                              for s in subs]))
        for s in subs:
            for reason, count in (s.get("skipped") or {}).items():
                source_skipped[reason] = source_skipped.get(reason, 0) + count
    blocks += _reason_table(source_skipped, "Skipped while reading the source (bad lines, files and media "
                                            "references), by reason:")
    if data:
        facts = [f"{_fmt(data.get('num_comments'))} comments → "
                 f"{_fmt(data.get('num_examples'))} comment–reply examples"]
        used = [c.get("num_train", 0) + c.get("num_validation", 0) + c.get("num_test", 0)
                for c in data.get("clients") or []]
        if used:
            facts.append(f"{sum(used):,} used by {len(used)} clients (train + validation + test)")
        if data.get("partition"):
            facts.append(f"partition: {data['partition']}")
        if data.get("images_kept") is not None:
            facts.append(f"{_fmt(data.get('images_kept'))} images kept")
        features = data.get("image_features") or {}
        if features.get("skipped_reason"):
            facts.append(f"image features skipped: {features['skipped_reason']}")
        elif features:
            encoded = (features.get("computed") or 0) + (features.get("reused") or 0)
            facts.append(f"CLIP image features of {_fmt(encoded)} images ({features.get('model')})")
        blocks.append(("p", "; ".join(facts) + "."))
        clients = data.get("clients") or []
        if clients:
            blocks.append(_table(
                ["Client", "Subreddit mix", "Examples", "Tokens", "Train", "Validation", "Test", "Train tokens"],
                [[c.get("name", "?"), _subreddit_mix(c.get("subreddits") or {}),
                  _fmt(c.get("num_examples") or sum(c.get(k) or 0 for k in ("num_train", "num_validation",
                                                                               "num_test"))),
                  _fmt(c.get("num_tokens")), _fmt(c.get("num_train")),
                  _fmt(c.get("num_validation")), _fmt(c.get("num_test")), _fmt(c.get("train_tokens"))]
                 for c in clients]))
        blocks += _reason_table(data.get("dropped") or {}, "Dropped while preprocessing, by reason:")
        blocks += _reason_table(data.get("scrubbed") or {}, "Changed but kept while preprocessing (personal data "
                                                            "replaced, quotes cut, examples truncated), by rule:")
    return blocks


def rounds_blocks(history: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Rounds")]
    base = history.get("base") or {}
    base_ppl = base_perplexity(history)
    rounds = history.get("rounds") or []
    headers = ["Round", "Perplexity", "Δ vs base", "Validation perplexity", "BLEU", "ROUGE-L", "Mean train loss",
               "Accepted", "Skipped (reason)", "Seconds"]
    rows = []
    if base:
        rows.append(["base", _fmt(base_ppl), "", _fmt(base.get("validation_perplexity")), _fmt(base.get("bleu")),
                     _fmt(base.get("rouge_l"), 3), "", "", "", ""])
    best = best_round(history)
    for record in rounds:
        metrics = _global(record)
        ppl = _metric(metrics)
        left_out = skipped_clients(record)
        validation = _fmt(metrics.get("validation_perplexity"))
        rows.append([
            record.get("round", "?"), _fmt(ppl) if ppl is not None else "(not evaluated)",
            _signed_percent(change_percent(ppl, base_ppl)),
            f"{validation} (best)" if record is best else validation, _fmt(metrics.get("bleu")),
            _fmt(metrics.get("rouge_l"), 3), _fmt(mean_train_loss(record), 3),
            ", ".join(accepted_clients(record)) or "—",
            "; ".join(f"{name}: {', '.join(reasons) or 'no reason given'}" for name, reasons in left_out.items())
            or "—",
            _fmt(_number(record.get("seconds")), 0)])
    if not rows:
        return blocks + [("p", "No round has run yet.")]
    methods = sorted({(r.get("aggregation") or {}).get("method") for r in rounds} - {None})
    note = "Perplexity is on every held-out test reply; validation perplexity, on separate held-out threads, " \
           "chooses the best round. BLEU (0–100) and ROUGE-L (0–1) on a fixed sample of generated replies."
    if methods:
        note += f" Aggregation: {', '.join(methods)}."
    blocks += [("p", note), _table(headers, rows)]
    blocks += _per_client_blocks(history) + _loss_blocks(history) + _baseline_blocks(history)
    blocks += clip_blocks(history)
    return blocks


def clip_blocks(history: dict) -> list[Block]:
    """Image–text alignment (CLIP score) per round, or the one sentence saying why it was not computed."""
    evaluated = [("base", history.get("base") or {})] + [(r.get("round", "?"), _global(r))
                                                        for r in history.get("rounds") or []]
    evaluated = [(name, m) for name, m in evaluated if "clip_score" in m or m.get("clip_note")]
    if not evaluated:
        return []  # a history from before the CLIP score
    scored = [(name, m) for name, m in evaluated if _number(m.get("clip_score")) is not None]
    if not scored:
        note = next((m["clip_note"] for _, m in reversed(evaluated) if m.get("clip_note")), "no reason recorded")
        return [("p", f"CLIP score: not computed — {note}.")]
    rows = [[name, _fmt(m.get("clip_score")), _fmt(m.get("clip_score_reply")), _fmt(m.get("clip_score_post")),
             _fmt(m.get("clip_examples"))] for name, m in scored]
    return [("p", "CLIP score (image–text alignment, 100·max(cos, 0) between CLIP embeddings of a post's images and "
                  "a text; 0–100, higher is closer) on held-out replies to image posts:"),
            _table(["Round", "Generated replies", "Real replies", "Post text", "Examples"], rows)]


def _loss_blocks(history: dict) -> list[Block]:
    rounds = [r for r in history.get("rounds") or [] if r.get("clients")]
    names = _client_names(history)
    if not rounds or not names:
        return []
    rows = []
    for record in rounds:
        losses = {c.get("name"): c.get("train_loss") for c in record.get("clients") or []}
        rows.append([record.get("round", "?")] + [_fmt(losses.get(n), 3) for n in names])
    return [("p", "Local train loss per client (mean over the round's steps):"), _table(["Round"] + names, rows)]


def _per_client_blocks(history: dict) -> list[Block]:
    base_pc = per_client_perplexity(history.get("base") or {})
    per_round = [(r.get("round", "?"), per_client_perplexity(_global(r))) for r in history.get("rounds") or []]
    per_round = [(n, pc) for n, pc in per_round if pc]
    if not per_round and not base_pc:
        return []
    names = list(dict.fromkeys([*base_pc, *(name for _, pc in per_round for name in pc)]))
    rows = []
    if base_pc:
        rows.append(["base"] + [_fmt(base_pc.get(n)) for n in names])
    for number, pc in per_round:
        rows.append([number] + [_fmt(pc.get(n)) for n in names])
    return [("p", "Held-out perplexity on each client's own test split:"), _table(["Round"] + names, rows)]


def _baseline_blocks(history: dict) -> list[Block]:
    """Every method at its own best round on validation, with the test perplexity of that checkpoint: the federated
    model, then each baseline; then the same per client, on each client's own test split."""
    found = baselines(history)
    if not found:
        return []
    base_ppl = base_perplexity(history)
    best = best_round(history)
    rows = []
    if best is not None:
        metrics = _global(best)
        rows.append(["federated", _fmt(_metric(metrics)), _signed_percent(change_percent(_metric(metrics), base_ppl)),
                     f"round {best.get('round')}", _fmt(metrics.get("validation_perplexity")),
                     _fmt(metrics.get("bleu")), _fmt(metrics.get("rouge_l"), 3), "global adapter"])
    for name, entry in found.items():
        rows.append([name, _fmt(entry.get("perplexity")),
                     _signed_percent(change_percent(entry.get("perplexity"), base_ppl)), _read_at(entry),
                     _fmt(_validation_at_best(entry)), _fmt(entry.get("bleu")), _fmt(entry.get("rouge_l"), 3),
                     entry.get("description", "")])
    blocks: list[Block] = [
        ("h2", "Baselines"),
        ("p", "Each method is read at its own best round (or round-equivalent chunk of its steps) on the validation "
              "split; the perplexities are on the test split, which never chooses."),
        _table(["Method", "Perplexity", "Δ vs base", "Read at", "Validation perplexity", "BLEU", "ROUGE-L", "Notes"],
               rows)]
    return blocks + _per_client_comparison(history, found, best)


def _read_at(entry: dict) -> str:
    if entry.get("best_round") is not None:
        return f"round {entry['best_round']}"
    chosen = [v.get("best_round") for v in (entry.get("per_client") or {}).values() if isinstance(v, dict)]
    chosen = [str(r) for r in chosen if r is not None]
    return f"each client's best: {', '.join(chosen)}" if chosen else "—"


def _validation_at_best(entry: dict) -> float | None:
    points = {p.get("round"): p.get("perplexity") for p in entry.get("validation_per_round") or []
              if isinstance(p, dict)}
    return _number(points.get(entry.get("best_round")))


def _per_client_comparison(history: dict, found: dict[str, dict], best: dict | None) -> list[Block]:
    """Test perplexity on each client's own split: base, each baseline, the federated model at its best round."""
    columns = {"base": per_client_perplexity(history.get("base") or {})}
    for name, entry in found.items():
        columns[name] = {client: _metric(value, "own") for client, value in (entry.get("per_client") or {}).items()}
    if best is not None:
        columns[f"federated (round {best.get('round')})"] = per_client_perplexity(_global(best))
    columns = {name: {c: v for c, v in values.items() if v is not None} for name, values in columns.items()}
    clients = list(dict.fromkeys(client for values in columns.values() for client in values))
    if not clients or sum(1 for values in columns.values() if values) < 2:
        return []
    rows = [[client] + [_fmt(values.get(client)) for values in columns.values()] for client in clients]
    return [("p", "Per client, on each client's own test split:"), _table(["Client"] + list(columns), rows)]


def samples_blocks(history: dict, count: int = SAMPLES_SHOWN) -> list[Block]:
    rounds = [r for r in history.get("rounds") or [] if _global(r).get("samples")]
    if not rounds:
        return []
    last = rounds[-1]
    base_by_id = {s.get("id"): s.get("generated", "") for s in (history.get("base") or {}).get("samples") or []}
    rows = []
    for sample in _global(last)["samples"][:count]:
        rows.append([sample.get("id", "?"), _shorten(sample.get("reference", "")),
                     _shorten(base_by_id.get(sample.get("id"), "—")), _shorten(sample.get("generated", ""))])
    return [("h2", f"Generated replies after round {last.get('round', '?')}"),
            ("p", "Greedy replies to held-out comments, next to the real reply and the base model's reply."),
            _table(["Id", "Reference (real reply)", "Base model", f"Round {last.get('round', '?')}"], rows)]


def report_blocks(history: dict, png_name: str | None = "convergence.png") -> list[Block]:
    blocks: list[Block] = [("h1", f"Federated run report: {history.get('run_id', 'unknown run')}"),
                           ("verdict", verdict(history))]
    if png_name:
        blocks.append(("image", png_name, "Held-out perplexity and local train loss per round"))
    return (blocks + rounds_blocks(history) + analysis_blocks(history) + samples_blocks(history) + data_blocks(history)
            + settings_blocks(history))


def analysis_blocks(history: dict) -> list[Block]:
    """The Evaluator agent's own words per round (LLM-driven mode only)."""
    notes = [(r.get("round", "?"), r["analysis"]) for r in history.get("rounds") or []
             if isinstance(r.get("analysis"), str) and r["analysis"].strip()]
    if not notes:
        return []
    return [("h2", "Evaluator's analysis")] + [("p", f"Round {number}: {text.strip()}") for number, text in notes]


# --- rendering -----------------------------------------------------------------------------------------------------
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


def markdown_report(history: dict, png_name: str | None = "convergence.png") -> str:
    return render_markdown(report_blocks(history, png_name))


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


# --- plotting ------------------------------------------------------------------------------------------------------
def _client_names(history: dict) -> list[str]:
    names = [c.get("name") for c in (history.get("data") or {}).get("clients") or []]
    for record in history.get("rounds") or []:
        names += [c.get("name") for c in record.get("clients") or []]
        names += list(skipped_clients(record))
    return [n for n in dict.fromkeys(names) if n]


def plot_convergence(history: dict, path: Path) -> Path:
    """convergence.png (1000×600): global held-out perplexity per round against the base model, and each client's
    local train loss per round (rejected updates marked ×)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state; PNG goes through Agg
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    ax_ppl, ax_loss = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = _client_names(history)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    rounds = history.get("rounds") or []
    numbers = [r.get("round") for r in rounds if isinstance(r.get("round"), int)]
    last_round = max(numbers, default=1)

    # left: held-out perplexity
    evaluated = evaluated_rounds(history)
    xs = [r["round"] for r in evaluated]
    ys = [_metric(_global(r)) for r in evaluated]
    base_ppl = base_perplexity(history)
    if base_ppl is not None:
        ax_ppl.axhline(base_ppl, color="#555", linestyle="--", linewidth=1.5,
                       label=f"base model, no adapter ({base_ppl:.2f})")
    if xs:
        if base_ppl is not None:  # round 0: the global adapter starts as a no-op (LoRA B = 0), i.e. the base model
            ax_ppl.plot([0, xs[0]], [base_ppl, ys[0]], color="#d62728", linewidth=1.2, linestyle=":", alpha=0.7)
            ax_ppl.plot([0], [base_ppl], color="#555", marker="o", markersize=6, zorder=5)
        ax_ppl.plot(xs, ys, color="#d62728", marker="o", linewidth=2.4, markersize=7, zorder=5,
                    label="global adapter (all held-out replies)")
        if len(xs) <= 12:
            for x, y in zip(xs, ys):
                ax_ppl.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 9), ha="center",
                                fontsize=8.5, color="#d62728", zorder=7,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        validation = [(r["round"], _metric(_global(r), "validation_perplexity")) for r in evaluated]
        validation = [(x, y) for x, y in validation if y is not None]
        base_validation = _metric(history.get("base") or {}, "validation_perplexity")
        if validation:
            if base_validation is not None:
                validation.insert(0, (0, base_validation))
            ax_ppl.plot(*zip(*validation), color="#d62728", linestyle="--", linewidth=1.3, alpha=0.75,
                        label="global adapter, validation split")
        best = best_round(history)
        if best is not None:
            ax_ppl.plot([best["round"]], [_metric(_global(best))], linestyle="none", marker="*", markersize=17,
                        color="#ffbf00", markeredgecolor="#7a5a00", zorder=8,
                        label=f"best round on validation ({best['round']})")
    base_pc = per_client_perplexity(history.get("base") or {})
    for name in names:
        points = [(r["round"], per_client_perplexity(_global(r)).get(name)) for r in evaluated]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax_ppl.plot(*zip(*points), color=colour[name], marker=".", linewidth=1.1, alpha=0.85,
                        label=f"{name} test split")
        if name in base_pc:
            ax_ppl.axhline(base_pc[name], color=colour[name], linestyle=":", linewidth=0.9, alpha=0.6)
    if base_pc:
        ax_ppl.plot([], [], color="#777", linestyle=":", linewidth=0.9, label="base model on each client's split")
    baseline_styles = ["-.", (0, (5, 2, 1, 2)), (0, (1, 1)), (0, (3, 3))]
    for i, (name, entry) in enumerate(baselines(history).items()):
        style = baseline_styles[i % len(baseline_styles)]
        if len(entry["per_round"]) > 1:
            ax_ppl.plot(*zip(*entry["per_round"]), color="#333", linestyle=style, marker="s", markersize=4,
                        linewidth=1.2, label=f"baseline: {name}")
        elif entry.get("perplexity") is not None:
            ax_ppl.axhline(entry["perplexity"], color="#333", linestyle=style, linewidth=1.2,
                           label=f"baseline: {name} ({entry['perplexity']:.2f}"
                                 f"{', best on validation' if _read_at(entry) != '—' else ''})")
    ax_ppl.set_title("Held-out reply perplexity (lower is better)", fontsize=11)
    ax_ppl.set_ylabel("perplexity")
    if not xs and base_ppl is None:
        ax_ppl.text(0.5, 0.5, "not evaluated yet", transform=ax_ppl.transAxes, ha="center", color="#888")
    else:
        ax_ppl.margins(y=0.15)

    # right: local train loss per client
    plotted_loss = False
    for name in names:
        points, rejected = [], []
        for record in rounds:
            loss = {c.get("name"): _number(c.get("train_loss")) for c in record.get("clients") or []}.get(name)
            if loss is None:
                continue
            if name in skipped_clients(record):  # rejected: marked ×, not joined to the line
                rejected.append((record.get("round"), loss))
            else:
                points.append((record.get("round"), loss))
        if points:
            plotted_loss = True
            ax_loss.plot(*zip(*points), color=colour[name], marker="o", markersize=5, linewidth=1.6, label=name)
        if rejected:
            ax_loss.plot(*zip(*rejected), linestyle="none", marker="x", markersize=11, markeredgewidth=2.2,
                         color="#b00000", zorder=6)
            for x, y in rejected:
                ax_loss.annotate(name, (x, y), textcoords="offset points", xytext=(8, -3), fontsize=8,
                                 color=colour[name])
    if any(name in skipped_clients(r) for r in rounds for name in names):
        ax_loss.plot([], [], linestyle="none", marker="x", color="#b00000", label="update rejected")
    ax_loss.set_title("Local train loss per client", fontsize=11)
    ax_loss.set_ylabel("mean train loss (reply tokens)")
    if not plotted_loss:
        ax_loss.text(0.5, 0.5, "no client has trained yet", transform=ax_loss.transAxes, ha="center", color="#888")
    else:
        ax_loss.margins(y=0.15)

    ax_ppl.set_xlabel("federated round (0 = base model)")
    ax_ppl.set_xlim(-0.4, last_round + 0.4)
    ax_loss.set_xlabel("federated round")
    ax_loss.set_xlim(0.6, last_round + 0.4)
    for ax in (ax_ppl, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[0])
        if entries > 4:  # many lines: the legend goes under the axes rather than over the data
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
        elif entries:
            ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    method = (history.get("settings") or {}).get("aggregation_method")
    model = (history.get("settings") or {}).get("base_llm_model")
    subtitle = ", ".join(str(x) for x in (model, method, f"{len(names)} clients" if names else None) if x)
    fig.suptitle(f"Run {history.get('run_id', '?')}" + (f" — {subtitle}" if subtitle else ""), fontsize=12.5)
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


# --- everything ----------------------------------------------------------------------------------------------------
def build_report(run_dir: Path) -> ReportPaths:
    """Read `run_dir/history.json`; write report.md, report.html (PNG embedded) and convergence.png next to it."""
    run_dir = Path(run_dir)
    history = load_history(run_dir)
    paths = ReportPaths(md=run_dir / "report.md", html=run_dir / "report.html", png=run_dir / "convergence.png")
    plot_convergence(history, paths.png)
    blocks = report_blocks(history, paths.png.name)
    paths.md.write_text(render_markdown(blocks), encoding="utf-8")
    paths.html.write_text(render_html(blocks, {paths.png.name: paths.png.read_bytes()}), encoding="utf-8")
    return paths

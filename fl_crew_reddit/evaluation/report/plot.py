"""convergence.png: held-out perplexity per round against the base model and the baselines, and each client's
local train loss per round (rejected updates marked ×), drawn from a ReportSummary."""
from __future__ import annotations

from pathlib import Path

from fl_crew_reddit.evaluation.report.summary import ReportSummary

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
BASELINE_STYLES = ["-.", (0, (5, 2, 1, 2)), (0, (1, 1)), (0, (3, 3))]


def plot_convergence(summary: ReportSummary, path: Path) -> Path:
    """Write the 1000×600 PNG (no pyplot: no global backend or figure state; the PNG goes through Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    ax_ppl, ax_loss = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(summary.client_names)}
    last_round = max((r.number for r in summary.rounds), default=1)
    _perplexity_panel(ax_ppl, summary, colour)
    _loss_panel(ax_loss, summary, colour)

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
    names = summary.client_names
    parts = (summary.settings.get("base_llm_model"), summary.settings.get("aggregation_method"),
             f"{len(names)} clients" if names else None)
    subtitle = ", ".join(str(x) for x in parts if x)
    fig.suptitle(f"Run {summary.run_id}" + (f" — {subtitle}" if subtitle else ""), fontsize=12.5)
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def _perplexity_panel(ax, summary: ReportSummary, colour: dict[str, str]) -> None:
    """Left: the global adapter's test (and validation) perplexity, per client, the base model, the baselines."""
    evaluated = [r for r in summary.rounds if r.scores is not None and r.scores.perplexity is not None]
    xs = [r.number for r in evaluated]
    ys = [r.scores.perplexity for r in evaluated]
    base = summary.base
    base_ppl = base.perplexity if base else None
    if base_ppl is not None:
        ax.axhline(base_ppl, color="#555", linestyle="--", linewidth=1.5,
                   label=f"base model, no adapter ({base_ppl:.2f})")
    if xs:
        if base_ppl is not None:  # round 0: the global adapter starts as a no-op (LoRA B = 0), i.e. the base model
            ax.plot([0, xs[0]], [base_ppl, ys[0]], color="#d62728", linewidth=1.2, linestyle=":", alpha=0.7)
            ax.plot([0], [base_ppl], color="#555", marker="o", markersize=6, zorder=5)
        ax.plot(xs, ys, color="#d62728", marker="o", linewidth=2.4, markersize=7, zorder=5,
                label="global adapter (all held-out replies)")
        if len(xs) <= 12:
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8.5,
                            color="#d62728", zorder=7,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        validation = [(r.number, r.scores.validation) for r in evaluated if r.scores.validation is not None]
        if validation:
            if base is not None and base.validation is not None:
                validation.insert(0, (0, base.validation))
            ax.plot(*zip(*validation), color="#d62728", linestyle="--", linewidth=1.3, alpha=0.75,
                    label="global adapter, validation split")
        if summary.best is not None:
            ax.plot([summary.best.number], [summary.best.scores.perplexity], linestyle="none", marker="*",
                    markersize=17, color="#ffbf00", markeredgecolor="#7a5a00", zorder=8,
                    label=f"best round on validation ({summary.best.number})")
    base_pc = base.per_client if base else {}
    for name in summary.client_names:
        points = [(r.number, r.scores.per_client[name]) for r in evaluated if name in r.scores.per_client]
        if points:
            ax.plot(*zip(*points), color=colour[name], marker=".", linewidth=1.1, alpha=0.85,
                    label=f"{name} test split")
        if name in base_pc:
            ax.axhline(base_pc[name], color=colour[name], linestyle=":", linewidth=0.9, alpha=0.6)
    if base_pc:
        ax.plot([], [], color="#777", linestyle=":", linewidth=0.9, label="base model on each client's split")
    for i, baseline in enumerate(summary.baselines):
        if baseline.perplexity is not None:
            chosen = ", best on validation" if baseline.best_round is not None or baseline.client_best_rounds else ""
            ax.axhline(baseline.perplexity, color="#333", linestyle=BASELINE_STYLES[i % len(BASELINE_STYLES)],
                       linewidth=1.2, label=f"baseline: {baseline.name} ({baseline.perplexity:.2f}{chosen})")
    ax.set_title("Held-out reply perplexity (lower is better)", fontsize=11)
    ax.set_ylabel("perplexity")
    if not xs and base_ppl is None:
        ax.text(0.5, 0.5, "not evaluated yet", transform=ax.transAxes, ha="center", color="#888")
    else:
        ax.margins(y=0.15)


def _loss_panel(ax, summary: ReportSummary, colour: dict[str, str]) -> None:
    """Right: each client's local train loss per round; a rejected update is a red ×, not joined to the line."""
    plotted = False
    for name in summary.client_names:
        kept, rejected = [], []
        for r in summary.rounds:
            loss = r.train_loss.get(name)
            if loss is not None:
                (rejected if name in r.left_out else kept).append((r.number, loss))
        if kept:
            plotted = True
            ax.plot(*zip(*kept), color=colour[name], marker="o", markersize=5, linewidth=1.6, label=name)
        if rejected:
            ax.plot(*zip(*rejected), linestyle="none", marker="x", markersize=11, markeredgewidth=2.2,
                    color="#b00000", zorder=6)
            for x, y in rejected:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(8, -3), fontsize=8, color=colour[name])
    if any(name in r.left_out for r in summary.rounds for name in summary.client_names):
        ax.plot([], [], linestyle="none", marker="x", color="#b00000", label="update rejected")
    ax.set_title("Local train loss per client", fontsize=11)
    ax.set_ylabel("mean train loss (reply tokens)")
    if not plotted:
        ax.text(0.5, 0.5, "no client has trained yet", transform=ax.transAxes, ha="center", color="#888")
    else:
        ax.margins(y=0.15)

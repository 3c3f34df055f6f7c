"""What the aggregate shows: the markdown of report.md, the per-seed table, the plots."""

from __future__ import annotations

import os
import statistics

from .recipe import write_csv


def fmt_ci(c: dict) -> str:
    if c["n_seeds"] < 2:
        return f"{c['mean_diff']:+.3f} (n = {c['n_seeds']})" if c["n_seeds"] else "-"
    return (f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
            f"{c['seeds_a_gt_b']}/{c['n_seeds']} seeds, detectable {c['detectable_diff']:.3f}")  # fmt: skip


def seed_table(finals: dict[str, dict[int, dict]], arms: list[str], seeds: list[int]) -> list[str]:
    """Final test acc@2 of every arm on every seed (markdown rows): the per-seed outcome, which
    in the rare regime is close to bimodal (a run takes off or it does not), under the claims."""
    lines = ["| arm (test acc@2) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "| --- |" + " --- |" * len(seeds)]  # fmt: skip
    for arm in arms:
        if arm in finals:
            cells = [f"{finals[arm][s]['acc2']:.3f}" if s in finals[arm] else "-" for s in seeds]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def claims_plot(out: str, claims: list[dict]) -> list[str]:
    """claims.png (with matplotlib): each claim's paired difference with its 95% interval over
    seeds, the paper's difference beside it (points / 100) where it states one."""
    rows = [c for c in claims if c["n_seeds"] >= 2]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    for y, c in zip(ys, rows, strict=True):
        ax.plot([c["ci_low"], c["ci_high"]], [y, y], color="tab:blue", lw=2)
        ax.plot(c["mean_diff"], y, "o", color="tab:blue")
        paper = c["paper"].lstrip("+")
        if paper.replace(".", "", 1).lstrip("-").isdigit():
            ax.plot(float(paper) / 100, y, "x", color="tab:red")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(ys, [f"{c['claim']} ({c['n_seeds']} seeds)" for c in rows], fontsize=8)
    ax.set_xlabel("paired difference in test accuracy (toy: dot, 95% interval; paper: x)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "claims.png"), dpi=110)
    plt.close(fig)
    return ["claims.png"]


def rare_plots(out: str, series: dict[str, list[list[dict]]]) -> list[str]:
    """accuracy_vs_generated_tokens.csv (always) and .png (with matplotlib): each arm's dev acc@2
    against generated tokens (`series`: arm -> one `cost_curve` per seed), mean over seeds."""
    rows = []
    for arm, curves in sorted(series.items()):
        for points in zip(*curves, strict=False):
            rows.append({"arm": arm, "step": points[0]["step"], "seeds": len(points),
                         "gen_tokens": round(statistics.fmean(p["gen_tokens"] for p in points)),
                         "dev_acc2": round(statistics.fmean(p["dev_acc2"] for p in points), 4)})  # fmt: skip
    if not rows:
        return []
    write_csv(rows, os.path.join(out, "accuracy_vs_generated_tokens.csv"), digits=None)
    written = ["accuracy_vs_generated_tokens.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[regime] matplotlib is not installed: the plot's points are in the CSV only")
        return written
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm in series:
        pts = [r for r in rows if r["arm"] == arm]
        ax.plot([r["gen_tokens"] for r in pts], [r["dev_acc2"] for r in pts], marker=".", label=arm)
    ax.set_xlabel("generated tokens (cumulative)")
    ax.set_ylabel("dev acc@2 (T 0.6)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_generated_tokens.png"), dpi=110)
    plt.close(fig)
    return [*written, "accuracy_vs_generated_tokens.png"]

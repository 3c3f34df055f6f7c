"""What the aggregate shows: the markdown of report.md, the per-seed table, the plots."""

from __future__ import annotations

import math
import os
import statistics

from .recipe import write_csv


def fmt_ci(c: dict) -> str:
    if c["n_seeds"] < 2:
        return f"{c['mean_diff']:+.3f} (n = {c['n_seeds']})" if c["n_seeds"] else "-"
    return (f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
            f"{c['seeds_a_gt_b']}/{c['n_seeds']} seeds, detectable {c['detectable_diff']:.3f}")  # fmt: skip


def seed_table(finals: dict[str, dict[int, dict]], arms: list[str], seeds: list[int],
               where: dict[int, str] | None = None) -> list[str]:  # fmt: skip
    """Final test acc@2 of every arm on every seed (markdown rows): the per-seed outcome, which
    in the rare regime is close to bimodal (a run takes off or it does not), under the claims."""
    lines = ["| arm (test acc@2) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "| --- |" + " --- |" * len(seeds)]  # fmt: skip
    if where is not None:
        lines.append("| machine | " + " | ".join(where.get(s, "?") for s in seeds) + " |")
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


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def fmt_claim(c: dict) -> str:
    """A claim's row in a cell: mean [95% t interval], the sign-flip p, wins A / B / ties."""
    if c["n_seeds"] < 2:
        return f"{c['mean_diff']:+.3f} (n = {c['n_seeds']})" if c["n_seeds"] else "-"
    return (f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p {c['perm_p']:.3f}, "
            f"{c['wins_a']}/{c['wins_b']}/{c['n_ties']}")  # fmt: skip


def report_md(code: dict[str, str], n_jobs: int, cold: dict[int, dict],
              finals: dict[str, dict[int, dict]], arms: list[str], seeds: list[int],
              claims: list[dict], machines: dict[str, dict], where: dict[int, str],
              chosen: dict[str, float], compute: list[dict], stability: list[dict]) -> str:  # fmt: skip
    """report.md: the code the jobs ran, each seed's calibration and machine, every arm's final
    test acc@2 per seed, the claims pooled and per machine (each labelled pre-registered or
    post hoc), the compute per arm and Stage I / II's stability."""
    lines = [f"Jobs: {n_jobs} from {len(code)} commit(s) whose Python code is that of "
             f"{', '.join(sorted(set(code.values())))} (the last commit that changed a .py "
             "file; the others add job files only).", ""]  # fmt: skip
    lines += ["| seed | base acc T1 | base format T1 | cold o1+SC+o2 T1 | cold w->c | "
             "SFT only - base | accepted |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in sorted(cold):
        c = cold[s]["calibration"]
        lines.append(f"| {s} | {c['base_acc_t1']:.3f} | {c['base_format_t1']:.3f} | "
                     f"{c['cold_format_t1']:.3f} | {c['cold_wc_generated']:.4f} | "
                     f"{c['sft_only_minus_base']:+.3f} | {'yes' if cold[s]['accepted'] else 'no: ' + '; '.join(cold[s]['regime_misses'])} |")  # fmt: skip
    lines += ["", "Machines (a seed's: the CPU its jobs recorded, or machines.json by hand for jobs "
              "older than that record): " + "; ".join(
                  f"{m}: {info['cpu']}, seeds {', '.join(str(s) for s in sorted(where) if where[s] == m) or '-'}"
                  for m, info in machines.items()) + ".",
              "", "Learning rates: " + ", ".join(f"{a} {lr:g}" for a, lr in chosen.items())
              + " (every arm from the cold start at one shared lr, fixed before its reruns: "
              "issue 36)."]  # fmt: skip
    lines += ["", *seed_table(finals, arms, seeds, where)]
    pooled = [c for c in claims if c["machine"] == "all"]
    names = [m for m in machines if any(c["machine"] == m for c in claims)]
    lines += ["", "Claims, paired over seeds: mean [95% t interval]; sign-flip p (exact, "
              "two-sided); seeds A / B / ties (|A - B| < 0.001); 'reproduced' only when the "
              "interval and p < 0.05 agree. Machine columns: the mean on that machine's seeds; "
              "interaction: the last machine's mean minus the first's (Welch t, permutation p).",
              "", "| claim | A - B | paper | toy: mean [CI], p, A/B/tie | detectable | "
              + " | ".join(f"machine {m}" for m in names)
              + " | interaction (t, p) | verdict | analysis |",
              "| --- | --- | --- | --- | --- |" + " --- |" * (len(names) + 3)]  # fmt: skip
    for c in pooled:
        means = [_num(c.get(f"mean_machine_{m}", math.nan), "+.3f") for m in names]
        inter = "-"
        if not math.isnan(c.get("interaction", math.nan)):
            inter = (f"{c['interaction']:+.3f} ({c['interaction_t']:.1f}, "
                     f"{c['interaction_p']:.3f})")  # fmt: skip
        note = c["analysis"] + (f"; {c['caveat']}" if c["caveat"] else "")
        lines.append(f"| {c['claim']} | {c['a']} - {c['b']} | {c['paper']} | {fmt_claim(c)} | "
                     f"{_num(c['detectable_diff'], '.3f')} | " + " | ".join(means)
                     + f" | {inter} | {c['verdict']} | {note} |")  # fmt: skip
    if names:
        lines += ["", "Per machine (post hoc: the split by machine was chosen after the results; "
                  "with 4 seeds the sign-flip p cannot go below 0.125, so no claim is "
                  "'reproduced' on one machine alone):", "",
                  "| claim | " + " | ".join(f"machine {m}" for m in names) + " |",
                  "| --- |" + " --- |" * len(names)]  # fmt: skip
        cell = {(c["machine"], c["claim"]): f"{fmt_claim(c)}: {c['verdict']}" for c in claims}
        for c in pooled:
            lines.append(f"| {c['claim']} | "
                         + " | ".join(cell.get((m, c["claim"]), "-") for m in names) + " |")  # fmt: skip
    lines += ["", "| arm | seeds | generated tokens | trained tokens | median step s | wall s |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arm in arms:
        cs = [c for c in compute if c["arm"] == arm]
        if cs:
            lines.append(f"| {arm} | {len(cs)} | {statistics.fmean(c['gen_tokens'] for c in cs):,.0f} | "
                         f"{statistics.fmean(c['trained_tokens'] for c in cs):,.0f} | "
                         f"{statistics.fmean(c['median_step_s'] for c in cs):.2f} | "
                         f"{statistics.fmean(c['wall_s'] for c in cs):.0f} |")  # fmt: skip
    if stability:
        lines += ["", "| arm | seed | stage | format first / last 10 (T 1.0) | "
                  "o1+SC+o2 first / last 10 | truncated first / last 10 |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {r['arm']} | {r['seed']} | {r['stage']} | {r['format_first10']:.3f} / "
                  f"{r['format_last10']:.3f} | {r['sc_format_first10']:.3f} / "
                  f"{r['sc_format_last10']:.3f} | {r['truncated_first10']:.3f} / "
                  f"{r['truncated_last10']:.3f} |" for r in stability]  # fmt: skip
    return "\n".join(lines)

"""The aggregate: every committed file of the rare regime from its job files, and the statistics
of the claims (paired differences over seeds, a t interval, an exact sign-flip permutation
test, the arm x machine interaction)."""

from __future__ import annotations

import json
import math
import os
import statistics

from .arms import lr_for, lr_grid
from .recipe import (
    ARMS,
    DIAGNOSTIC_ARMS,
    GRID_SEED,
    REGIME,
    git,
    job_name,
    load_jobs,
    write_csv,
    write_json,
)
from .report import claims_plot, fmt_ci, rare_plots, seed_table

# --------------------------------------------------------------------------- the statistics

# Student t quantiles t_{p, df} for df 1..30 (p = 0.975: the 95% two-sided interval; p = 0.8:
# 80% power), from the standard tables; checked against an integration of the t density in
# tests/test_toy_replication.py.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873,
       0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857,
       0.856, 0.856, 0.855, 0.855, 0.854, 0.854)  # fmt: skip


def t_quantile(table: tuple, df: int) -> float:
    return table[df - 1] if df <= len(table) else {T975: 1.960, T80: 0.842}[table]


def paired_stats(diffs: list[float]) -> dict:
    """Mean paired difference, its 95% t-interval over seeds, seeds with A > B, and the
    smallest true difference this many seeds detect (two-sided 5%, power 80%) given the
    measured paired sd: (t_0.975 + t_0.8) x sd / sqrt(n)."""
    n = len(diffs)
    out = {"n_seeds": n, "mean_diff": statistics.fmean(diffs) if n else float("nan"),
           "seeds_a_gt_b": sum(d > 0 for d in diffs), "ci_low": float("nan"),
           "ci_high": float("nan"), "sd_diff": float("nan"), "detectable_diff": float("nan")}  # fmt: skip
    if n >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile(T975, n - 1) * sd / math.sqrt(n)
        out.update(sd_diff=sd, ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half,
                   detectable_diff=(t_quantile(T975, n - 1) + t_quantile(T80, n - 1)) * sd
                   / math.sqrt(n))  # fmt: skip
    return out


# claim, A, B, metric of A, metric of B, the paper's difference (7-benchmark averages)
CLAIMS = [
    ("paper selection > random splicing", "octopus", "random-augment", "acc2", "acc2", "+3.1"),
    ("random splicing > none", "random-augment", "no-augment", "acc2", "acc2", "+1.2"),
    ("paper selection > none", "octopus", "no-augment", "acc2", "acc2", "+4.3"),
    ("Stage I helps", "octopus", "no-stage1", "acc2", "acc2", "+1.9"),
    ("Octopus > GSPO n=16", "octopus", "gspo-n16", "acc2", "acc2", "+1.0"),
    ("splicing 8->16 >= 16 generated", "octopus", "no-splice-n16", "acc2", "acc2", ">= 0"),
    ("Octopus > exposure-matched GSPO n=16", "octopus", "gspo-n16-exposed", "acc2", "acc2", "-"),
    ("RL > the cold start", "octopus", "sft-only", "acc2", "acc2", "+8.3"),
    ("acc@2 > acc@1 (Octopus)", "octopus", "octopus", "acc2", "acc1", "> 0"),
    ("GSPO n=16 > GSPO n=8", "gspo-n16", "gspo-n8", "acc2", "acc2", "+3.3"),
    ("paper selection vs released quotas", "octopus", "released-augment", "acc2", "acc2", "-"),
    ("Stage II: token mean vs sequence mean", "octopus-agg-token", "octopus", "acc2", "acc2", "-"),
]
CLAIM_COLUMNS = ["claim", "a", "b", "metric", "paper", "mean_diff", "ci_low", "ci_high",
                 "seeds_a_gt_b", "n_seeds", "sd_diff", "detectable_diff", "verdict"]  # fmt: skip


def claims_table(finals: dict[str, dict[int, dict]], seeds: list[int] | None = None) -> list[dict]:
    """One row per claim over the seeds both arms have (only those in `seeds` if given):
    `finals[arm][seed]` holds the final test `acc1` / `acc2`. Verdict: "reproduced" only when
    the 95% interval excludes zero on the claimed side."""
    out = []
    for name, a, b, ka, kb, paper in CLAIMS:
        common = sorted(set(finals.get(a, {})) & set(finals.get(b, {})))
        if seeds is not None:
            common = [s for s in common if s in seeds]
        diffs = [finals[a][s][ka] - finals[b][s][kb] for s in common]
        st = paired_stats(diffs)
        if st["n_seeds"] < 2:
            verdict = "too few seeds"
        elif st["ci_low"] > 0:
            verdict = "reproduced (A > B)"
        elif st["ci_high"] < 0:
            verdict = "reversed (A < B)"
        else:
            verdict = "not resolved (interval spans 0)"
        out.append({"claim": name, "a": a, "b": b, "metric": f"test {ka} - {kb}",
                    "paper": paper, **st, "verdict": verdict})  # fmt: skip
    return out


# --------------------------------------------------------------------------- the tables


RUN_COLUMNS = ["arm", "seed", "lr", "step", "stage", "split", "acc1", "acc2", "wc", "cw",
               "format", "sc_format", "corrects_itself", "commit"]  # fmt: skip


def run_rows(jobs: dict[str, dict], arm: str, seed: int, lr: float | None) -> list[dict]:
    """runs.csv's rows of one arm and seed: step 0 (its start on dev and test), the dev curve,
    the final test evaluation; each with the commit its job ran from."""
    start_job = jobs.get(job_name("start", seed))
    if start_job is None:
        return []
    start = start_job["start"][ARMS[arm][0]]
    rows = []

    def row(step, stage, split, m, commit):
        return {"arm": arm, "seed": seed, "lr": "" if lr is None else f"{lr:g}", "step": step,
                "stage": stage, "split": split, "acc1": m["val_acc_o1"],
                "acc2": m["val_acc_final"], "wc": m["val_wc"], "cw": m["val_cw"],
                "format": m["val_format"], "sc_format": m["val_sc_format"],
                "corrects_itself": m["val_corrects_itself"], "commit": commit}  # fmt: skip

    rows += [row(0, "start", s, start[s], start_job["commit"]) for s in ("dev", "test")]
    if not ARMS[arm][1]:
        return rows
    job = jobs.get(job_name("arm", seed, arm, lr)) if lr is not None else None
    if job is None:
        return []
    rows += [row(p["step"], p["stage"], "dev", p, job["commit"]) for p in job["curve"]]
    rows.append(row(job["compute"]["rl_steps"], "end", "test", job["test"], job["commit"]))
    return rows


def aggregate(out: str, arms: list[str], scale: dict, lr_args: tuple = ()) -> str:
    """Everything under `out` from its job files: runs.csv (each arm at its lr, `lr_for` with
    `lr_args`), calibration.json, lr_grid.json, claims.csv, compute.csv, the accuracy against
    generated tokens, and report.md (returned)."""
    jobs = load_jobs(out)
    # every arm with a job under `out`, named or not: two drivers may share one folder
    present = {j["arm"] for j in jobs.values() if j["kind"] == "arm"}
    arms = [a for a in ARMS if a in arms or a in present]
    grid = lr_grid(jobs, [a for a in arms if a not in DIAGNOSTIC_ARMS], tuple(scale["lr_grid"]))
    write_json({"rule": "per arm, the lr of the grid with the highest dev score (mean dev "
                        "acc@2 at T 0.6 over the last 3 validations), ties to the smaller lr; "
                        f"seed {GRID_SEED}, dev set", "grid": list(scale["lr_grid"]),
                "arms": grid}, os.path.join(out, "lr_grid.json"))  # fmt: skip
    cold = {j["seed"]: j for j in jobs.values() if j["kind"] == "cold"}
    write_json({"regime": REGIME, "seeds": {s: {**cold[s]["calibration"],
                "accepted": cold[s]["accepted"], "misses": cold[s]["regime_misses"],
                "base_steps": cold[s]["base_steps"], "cold_steps": cold[s]["cold_steps"],
                "coldstart_counts": cold[s]["coldstart_counts"], "commit": cold[s]["commit"]}
                for s in sorted(cold)}}, os.path.join(out, "calibration.json"))  # fmt: skip
    rows, finals, compute = [], {}, []
    seeds = sorted({j["seed"] for j in jobs.values()})
    chosen = {a: lr for a in arms if ARMS[a][1] and (lr := lr_for(a, jobs, scale, *lr_args))}
    for arm in arms:
        lr = chosen.get(arm)
        for seed in seeds:
            rs = run_rows(jobs, arm, seed, lr)
            rows += rs
            test = [r for r in rs if r["split"] == "test"]
            if test:
                finals.setdefault(arm, {})[seed] = test[-1]
            job = jobs.get(job_name("arm", seed, arm, lr)) if lr is not None else None
            if job:
                compute.append({"arm": arm, "seed": seed, "lr": lr, **job["compute"],
                                "wall_s": job["seconds"], "load_avg_start": job["load_avg_start"],
                                "load_avg_end": job["load_avg_end"], "commit": job["commit"]})  # fmt: skip
    write_csv(rows, os.path.join(out, "runs.csv"), RUN_COLUMNS)
    claims = claims_table(finals)
    write_csv(claims, os.path.join(out, "claims.csv"), CLAIM_COLUMNS)
    # machines.json (written by hand: jobs of 42a34ad do not record their CPU) names the machine
    # each seed ran on; a seed's arms share it, so the pairs are within a machine, but whether a
    # run takes off may depend on it: the claims again per machine, exploratory
    machines = {}
    if os.path.exists(os.path.join(out, "machines.json")):
        machines = json.load(open(os.path.join(out, "machines.json")))["machines"]
    by_machine = [{"machine": m, **c} for m, info in machines.items()
                  for c in claims_table(finals, info["seeds"])]  # fmt: skip
    if by_machine:
        path = os.path.join(out, "claims_by_machine.csv")
        write_csv(by_machine, path, ["machine", *CLAIM_COLUMNS])
    if compute:
        write_csv(compute, os.path.join(out, "compute.csv"), digits=None)
    stability = stability_rows(jobs, chosen)
    if stability:
        write_csv(stability, os.path.join(out, "stability.csv"), digits=None)
    series: dict[str, list[list[dict]]] = {}  # the seeds that ran at the arm's chosen lr
    for j in jobs.values():
        if j["kind"] == "arm" and chosen.get(j["arm"]) == j["lr"]:
            series.setdefault(j["arm"], []).append(cost_curve(j))
    rare_plots(out, series)
    claims_plot(out, claims)
    code = code_of({j["commit"] for j in jobs.values() if j.get("commit")})
    lines = [f"Jobs: {len(jobs)} from {len(code)} commit(s) whose Python code is that of "
             f"{', '.join(sorted(set(code.values())))} (the last commit that changed a .py "
             "file; the others add job files only).", ""]  # fmt: skip
    lines += ["| seed | base acc T1 | base format T1 | cold o1+SC+o2 T1 | cold w->c | "
             "SFT only - base | accepted |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in sorted(cold):
        c = cold[s]["calibration"]
        lines.append(f"| {s} | {c['base_acc_t1']:.3f} | {c['base_format_t1']:.3f} | "
                     f"{c['cold_format_t1']:.3f} | {c['cold_wc_generated']:.4f} | "
                     f"{c['sft_only_minus_base']:+.3f} | {'yes' if cold[s]['accepted'] else 'no: ' + '; '.join(cold[s]['regime_misses'])} |")  # fmt: skip
    lines += ["", *seed_table(finals, arms, seeds)]
    lines += ["", "| claim | A - B | paper | toy, rare regime: mean [95% CI], seeds A > B, "
              "detectable | verdict |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {c['claim']} | {c['a']} - {c['b']} | {c['paper']} | {fmt_ci(c)} | "
              f"{c['verdict']} |" for c in claims]  # fmt: skip
    if by_machine:
        names = list(machines)
        lines += ["", "Per machine (exploratory): " + "; ".join(
            f"{m}: {machines[m]['cpu']}, seeds {', '.join(map(str, machines[m]['seeds']))}" for m in names),
            "", "| claim | " + " | ".join(f"machine {m}" for m in names) + " |",
            "| --- |" + " --- |" * len(names)]  # fmt: skip
        cell = {(c["machine"], c["claim"]): fmt_ci(c) for c in by_machine}
        for name, *_ in CLAIMS:
            lines.append(f"| {name} | " + " | ".join(cell[m, name] for m in names) + " |")
    matched = cost_matched(jobs, chosen, "octopus", "no-splice-n16")
    if matched["n_seeds"]:
        lines += ["", "At equal generated tokens (dev acc@2, T 0.6; Octopus's last validation "
                  "against no-splice-n16's at the same tokens): octopus - no-splice-n16 "
                  f"{fmt_ci(matched)}"]  # fmt: skip
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


def code_of(commits: set[str]) -> dict[str, str]:
    """Each recorded commit -> the last commit at or before it that changed a .py file (short
    hash): a job recorded at a commit that only added other jobs' results ran that code."""
    return {
        c: git("log", "-1", "--format=%h", c, "--", "*.py") or "unknown" for c in sorted(commits)
    }


def stability_rows(jobs: dict[str, dict], chosen: dict[str, float]) -> list[dict]:
    """Does Stage II hold the format (Algorithm 1's two stages)? Per self-correction arm, seed
    and stage: training-time format, o1 + SC + o2 format and truncation at T 1.0 over the
    stage's first and last 10 steps (the arm job's `stability`), at the arm's chosen lr."""
    out = []
    for j in sorted(jobs.values(), key=lambda j: (j.get("arm", ""), j["seed"])):
        st = j.get("stability") or {}
        if j["kind"] != "arm" or chosen.get(j["arm"]) != j["lr"] or ARMS[j["arm"]][0] != "cold":
            continue  # the GSPO arms answer once: no self-correction format to hold
        for stage in ("1", "2"):
            if f"stage{stage}_first10_format" in st:
                out.append({"arm": j["arm"], "seed": j["seed"], "stage": stage, **{
                    f"{key}_{end}": st[f"stage{stage}_{end}_{key}"]
                    for key in ("format", "sc_format", "truncated") for end in ("first10", "last10")}})  # fmt: skip
    return out


def cost_curve(job: dict) -> list[dict]:
    """(generated tokens so far, dev acc@2) at each validation of an arm job: accuracy per
    generation cost, the paper's claim (Sec. 5: 8 generated -> 16 trained at the cost of 8)."""
    spent, out, k = 0, [], 0
    steps = {r["global_step"]: r for r in job["steps"]}
    for p in job["curve"]:
        while k < p["step"]:
            k += 1
            spent += steps.get(k, {}).get("gen_tokens", 0)
        out.append({"gen_tokens": spent, "dev_acc2": p["val_acc_final"], "step": p["step"]})
    return out


def at_tokens(curve: list[dict], tokens: float) -> float | None:
    """Dev acc@2 of a `cost_curve` at `tokens` generated tokens, linear between the two
    validations around it (from 0 tokens at the first point's accuracy); None past its end."""
    prev_t, prev_acc = 0, curve[0]["dev_acc2"]
    for p in curve:
        if p["gen_tokens"] >= tokens:
            span = p["gen_tokens"] - prev_t
            w = (tokens - prev_t) / span if span else 1.0
            return prev_acc + w * (p["dev_acc2"] - prev_acc)
        prev_t, prev_acc = p["gen_tokens"], p["dev_acc2"]
    return None


def cost_matched(jobs: dict[str, dict], chosen: dict[str, float], a: str, b: str) -> dict:
    """A's last dev acc@2 minus B's at the same generated tokens, paired over the seeds both ran
    at their chosen lr: the paper's claim per generation cost (Sec. 5), where the claims table
    compares at equal steps (B may generate twice A's tokens)."""
    curves = {}
    for j in jobs.values():
        if j["kind"] == "arm" and j["arm"] in (a, b) and chosen.get(j["arm"]) == j["lr"]:
            curves[j["arm"], j["seed"]] = cost_curve(j)
    diffs = []
    for seed in sorted({s for arm, s in curves if arm == a}):
        if (b, seed) in curves:
            mine = curves[a, seed][-1]
            theirs = at_tokens(curves[b, seed], mine["gen_tokens"])
            if theirs is not None:
                diffs.append(mine["dev_acc2"] - theirs)
    return paired_stats(diffs)

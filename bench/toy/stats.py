"""The aggregate: every committed file of the rare regime from its job files, and the statistics
of the claims (paired differences over seeds, a t interval, an exact sign-flip permutation
test, the arm x machine interaction)."""

from __future__ import annotations

import itertools
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
from .report import claims_plot, rare_plots, report_md

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


# A seed's |A - B| under TIE is no difference: 0.001 is four of the test set's 4,096 samples.
TIE = 0.001
# The per-generation-cost form of "splicing 8->16 >= 16 generated", beside the equal-step one.
COST_CLAIM = "splicing 8->16 >= 16 generated, at equal generated tokens"
# Every analysis added after results existed, and why (the claims, controls, lr grid and rule
# were fixed in code, commit bd2abda, before any result of the rare regime): each report says so.
POST_HOC = {
    "Stage II: token mean vs sequence mean": "post hoc: a diagnostic arm added after results "
    "existed, for the demo's Stage II drift (a93de42)",
    COST_CLAIM: "post hoc: added after the equal-step comparison came out against Octopus "
    "(549fef5); dev set, interpolated along no-splice-n16's curve",
}
MACHINE_SPLIT = "post hoc: the split by machine was chosen after the results (59ef1c0)"
LR_RERUN = "no-augment rerun at the shared cold-start lr, decided after the results (issue 36)"
# GSPO from the base policy learns nothing here: the base repeats one answer per image at T 1.0,
# so every group has one reward and every advantage is 0 (n = 16 ends equal to n = 8 by
# construction). A claim against it is no test of the paper's.
DEGENERATE = ("gspo-n8", "gspo-n16")


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip permutation p of a mean paired difference: under H0 (A and B
    exchangeable within a seed) each seed's sign is a fair coin, so p is the share of the 2^n
    sign patterns whose |sum| reaches the observed |sum|. No normality, so it fits a handful of
    bimodal seeds; its floor is 2 / 2^n (4 seeds: 0.125)."""
    n = len(diffs)
    if not n:
        return float("nan")
    if n > 20:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns: n = {n} is too many")
    observed = abs(sum(diffs)) - 1e-9
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed
               for signs in itertools.product((1, -1), repeat=n))  # fmt: skip
    return hits / 2**n


def interaction(first: list[float], second: list[float]) -> dict:
    """The arm x machine interaction of one claim: the mean paired difference on the second
    machine's seeds minus the first's, Welch's t, and the exact two-sided permutation p over
    every split of the pooled seeds into groups of these sizes (H0: the machine does not move
    the difference). NaN below two seeds a machine."""
    n1, n2 = len(first), len(second)
    out = {"interaction": float("nan"), "interaction_t": float("nan"),
           "interaction_p": float("nan")}  # fmt: skip
    if n1 < 2 or n2 < 2:
        return out
    d = statistics.fmean(second) - statistics.fmean(first)
    se2 = statistics.variance(first) / n1 + statistics.variance(second) / n2
    t = d / math.sqrt(se2) if se2 > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
    pooled, total = first + second, sum(first) + sum(second)
    splits = list(itertools.combinations(range(n1 + n2), n1))
    hits = 0
    for idx in splits:
        s1 = sum(pooled[i] for i in idx)
        hits += abs((total - s1) / n2 - s1 / n1) >= abs(d) - 1e-9
    return {"interaction": d, "interaction_t": t, "interaction_p": hits / len(splits)}


def claim_stats(diffs: list[float]) -> dict:
    """`paired_stats` and the sign-flip p, with each seed a win for A, for B, or a tie (TIE)."""
    return {**paired_stats(diffs), "perm_p": sign_flip_p(diffs),
            "n_ties": sum(abs(d) < TIE for d in diffs),
            "wins_a": sum(d >= TIE for d in diffs), "wins_b": sum(d <= -TIE for d in diffs)}  # fmt: skip


def verdict_of(st: dict) -> str:
    """ "reproduced (A > B)" / "reversed (A < B)" only when the 95% t interval excludes 0 and
    the exact sign-flip p is under 0.05, on the same side; else not resolved, saying why."""
    n = st["n_seeds"]
    if n < 2:
        return "too few seeds"
    if st["n_ties"] == n:
        return "no difference (a tie on every seed)"
    side = 1 if st["ci_low"] > 0 else -1 if st["ci_high"] < 0 else 0
    if side and st["perm_p"] < 0.05:
        return "reproduced (A > B)" if side > 0 else "reversed (A < B)"
    if side:
        floor = 2 / 2**n
        why = f"t interval excludes 0, sign-flip p {st['perm_p']:.3f}" + (
            f", its floor with {n} seeds {floor:.3f}" if floor >= 0.05 else ""
        )
    elif st["perm_p"] < 0.05:
        why = "sign-flip p < 0.05, t interval spans 0"
    else:
        why = "interval spans 0"
    return f"not resolved ({why})"


def analysis_of(name: str, a: str, b: str, machine: str = "all") -> tuple[str, str]:
    """(whether the analysis was fixed before the results, and what else a reader must know)."""
    label = POST_HOC.get(name, "pre-registered (bd2abda)")
    if machine != "all":
        label = MACHINE_SPLIT if name not in POST_HOC else f"{label}; {MACHINE_SPLIT}"
    caveats = []
    if "no-augment" in (a, b):
        caveats.append(LR_RERUN)
    if {a, b} & set(DEGENERATE):
        caveats.append("GSPO from the base policy is degenerate here (one reward per group, "
                       "advantage 0): no test of the paper's claim")  # fmt: skip
    return label, "; ".join(caveats)


def claims_table(finals: dict[str, dict[int, dict]], seeds: list[int] | None = None,
                 machines: dict[str, list[int]] | None = None,
                 extra: list[tuple[str, str, str, str, str, dict[int, float]]] = ()) -> list[dict]:  # fmt: skip
    """One row per claim over the seeds both arms have (only those in `seeds` if given):
    `finals[arm][seed]` holds the final test `acc1` / `acc2`; `extra` adds claims measured
    elsewhere as (claim, a, b, metric, paper, {seed: A - B}). With `machines` (machine ->
    its seeds), every claim's row carries each machine's mean and the arm x machine interaction,
    and the rows of each machine alone follow. Verdict: `verdict_of`."""
    base = [(name, a, b, f"test {ka} - {kb}", paper,
             {s: finals[a][s][ka] - finals[b][s][kb]
              for s in sorted(set(finals.get(a, {})) & set(finals.get(b, {})))})
            for name, a, b, ka, kb, paper in CLAIMS]  # fmt: skip
    scopes = [("all", seeds)] + [(m, ss) for m, ss in (machines or {}).items()]
    out = []
    for machine, scope in scopes:
        for name, a, b, metric, paper, by_seed in [*base, *extra]:
            diffs = [d for s, d in by_seed.items() if scope is None or s in scope]
            st = claim_stats(diffs)
            label, caveat = analysis_of(name, a, b, machine)
            row = {"claim": name, "a": a, "b": b, "metric": metric, "paper": paper, **st,
                   "verdict": verdict_of(st), "machine": machine, "analysis": label,
                   "caveat": caveat}  # fmt: skip
            if machines and machine == "all":
                groups = [[d for s, d in by_seed.items() if s in ss] for ss in machines.values()]
                for m, g in zip(machines, groups, strict=True):
                    row[f"mean_machine_{m}"] = statistics.fmean(g) if g else float("nan")
                if len(groups) == 2:
                    row.update(interaction(*groups))
            out.append(row)
    return out


def claim_columns(machines: dict[str, list[int]]) -> list[str]:
    """claims.csv's columns: the original ones, then the machine a row covers, the permutation
    test, the ties, each machine's mean and the interaction, and how the analysis came about."""
    return [*CLAIM_COLUMNS, "machine", "perm_p", "n_ties", "wins_a", "wins_b",
            *[f"mean_machine_{m}" for m in machines],
            *(["interaction", "interaction_t", "interaction_p"] if len(machines) == 2 else []),
            "analysis", "caveat"]  # fmt: skip


def seed_machines(jobs: dict[str, dict], machines: dict[str, dict]) -> dict[int, str]:
    """Each seed's machine: the one whose `isa` matches the CPU its jobs recorded
    (`cpu_kernels`), or, for jobs older than that record, machines.json's hand-written seed
    list. A seed whose jobs name two machines, or a CPU machines.json does not know, stops the
    aggregate: a seed's jobs must all come from one machine."""
    if not machines:  # no machines.json: no split by machine
        return {}
    by_isa = {info["isa"]: m for m, info in machines.items() if "isa" in info}
    by_hand = {s: m for m, info in machines.items() for s in info.get("seeds", [])}
    out: dict[int, str] = {}
    for name, j in sorted(jobs.items()):
        if "machine" in j:
            isa = j["machine"].rsplit(", ", 2)[-2] if j["machine"].count(", ") >= 2 else "?"
            if isa not in by_isa:
                raise SystemExit(f"jobs/{name}.json ran on {j['machine']!r}: no machine of "
                                 f"machines.json has isa {isa!r}")  # fmt: skip
            m = by_isa[isa]
        elif j["seed"] in by_hand:
            m = by_hand[j["seed"]]
        else:
            continue
        if out.setdefault(j["seed"], m) != m:
            raise SystemExit(f"jobs/{name}.json ran on machine {m}, the other jobs of seed "
                             f"{j['seed']} on machine {out[j['seed']]}: a seed is one machine's")  # fmt: skip
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
    # each seed's machine: recorded by its jobs, or for jobs older than that record written by
    # hand in machines.json. A seed's arms share it, so every pair is within one machine, but
    # whether a run takes off depends on it: every claim also per machine, with the interaction
    machines = {}
    if os.path.exists(os.path.join(out, "machines.json")):
        machines = json.load(open(os.path.join(out, "machines.json")))["machines"]
    where = seed_machines(jobs, machines)
    groups = {m: sorted(s for s in where if where[s] == m) for m in machines}
    cost = cost_matched_by_seed(jobs, chosen, "octopus", "no-splice-n16")
    extra = [(COST_CLAIM, "octopus", "no-splice-n16", "dev acc2 at equal generated tokens",
              ">= 0", cost)]  # fmt: skip
    claims = claims_table(finals, machines=groups, extra=extra)
    write_csv(claims, os.path.join(out, "claims.csv"), claim_columns(groups))
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
    pooled = [c for c in claims if c["machine"] == "all"]
    claims_plot(out, pooled)
    code = code_of({j["commit"] for j in jobs.values() if j.get("commit")})
    return report_md(
        code,
        len(jobs),
        cold,
        finals,
        arms,
        seeds,
        claims,
        machines,
        where,
        chosen,
        compute,
        stability,
    )


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


def cost_matched_by_seed(jobs: dict[str, dict], chosen: dict[str, float], a: str,
                         b: str) -> dict[int, float]:  # fmt: skip
    """Per seed both ran at their chosen lr: A's last dev acc@2 minus B's at the same generated
    tokens, the paper's claim per generation cost (Sec. 5), where the claims table compares at
    equal steps (B may generate twice A's tokens)."""
    curves = {}
    for j in jobs.values():
        if j["kind"] == "arm" and j["arm"] in (a, b) and chosen.get(j["arm"]) == j["lr"]:
            curves[j["arm"], j["seed"]] = cost_curve(j)
    out = {}
    for seed in sorted({s for arm, s in curves if arm == a}):
        if (b, seed) in curves:
            mine = curves[a, seed][-1]
            theirs = at_tokens(curves[b, seed], mine["gen_tokens"])
            if theirs is not None:
                out[seed] = mine["dev_acc2"] - theirs
    return out


def cost_matched(jobs: dict[str, dict], chosen: dict[str, float], a: str, b: str) -> dict:
    """`cost_matched_by_seed`'s differences, paired over seeds (`paired_stats`)."""
    return paired_stats(list(cost_matched_by_seed(jobs, chosen, a, b).values()))

"""The RL arms of the rare regime (one job per arm, seed and learning rate) and the rule that
chooses each arm's learning rate."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

from .calibration import data_paths, evaluate, rare_paths
from .recipe import (
    ARMS,
    DIAGNOSTIC_ARMS,
    GRID_SEED,
    PHASES,
    RARE_PROMPT,
    SHARED,
    arm_stages,
    checkpoint_sha,
    job_name,
    preset,
    seed_dir,
    write_json,
)

# --------------------------------------------------------------------------- the RL arms


def rare_arm_configs(arm: str, seed: int, scale: dict, work: str, lr: float) -> list:
    """The Config of each RL stage of `arm` in the rare regime: SHARED at `lr`, the dev curve
    (`dev_curve` prompts, T 0.6, every `val_every` steps), the arm's changes."""

    start, _ = ARMS[arm]
    out = []
    for k, (name, steps, changes) in enumerate(arm_stages(arm, scale["steps"])):
        out.append(preset(name, **{**SHARED, "lr": lr, "prompt_suffix": RARE_PROMPT, **changes},
                          model=rare_paths(work, seed)[start], seed=seed + 1000 * k,
                          train_data=os.path.join(seed_dir(work, seed), "rl", "rows.jsonl"),
                          val_data=data_paths(work)["dev"], val_max_prompts=scale["dev_curve"],
                          out_dir=os.path.join(seed_dir(work, seed), "arms", f"{arm}-lr{lr:g}",
                                               f"stage{k + 1}"),
                          max_steps=steps, val_every=scale["val_every"]))  # fmt: skip
    return out


def _count_compute(train_module) -> None:
    """Adds to every RL step's row what train.py does not log: generated and trained tokens
    (the paper's claim is accuracy per generation cost). Wraps train.generate and
    train.make_group, which rl_step looks up at call time; a `trained_tokens` metric in
    train.step_metrics would be cleaner."""
    generate, make_group, rl_step = (train_module.generate, train_module.make_group,
                                     train_module.rl_step)  # fmt: skip
    acc: dict = {}

    def counting_generate(t, prompts, step):
        groups = generate(t, prompts, step)
        acc["gen_rollouts"] = sum(len(g) for g in groups)
        acc["gen_tokens"] = sum(len(x.ids) for g in groups for x in g)
        return groups

    def counting_group(*args, **kwargs):
        g = make_group(*args, **kwargs)
        acc["trained_samples"] = acc.get("trained_samples", 0) + len(g.samples)
        acc["trained_tokens"] = acc.get("trained_tokens", 0) + sum(len(s.ids) for s in g.samples)
        acc["trained_policy_tokens"] = acc.get("trained_policy_tokens", 0) + int(
            sum(float(m.sum()) for m in g.policy_masks)
        )
        return g

    def counting_step(t, step):
        acc.clear()
        row = rl_step(t, step)
        row.update(acc)
        return row

    train_module.generate, train_module.make_group = counting_generate, counting_group
    train_module.rl_step = counting_step


def _stability(rows: list[dict]) -> dict:
    """Per stage: training-time format, o1 + SC + o2 format and truncation (temperature 1.0)
    over its first and last 10 steps."""
    out = {}
    for stage in sorted({r["stage"] for r in rows}):
        st = [r for r in rows if r["stage"] == stage]
        for end, part in (("first10", st[:10]), ("last10", st[-10:])):
            for key in ("format", "sc_format", "truncated"):
                out[f"stage{stage}_{end}_{key}"] = round(statistics.fmean(r[key] for r in part), 4)
    return out


def rare_arm_job(work: str, arm: str, seed: int, lr: float, scale: dict, out: str,
                 provenance: dict) -> None:  # fmt: skip
    """One arm, one seed, one learning rate: its RL stages (dev curve), then the test set."""
    import train

    t0 = time.time()
    _count_compute(train)
    start = ARMS[arm][0]
    paths = rare_paths(work, seed)
    job: dict = {"job": os.path.basename(out)[:-5], "kind": "arm", "arm": arm, "seed": seed,
                 "lr": lr, **provenance, "start_checkpoint": checkpoint_sha(paths[start]),
                 "load_avg_start": os.getloadavg()[0]}  # fmt: skip
    cfgs = rare_arm_configs(arm, seed, scale, work, lr)
    shutil.rmtree(os.path.dirname(cfgs[0].out_dir), ignore_errors=True)
    model, engine = None, None
    for cfg in cfgs:
        model, engine = train.run_stage(cfg if model is None else cfg.replace(model=model), engine)
    steps, curve, step0 = [], [], 0
    for cfg in cfgs:
        last = 0
        for line in open(os.path.join(cfg.out_dir, "metrics.jsonl")):
            r = json.loads(line)
            last = r["step"]
            r["global_step"] = step0 + r["step"]
            r["step_s"] = sum(r.get(f"time_{p}", 0.0) for p in PHASES)
            steps.append(r)
            if "val_acc_final" in r:
                curve.append({"step": r["global_step"], "stage": r["stage"],
                              **{k: round(r[k], 6) for k in DEV_KEYS}})  # fmt: skip
        step0 += last
    suffix = cfgs[0].prompt_suffix
    test = evaluate(engine, model, data_paths(work)["test"], suffix=suffix, temperature=0.6,
                    top_p=0.95, n=scale["test_n"], prompts=0, seed=seed,
                    out_dir=os.path.join(os.path.dirname(cfgs[0].out_dir), "test"))  # fmt: skip
    engine.close()
    times = [r["step_s"] for r in steps]
    job.update(
        curve=curve, test=test, final_checkpoint=checkpoint_sha(model),
        compute={"rl_steps": len(steps),
                 **{k: sum(r.get(k, 0) for r in steps) for k in COMPUTE_KEYS},
                 "median_step_s": round(statistics.median(times), 3),
                 "mean_step_s": round(statistics.fmean(times), 3),
                 "steps_s": round(sum(times), 1)},
        stability=_stability(steps),
        steps=[{k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in STEP_KEYS
                if k in r} for r in steps],
        seconds=round(time.time() - t0, 1), load_avg_end=os.getloadavg()[0])  # fmt: skip
    write_json(job, out)


DEV_KEYS = ("val_acc_o1", "val_acc_final", "val_wc", "val_cw", "val_format", "val_sc_format",
            "val_corrects_itself")  # fmt: skip
COMPUTE_KEYS = ("gen_rollouts", "gen_tokens", "trained_samples", "trained_tokens",
                "trained_policy_tokens")  # fmt: skip
STEP_KEYS = ("global_step", "stage", "reward", "acc_o1", "acc_final", "format", "sc_format",
             "truncated", "corrects_itself", "gen_wc", "gen_cc", "gen_cw", "gen_ww", "gen_none",
             "train_wc", "train_cc", "train_cw", "train_ww", "train_none", "response_len",
             "samples_per_prompt", "step_s", *COMPUTE_KEYS)  # fmt: skip


# --------------------------------------------------------------------------- the learning rates


def grid_score(job: dict) -> float:
    """An lr's dev score: mean dev acc@2 over the last 3 validations (one point is noisy)."""
    return statistics.fmean(p["val_acc_final"] for p in job["curve"][-3:])


def choose_lr(scores: dict[float, float]) -> float:
    """The rule, the same for every arm: the highest dev score; a tie goes to the smaller lr."""
    return max(sorted(scores), key=lambda lr: (round(scores[lr], 6), -lr))


def lr_for(arm: str, jobs: dict, scale: dict, lr: float = 0.0, lr_from: str = "") -> float | None:
    """The learning rate an arm runs its seeds at: `lr` if given; else, for an arm that starts
    from the cold start, the scale's `cold_start_rl_lr` where it has one; else the one the grid in
    `jobs` chose; else the one chosen in `lr_from` (the committed lr_grid.json); else None
    while the grid still has to run (1e-4 at a scale without a grid)."""
    if lr:
        return lr
    if scale.get("cold_start_rl_lr") and ARMS[arm][0] == "cold":
        return scale["cold_start_rl_lr"]
    arm = DIAGNOSTIC_ARMS.get(arm, arm)
    chosen = lr_grid(jobs, [arm], tuple(scale["lr_grid"])).get(arm, {}).get("chosen")
    if chosen is not None:
        return chosen
    if lr_from and os.path.exists(lr_from):
        chosen = json.load(open(lr_from))["arms"].get(arm, {}).get("chosen")
        if chosen is not None:
            return chosen
    return None if scale["lr_grid"] else 1e-4


def lr_grid(jobs: dict[str, dict], arms: list[str], grid: tuple) -> dict:
    """arm -> {scores: {lr: dev score}, chosen}; `chosen` only once every lr of the grid ran."""
    out = {}
    for arm in arms:
        if not ARMS[arm][1]:
            continue
        scores = {lr: grid_score(jobs[n]) for lr in grid
                  if (n := job_name("arm", GRID_SEED, arm, lr)) in jobs}  # fmt: skip
        out[arm] = {"scores": {f"{lr:g}": round(s, 4) for lr, s in scores.items()},
                    "chosen": choose_lr(scores) if len(scores) == len(grid) and grid else None}  # fmt: skip
    return out

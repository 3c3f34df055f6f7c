"""The dense-correction regime (`--regime dense`): the first, committed experiment
(bench/results/toy_*), with its own cold start, arms, tables and plots."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from .calibration import _curve
from .recipe import (
    ARMS,
    BASELINE_SUFFIX,
    DENSE_ARMS,
    DEV_SEED,
    PAPER,
    PHASES,
    ROOT,
    SC,
    SCALES,
    SFT,
    SHARED,
    VAL_SEED,
    VARIANT,
    answer_of,
    arm_stages,
    format_reward,
    free_port,
    o1_prompts,
    preset,
    question_row,
    score_batch,
    seed_dir,
    split_response,
    strong_messages,
    synthetic_answer,
    task,
    write_csv,
    write_rows,
)

# =============================================================================================
# The oracle "stronger model" of the cold start
# =============================================================================================

_TRUTH_RE = re.compile(r"The correct final answer is (.{1,64}?)\.\n")


class Oracle:
    """Stands in for the stronger model of Sec. 4.1 behind the engine interface
    (`generate(prompts, n, sampling)`): it reads the ground truth that coldstart.py's prompt
    gives it and writes a correct, well-formed o2. No model, so no o2 is ever wrong."""

    def generate(self, prompts, n, sampling, prefixes=None):
        from rollout import Rollout

        out = []
        for p in prompts:
            truth = _TRUTH_RE.search(p["prompt"])
            text = synthetic_answer(truth.group(1)) if truth else "I cannot tell."
            out.append([Rollout([], [], text, "stop") for _ in range(n)])
        return out


def arms_dir(work: str, seed: int, scale: dict) -> str:
    """The RL runs of one seed at one step budget (and learning rate, when not SHARED's)."""
    lr = scale.get("lr", SHARED["lr"])
    tag = f"arms-{scale['steps']}x{scale['val_every']}" + (
        f"-lr{lr:g}" if lr != SHARED["lr"] else ""
    )
    return os.path.join(seed_dir(work, seed), tag)


def coldstart_job(work: str, seed: int, scale: dict) -> None:
    """Tiny model, base policy, mixed-sampling cold start, and the step-0 evaluations."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    import train
    from rollout import Sampling, VLLMEngine
    from tiny import build_tiny

    d = seed_dir(work, seed)
    sft = {**SFT, **scale.get("sft", {})}
    data = os.path.join(work, "data")
    val = os.path.join(data, "val", "val.jsonl")
    dev = os.path.join(data, "dev", "dev.jsonl")
    tiny = build_tiny(os.path.join(d, "tiny-init"), seed=seed)
    base_rows = task(scale["base_rows"], seed * 10 + 1)
    base_sft = write_rows(base_rows, os.path.join(d, "base-sft", "rows.jsonl"),
                          [synthetic_answer(e["answer"]) for e in base_rows])  # fmt: skip
    write_rows(task(scale["rl_pool"], seed * 10 + 2), os.path.join(d, "rl", "rows.jsonl"))
    calib: dict = {"seed": seed}

    # 1. the base policy: plain single answers, stopped once sampled accuracy (T = 1.0) on the
    #    dev set reaches `base_stop`: imperfect, as a real base model is on a hard task. Kept
    #    once complete (the job is deterministic), so a changed cold start reuses it.
    cfg = preset("sft", **sft, model=tiny, sft_data=base_sft, val_data=dev, epochs=1,
                 out_dir=os.path.join(d, "base"), prompt_suffix="baseline", lr_schedule="constant",
                 warmup_ratio=0.0, max_steps=scale["base_max_steps"],
                 val_every=scale["base_val_every"], val_temperature=1.0, val_top_p=1.0,
                 sft_stop_acc=scale["base_stop"], sft_stop_format=0.0, seed=seed)  # fmt: skip
    base = os.path.join(cfg.out_dir, "export")
    if os.path.exists(os.path.join(cfg.out_dir, "export.done")):
        engine = VLLMEngine(base, max_model_len=cfg.max_prompt_len + cfg.max_response_len,
                            seed=seed, kv_cache_gb=cfg.kv_cache_gb, min_pixels=cfg.min_pixels,
                            max_pixels=cfg.max_pixels)  # fmt: skip
    else:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        base, engine = train.run_stage(cfg)
        open(os.path.join(cfg.out_dir, "export.done"), "w").close()
        # the engine last synced at the last validation: give it the exported weights
        engine.wake()
        engine.sync_weights(load_file(os.path.join(base, "model.safetensors")).items())
    calib["base_curve"] = _curve(cfg.out_dir)
    calib["base_steps"] = calib["base_curve"][-1]["step"] if calib["base_curve"] else 0

    # 2. mixed sampling (dense_coldstart_rows): o1 from the base policy's engine (the release's o1
    #    sampling: T 0.6, top-p 0.9, top-k 20, the plain prompt the base policy knows), o2 from
    #    the oracle; then SFT on o1 + SC + o2 for up to one epoch (Sec. 4.1), stopped once the
    #    format holds at the training temperature (`cold_stop`). The vision tower is frozen, as
    #    in the release's cold start: trained too, it let the oracle's always-right o2 teach the
    #    counting itself (acc@2 0.77 and 0.89 at T 0.6 after the cold start on seeds 1 and 2,
    #    leaving RL no room); the cold start is there to teach the format.
    processor = AutoProcessor.from_pretrained(base)
    processor.image_processor.size = dict(engine.image_size)
    out = os.path.join(d, "cold-data", "rows.jsonl")
    if os.path.exists(out + ".counts.json"):
        counts = json.load(open(out + ".counts.json"))
    else:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        torch.manual_seed(seed)
        o1 = Sampling(temperature=0.6, top_p=0.9, top_k=20, max_tokens=SFT["max_response_len"])
        counts = dense_coldstart_rows(engine, Oracle(), processor,
                                      task(scale["cold_inputs"], seed * 10 + 3),
                                      samples=scale["cold_samples"], sampling=o1, out=out)  # fmt: skip
        with open(out + ".counts.json", "w") as f:
            json.dump(counts, f, indent=1)
    calib["coldstart_counts"] = counts
    print(f"[toy] seed {seed} cold-start rows: {json.dumps(counts)}", flush=True)
    if not counts["written"]:
        raise SystemExit(f"seed {seed}: no cold-start row kept (no o1 with an answer): the base "
                         "policy has not learned the answer format; train it longer")  # fmt: skip
    steps = max(1, math.ceil(scale["cold_epochs"] * counts["written"] / sft["sft_batch"]))
    cfg = preset("sft", **sft, model=base, sft_data=out, val_data=dev, epochs=1,
                 out_dir=os.path.join(d, "cold"), prompt_suffix="octopus", lr_schedule="constant",
                 warmup_ratio=0.0, max_steps=steps, val_every=scale["cold_val_every"],
                 val_temperature=1.0, val_top_p=1.0, sft_stop_format=scale["cold_stop"],
                 freeze_vision=True, seed=seed)  # fmt: skip
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    cold, engine = train.run_stage(cfg, engine)
    calib["cold_curve"] = _curve(cfg.out_dir)
    calib["cold_steps"] = json.loads(
        open(os.path.join(cfg.out_dir, "metrics.jsonl")).readlines()[-1]
    )["step"]

    # 3. each starting checkpoint on the held-out set: at the validation setting (T 0.6), which
    #    is every arm's step 0, and at the training temperature (T 1.0), for the calibration
    for name, model, suffix in (("base", base, "baseline"), ("cold", cold, "octopus")):
        for temp, top_p in ((0.6, 0.95), (1.0, 1.0)):
            ev = preset("gspo-n8", **{**SHARED, "val_temperature": temp, "val_top_p": top_p},
                        model=model, train_data=dev, val_data=val, prompt_suffix=suffix,
                        out_dir=os.path.join(d, f"eval-{name}"), export=False, seed=seed)  # fmt: skip
            t, _, _ = train.build_trainer(ev, engine)
            calib[f"{name}_T{temp}"] = train.validate(t, -1)
            del t
    with open(os.path.join(d, "calibration.json"), "w") as f:
        json.dump(calib, f, indent=1)
    engine.close()


def arm_configs(arm: str, seed: int, scale: dict, work: str) -> list:
    """The Config of each RL stage of `arm` (octopus.preset + SHARED + the arm's changes); the
    first stage's model is the arm's starting checkpoint, a later stage's is filled in when the
    earlier one ends."""

    d = seed_dir(work, seed)
    start, _ = ARMS[arm]
    out = []
    for k, (name, steps, changes) in enumerate(arm_stages(arm, scale["steps"])):
        # a later stage draws its own prompt order (the seed offset), so that every arm sees
        # the same number of distinct prompts, not Stage I's prompts twice
        shared = {**SHARED, "lr": scale.get("lr", SHARED["lr"])}
        out.append(preset(name, **{**shared, **changes}, model=os.path.join(d, start, "export"),
                          seed=seed + 1000 * k, train_data=os.path.join(d, "rl", "rows.jsonl"),
                          val_data=os.path.join(work, "data", "val", "val.jsonl"),
                          out_dir=os.path.join(arms_dir(work, seed, scale), arm, f"stage{k + 1}"),
                          max_steps=steps, val_every=scale["val_every"]))  # fmt: skip
    return out


def arm_job(work: str, arm: str, seed: int, scale: dict) -> None:
    """One arm's RL stages for one seed, one after the other with one engine (train.run_stage,
    as `train.py --preset demo` runs its stages)."""
    import train

    model, engine = None, None
    for cfg in arm_configs(arm, seed, scale, work):
        model, engine = train.run_stage(cfg if model is None else cfg.replace(model=model), engine)
    if engine is not None:
        engine.close()


# =============================================================================================
# Collecting the results
# =============================================================================================

VAL = {"val_acc@1": "val_acc_o1", "val_acc@2": "val_acc_final", "val_wc": "val_wc",
       "val_cw": "val_cw", "val_corrects_itself": "val_corrects_itself",
       "val_format": "val_format"}  # fmt: skip
COLUMNS = ["arm", "seed", "step", "stage", "seconds", *VAL, "s_per_step", "s_per_step_median",
           "gen_wc_share", "train_wc_share", "train_acc", "samples_per_prompt", "time_generate",
           "time_update"]  # fmt: skip


def arm_rows(work: str, arm: str, seed: int, scale: dict) -> list[dict]:
    """One row per validation point of one arm and seed, step 0 from the starting checkpoint's
    evaluation. `seconds`: the summed step times (validation and stage switches excluded);
    the rates are over the steps since the previous validation point."""
    d = seed_dir(work, seed)
    calib = json.load(open(os.path.join(d, "calibration.json")))
    start, _ = ARMS[arm]
    zero = calib[f"{start}_T0.6"]
    rows = [{"arm": arm, "seed": seed, "step": 0, "stage": "start", "seconds": 0.0,
             **{c: zero[k] for c, k in VAL.items()}}]  # fmt: skip
    step0, seconds, window = 0, 0.0, []
    for k in range(len(ARMS[arm][1])):
        path = os.path.join(arms_dir(work, seed, scale), arm, f"stage{k + 1}", "metrics.jsonl")
        last = 0
        for line in open(path):
            r = json.loads(line)
            last = r["step"]
            step_s = sum(r.get(f"time_{p}", 0.0) for p in PHASES)
            seconds += step_s
            window.append((r, step_s))
            if "val_acc_final" in r:
                rows.append({"arm": arm, "seed": seed, "step": step0 + r["step"],
                             "stage": r["stage"], "seconds": round(seconds, 2),
                             **{c: r[key] for c, key in VAL.items()}, **_window(window)})  # fmt: skip
                window = []
        step0 += last
    return rows


def _window(window: list[tuple[dict, float]]) -> dict:
    gen = {k: sum(r[f"gen_{k}"] for r, _ in window) for k in ("wc", "cc", "cw", "ww", "none")}
    trn = {k: sum(r[f"train_{k}"] for r, _ in window) for k in ("wc", "cc", "cw", "ww", "none")}
    n = len(window)
    return {
        "s_per_step": round(sum(s for _, s in window) / n, 3),
        "s_per_step_median": round(statistics.median(s for _, s in window), 3),
        "_step_times": [s for _, s in window],
        "gen_wc_share": gen["wc"] / max(sum(gen.values()), 1),
        "train_wc_share": trn["wc"] / max(sum(trn.values()), 1),
        "train_acc": sum(r["acc_final"] for r, _ in window) / n,
        "samples_per_prompt": sum(r["samples_per_prompt"] for r, _ in window) / n,
        "time_generate": round(sum(r["time_generate"] for r, _ in window) / n, 3),
        "time_update": round(sum(r["time_update"] for r, _ in window) / n, 3),
    }


# =============================================================================================
# Tables: final values over seeds, paired differences for the paper's claims
# =============================================================================================


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m, s = mean_sd(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def finals(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """arm -> seed -> its last validation row, plus its mean seconds per RL step and the
    w->c shares over the whole run."""
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        cur = out.setdefault(r["arm"], {}).get(r["seed"])
        if cur is None or r["step"] >= cur["step"]:
            out[r["arm"]][r["seed"]] = dict(r)
    for arm, by_seed in out.items():
        for seed, last in by_seed.items():
            trained = [r for r in rows if r["arm"] == arm and r["seed"] == seed and r["step"] > 0]
            if trained:
                # the median step: robust to other jobs' load spikes on a shared machine
                times = [t for r in trained for t in r.get("_step_times", [])]
                last["run_s_per_step"] = (statistics.median(times) if times
                                          else last["seconds"] / last["step"])  # fmt: skip
                # every window is val_every steps long: a plain mean is the run's mean
                last["run_gen_wc"] = statistics.fmean(r["gen_wc_share"] for r in trained)
                last["run_train_wc"] = statistics.fmean(r["train_wc_share"] for r in trained)
    return out


def tables(rows: list[dict], seeds: list[int]) -> str:
    """The README tables as markdown."""
    fin = finals(rows)
    arms = [a for a in ARMS if a in fin]
    lines = ["| arm | starts from | final acc@1 | final acc@2 | acc@2 - acc@1 | w->c | c->w | "
             "s/step (median) | w->c share generated -> trained | paper (7-benchmark avg) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arm in arms:
        f = [fin[arm][s] for s in seeds if s in fin[arm]]
        sps = [x["run_s_per_step"] for x in f if "run_s_per_step" in x]
        share = "-"
        if any("run_gen_wc" in x for x in f):
            share = (f"{fmt([x['run_gen_wc'] for x in f])} -> "
                     f"{fmt([x['run_train_wc'] for x in f])}")  # fmt: skip
        paper = PAPER.get(arm)
        lines.append(
            f"| {arm} | {ARMS[arm][0]} | {fmt([x['val_acc@1'] for x in f])} | "
            f"{fmt([x['val_acc@2'] for x in f])} | "
            f"{fmt([x['val_acc@2'] - x['val_acc@1'] for x in f])} | "
            f"{fmt([x['val_wc'] for x in f])} | {fmt([x['val_cw'] for x in f])} | "
            f"{fmt(sps, 2)} | {share} | {'-' if paper is None else paper} |"
        )
    base = [r for r in rows if r["arm"] in ("gspo-n8", "gspo-n16") and r["step"] == 0]
    if base:
        by_seed = {r["seed"]: r for r in base}
        accs = [by_seed[s]["val_acc@2"] for s in seeds if s in by_seed]
        lines.append(f"| (base policy, step 0) | - | {fmt(accs)} | {fmt(accs)} | 0 | 0 | 0 | - | "
                     f"- | {PAPER['base']} |")  # fmt: skip

    def paired(a: str, b: str, key: str = "val_acc@2") -> tuple[str, str]:
        common = [s for s in seeds if s in fin.get(a, {}) and s in fin.get(b, {})]
        if not common:
            return "-", "-"
        diffs = [fin[a][s][key] - fin[b][s][key] for s in common]
        wins = sum(d > 0 for d in diffs)
        return fmt(diffs), f"{wins}/{len(diffs)}"

    claims = [
        ("Octopus beats GSPO n=16 (acc@2)", "octopus", "gspo-n16", "val_acc@2", "+1.0"),
        ("GSPO n=16 beats GSPO n=8", "gspo-n16", "gspo-n8", "val_acc@2", "+3.3"),
        ("paper selection beats random splicing", "octopus", "random-augment", "val_acc@2", "+3.1"),
        ("random splicing beats none", "random-augment", "no-augment", "val_acc@2", "+1.2"),
        ("paper selection beats none", "octopus", "no-augment", "val_acc@2", "+4.3"),
        ("paper selection vs released quotas", "octopus", "released-augment", "val_acc@2", "-"),
        ("Stage I helps", "octopus", "no-stage1", "val_acc@2", "+1.9"),
        ("RL helps over the cold start", "octopus", "sft-only", "val_acc@2", "+8.3"),
    ]
    lines += ["", "| claim | A - B | per-seed difference (mean ± sd) | seeds with A > B | paper |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, a, b, key, paper in claims:
        d, wins = paired(a, b, key)
        if d != "-":
            lines.append(f"| {name} | {a} - {b} | {d} | {wins} | {paper} |")
    if "octopus" in fin:
        f = [fin["octopus"][s] for s in seeds if s in fin["octopus"]]
        d = [x["val_acc@2"] - x["val_acc@1"] for x in f]
        lines.append(f"| acc@2 > acc@1 (Octopus) | acc@2 - acc@1 | {fmt(d)} | "
                     f"{sum(x > 0 for x in d)}/{len(d)} | > 0 |")  # fmt: skip
    if "octopus" in fin and "gspo-n16" in fin:
        common = [s for s in seeds if s in fin["octopus"] and s in fin["gspo-n16"]]
        ratio = [fin["octopus"][s]["run_s_per_step"] / fin["gspo-n16"][s]["run_s_per_step"]
                 for s in common]  # fmt: skip
        lines.append(f"| Octopus step time / GSPO n=16's | ratio | {fmt(ratio, 2)} | "
                     f"{sum(x < 1 for x in ratio)}/{len(ratio)} faster | 0.72 |")  # fmt: skip
    return "\n".join(lines)


def calibration_table(by_seed: dict, rows: list[dict]) -> str:
    """Per seed: where the base policy and the cold start stopped and what they score on the
    held-out set, and the best acc@2 any RL arm reached (the task must leave room)."""
    lines = ["| seed | base policy: SFT steps | base acc, T 1.0 / 0.6 | cold start: rows kept "
             "(o1 right) | SFT steps | cold acc@1, T 1.0 / 0.6 | cold acc@2, T 1.0 / 0.6 | "
             "well-formed o1+SC+o2, T 1.0 | best acc@2 of any RL arm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for seed, c in by_seed.items():
        best = max((r["val_acc@2"] for r in rows if r["seed"] == int(seed) and r["step"] > 0),
                   default=float("nan"))  # fmt: skip
        b1, b6, c1, c6 = c["base_T1.0"], c["base_T0.6"], c["cold_T1.0"], c["cold_T0.6"]
        k = c["coldstart_counts"]
        lines.append(
            f"| {seed} | {c['base_steps']} | {b1['val_acc_final']:.3f} / {b6['val_acc_final']:.3f} "
            f"| {k['written']} ({k['o1_correct']}) | {c['cold_steps']} | "
            f"{c1['val_acc_o1']:.3f} / {c6['val_acc_o1']:.3f} | "
            f"{c1['val_acc_final']:.3f} / {c6['val_acc_final']:.3f} | "
            f"{c1.get('val_sc_format', c1['val_format']):.3f} | {best:.3f} |"
        )
    return "\n".join(lines)


# =============================================================================================
# Plots (matplotlib, optional)
# =============================================================================================


def plots(rows: list[dict], out: str) -> list[str]:
    """acc@2 against step and against seconds (mean over seeds, band: min-max), and the w->c
    share before and after splicing per arm. Skipped with one line without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[toy] matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    written = []
    for x_key, name, label in (("step", "toy_acc_vs_step.png", "RL step"),
                               ("seconds", "toy_acc_vs_seconds.png", "seconds of RL steps")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for arm in arms:
            steps = sorted({r["step"] for r in rows if r["arm"] == arm})
            xs, ms, lo, hi = [], [], [], []
            for s in steps:
                at = [r for r in rows if r["arm"] == arm and r["step"] == s]
                ys = [r["val_acc@2"] for r in at]
                xs.append(statistics.fmean(r[x_key] for r in at))
                ms.append(statistics.fmean(ys))
                lo.append(min(ys))
                hi.append(max(ys))
            if arm == "sft-only":  # no RL: a level line across the plot
                ax.axhline(ms[0], color="gray", ls=":", label="sft-only (cold start)")
                continue
            (line,) = ax.plot(xs, ms, marker=".", label=arm)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        if x_key == "step":
            switch = [r["step"] for r in rows if r["arm"] == "octopus" and r["stage"] == "1"]
            if switch:
                ax.axvline(max(switch), color="gray", lw=0.8, ls="--")
                ax.text(max(switch), ax.get_ylim()[0], " Stage I | Stage II", fontsize=7,
                        color="gray", va="bottom")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("validation acc@2 (T 0.6, 256 images)")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    fin = finals(rows)
    rl = [a for a in arms if any("run_gen_wc" in v for v in fin[a].values())]
    if rl:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        width = 0.38
        for k, (key, label) in enumerate(
            (("run_gen_wc", "generated"), ("run_train_wc", "trained"))
        ):
            means = [statistics.fmean(v[key] for v in fin[a].values()) for a in rl]
            ax.bar([i + (k - 0.5) * width for i in range(len(rl))], means, width, label=label)
        ax.set_xticks(range(len(rl)), rl, rotation=20, fontsize=8)
        ax.set_ylabel("w->c share of samples")
        ax.set_title("w->c share before (generated) and after splicing (trained)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "toy_wc_share.png"), dpi=110)
        plt.close(fig)
        written.append("toy_wc_share.png")
    return written


def dense_main(args) -> None:
    """The committed dense-correction experiment (toy_replication.csv and its tables)."""
    scale_name = args.scale_name
    scale = dict(SCALES[scale_name])
    if args.steps:
        scale["steps"] = args.steps
    if args.lr:
        scale["lr"] = args.lr
    work = os.path.abspath(
        args.work or os.path.join(ROOT, "runs", "toy-smoke" if args.smoke else "toy")
    )
    if args.job == "coldstart":
        return coldstart_job(work, args.seed, scale)
    if args.job == "arm":
        return arm_job(work, args.arm, args.seed, scale)

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in DENSE_ARMS]
    if unknown:
        raise SystemExit(f"unknown dense arm(s) {unknown}; known: {', '.join(DENSE_ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        seeds = seeds[:1]
    os.makedirs(args.out, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    # the held-out set (and the base policy's stop-rule set): once, the same for every seed
    write_rows(task(scale["val"], VAL_SEED), os.path.join(work, "data", "val", "val.jsonl"))
    write_rows(task(scale["dev"], DEV_SEED), os.path.join(work, "data", "dev", "dev.jsonl"))
    me = os.path.join(ROOT, "bench", "toy_replication.py")
    common = ["--regime", "dense", "--work", work, "--steps", str(scale["steps"]), "--lr",
              str(args.lr)] + (["--smoke"] if args.smoke else
                                                                 ["--quick"] if args.quick else [])  # fmt: skip
    jobs = []
    for s in seeds:
        jobs.append({"name": f"coldstart-seed{s}", "after": [],
                     "done": os.path.join(seed_dir(work, s), "coldstart.done"),
                     "argv": [me, "--job", "coldstart", "--seed", str(s), *common]})  # fmt: skip
    # the longest runs first, so that the two slots stay busy to the end
    cheap = ("gspo-n8", "no-augment")  # 8 samples trained per prompt, the others 16
    order = sorted((a for a in arms if ARMS[a][1]), key=lambda a: (a != "gspo-n16", a in cheap))
    for a in order:
        for s in seeds:
            done = os.path.join(arms_dir(work, s, scale), f"{a}.done")
            if args.fresh and os.path.exists(done):
                os.remove(done)
            if not os.path.exists(done):
                shutil.rmtree(os.path.join(arms_dir(work, s, scale), a), ignore_errors=True)
            jobs.append({"name": f"{a}-seed{s}", "after": [f"coldstart-seed{s}"], "done": done,
                         "argv": [me, "--job", "arm", "--arm", a, "--seed", str(s), *common]})  # fmt: skip
    for j in jobs:
        os.makedirs(os.path.dirname(j["done"]), exist_ok=True)
    t0 = time.time()
    took = run_jobs(jobs, args.parallel, logs)
    wall = time.time() - t0

    rows = [r for a in arms for s in seeds for r in arm_rows(work, a, s, scale)]
    write_csv(rows, os.path.join(args.out, "toy_replication.csv"), COLUMNS)
    calib = {"task": f"data.synthetic_task(variant={VARIANT!r})", "scale": scale_name,
             "sizes": scale, "shared": SHARED, "sft": SFT,
             "seeds": {s: json.load(open(os.path.join(seed_dir(work, s), "calibration.json")))
                       for s in seeds},
             "max_val_acc@2_after_step_0": max((r["val_acc@2"] for r in rows if r["step"] > 0),
                                               default=None),
             "wall_clock_s_this_invocation": round(wall, 1),
             "job_seconds": {j["name"]: float(open(j["done"]).read()) for j in jobs},
             "jobs_run_this_invocation": sorted(took),
             "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"}  # fmt: skip
    with open(os.path.join(args.out, "toy_calibration.json"), "w") as f:
        json.dump(calib, f, indent=1)
    md = calibration_table(calib["seeds"], rows) + "\n\n" + tables(rows, seeds)
    with open(os.path.join(args.out, "toy_replication.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    for name in plots(rows, args.out):
        print(f"[toy] wrote {os.path.join(args.out, name)}")
    print(
        f"[toy] {len(rows)} rows in {os.path.join(args.out, 'toy_replication.csv')}; "
        f"wall-clock {wall:.0f} s ({scale_name}, {len(seeds)} seed(s), {len(arms)} arm(s))"
    )


def run_jobs(jobs: list[dict], parallel: int, log_dir: str) -> dict[str, float]:
    """Run `jobs` (`name`, `argv`, `after`: names that must finish first) as processes, at most
    `parallel` at once, each with one thread; a job whose `done` file exists is skipped.
    Returns each job's wall-clock seconds. Raises when one fails (its log is named)."""
    pending = [j for j in jobs if not os.path.exists(j["done"])]
    finished = {j["name"] for j in jobs if os.path.exists(j["done"])}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    took: dict[str, float] = {}
    while pending or running:
        for j in list(pending):
            if len(running) >= parallel:
                break
            if all(a in finished for a in j["after"]):
                pending.remove(j)
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                           VLLM_ENABLE_V1_MULTIPROCESSING="0", RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
                log = open(os.path.join(log_dir, j["name"] + ".log"), "w")
                print(f"[toy] start {j['name']}", flush=True)
                proc = subprocess.Popen([sys.executable, *j["argv"]], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
                running[j["name"]] = (proc, time.time(), log)
        time.sleep(0.5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other, _, _log in running.values():
                    other.kill()
                raise SystemExit(f"[toy] job {name} failed ({proc.returncode}): see "
                                 f"{os.path.join(log_dir, name + '.log')}")  # fmt: skip
            took[name] = time.time() - t0
            open(next(j["done"] for j in jobs if j["name"] == name), "w").write(f"{took[name]}\n")
            finished.add(name)
            print(f"[toy] done {name} in {took[name]:.0f} s", flush=True)
    return took


def dense_coldstart_rows(
    policy_engine,
    strong_engine,
    processor,
    examples: list[dict],
    *,
    samples: int,
    sampling,
    out: str,
) -> dict:
    """The dense regime's cold-start rows, as its committed runs built them (coldstart.py's
    first pipeline, before the paper's 4k : 6k selection): every o1 with an answer, sampled
    with the plain prompt, gets the strong model's o2; a row for each o2 that is well-formed
    and correct. Writes `out` (JSONL, images beside it) and returns the counts."""
    from rollout import render_prompt

    counts = {"inputs": len(examples), "o1_samples": 0, "o1_with_answer": 0, "o1_correct": 0,
              "o2_generated": 0, "o2_well_formed": 0, "o2_correct": 0, "written": 0}  # fmt: skip
    groups = policy_engine.generate(o1_prompts(processor, examples, BASELINE_SUFFIX), samples,
                                    sampling)  # fmt: skip
    pairs = []  # (example index, o1)
    for k, group in enumerate(groups):
        for r in group:
            counts["o1_samples"] += 1
            o1, _ = split_response(r.text)
            if answer_of(o1):
                counts["o1_with_answer"] += 1
                pairs.append((k, o1))
    truths = [examples[k]["answer"] for k, _ in pairs]
    o1_scores = score_batch([o1 for _, o1 in pairs], truths, kind="baseline")
    counts["o1_correct"] = sum(s.acc_final == 1.0 for s in o1_scores)
    prompts = [render_prompt(processor, strong_messages(examples[k], o1)) for k, o1 in pairs]
    o2s = [g[0].text.strip() for g in strong_engine.generate(prompts, 1, sampling)] if pairs else []
    counts["o2_generated"] = len(o2s)
    o2_scores = score_batch(o2s, truths, kind="baseline")
    images_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "images")
    os.makedirs(images_dir, exist_ok=True)
    with open(out, "w") as f:
        for (k, o1), o2, s in zip(pairs, o2s, o2_scores, strict=True):
            if format_reward(o2) != 1.0 or SC in o2:
                continue
            counts["o2_well_formed"] += 1
            if s.acc_final != 1.0:
                continue
            counts["o2_correct"] += 1
            row = question_row(examples[k], images_dir, "images")
            row["response"] = o1 + SC + o2
            f.write(json.dumps(row) + "\n")
            counts["written"] += 1
    return counts

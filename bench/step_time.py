"""Octopus vs GSPO step time, side by side in one run (the paper: 0.72x of GSPO n=16 on 8x H100).

(a) GSPO n = 16, (b) GSPO n = 8, (c) Octopus n = 8 -> 16 trained: the real engine and trainer
(train.rl_step), the same prompts, alternating runs, several repetitions, learning rate 0 so
every run sees the same policy. Needs a cold-started model (so that responses have the
format and splicing has parts): by default the demo's SFT export.

    .venv/bin/torchrun --nproc_per_node=1 bench/step_time.py [--model runs/demo/stage-sft/export] [--reps 3]

The steps run with each group packed as a token tree (packing.py, the default). After each
Octopus and GSPO n = 16 step the bench runs the update of that step's groups again under each
packing (tree, prompt, sample) and reports its update tokens (the packed rows' tokens) and
time, and the limit the step ratio can reach: from the generation share alone with the prompt
shared, and with the update cut to the tree's tokens. It also times what the old-log-prob pass
would cost if it were run: with one mini-batch per step (the demo) the update's own first
forward gives the old log-probs (train.py), so the pass is skipped. The last line is for tools
(the tree on): `octopus/gspo-n16 total=<r> generate=<r> overhead=<s> gen_share=<g>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import packing  # noqa: E402
import train  # noqa: E402
from config import preset  # noqa: E402

PHASES = ["generate", "score", "augment", "logprobs", "update", "sync"]
PACKINGS = ("tree", "prompt", "sample")


def timed_update(t, groups, mode: str) -> tuple[int, float]:
    """The update of `groups` (their old log-probs already set) with every group packed as
    `mode`: (update tokens, seconds), train.py's `pack` wrapped to count the packed rows."""
    cfg, rows = t.cfg, []
    t.cfg = cfg.replace(packing=mode)

    def pack(segments, rope_index, packing_mode=mode, **kw):
        packed = packing.pack(segments, rope_index, packing_mode, **kw)
        rows.append(packed.inputs["input_ids"].shape[1])
        return packed

    train.pack = pack
    try:
        start = time.perf_counter()
        train.update(t, groups)
        return sum(rows), time.perf_counter() - start
    finally:
        train.pack, t.cfg = packing.pack, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/demo/stage-sft/export")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/octopus-step-time")
    args = ap.parse_args()

    base = preset("demo-2", model=args.model, out_dir=args.out, resume=False, prompts_per_step=args.prompts,
                  mini_batch_prompts=args.prompts, lr=0.0, warmup_steps=0, val_data="", export=False,
                  save_every=0, dump_every=0)  # fmt: skip
    runs = {
        "gspo-n16": base.replace(n_rollouts=16, n_train=16, augment="none", reward_kind="baseline"),
        "gspo-n8": base.replace(n_rollouts=8, n_train=8, augment="none", reward_kind="baseline"),
        "octopus": base.replace(n_rollouts=8, n_train=16, augment="paper"),
    }
    t, _, _ = train.build_trainer(base)
    times: dict[str, dict[str, list[float]]] = {
        name: {p: [] for p in [*PHASES, "total"]} for name in runs
    }
    captured: list = []
    step_metrics = train.step_metrics

    def keep_groups(t, groups, stats, clock, **kw):  # the step's groups, to time a recomputed pass
        captured[:] = groups
        return step_metrics(t, groups, stats, clock, **kw)

    train.step_metrics = keep_groups
    train.rl_step(t, 0)  # warm-up outside the clock
    skipped: list[float] = []
    updates = {(name, m): [] for name in ("octopus", "gspo-n16") for m in PACKINGS}
    for rep in range(args.reps):
        for name, cfg in runs.items():  # alternating: drifts of the machine hit every run alike
            t.cfg = cfg
            row = train.rl_step(t, 1 + rep)  # the same prompts for every run of a repetition
            for p in PHASES:
                times[name][p].append(row[f"time_{p}"])
            times[name]["total"].append(sum(row[f"time_{p}"] for p in PHASES))
            if name == "octopus":
                start = time.perf_counter()
                train.logprobs(t, captured)
                skipped.append(time.perf_counter() - start)
            if name in ("octopus", "gspo-n16"):  # the step's update again, under each packing
                for m in PACKINGS[rep % 3 :] + PACKINGS[: rep % 3]:
                    updates[name, m].append(timed_update(t, captured, m))
    med = {name: {p: statistics.median(v) for p, v in ph.items()} for name, ph in times.items()}
    upd = {k: (statistics.median(n for n, _ in v), statistics.median(s for _, s in v))
           for k, v in updates.items()}  # fmt: skip

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, CPU, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; model {args.model}; {args.prompts} prompts per step; "
          f"median of {args.reps} alternating repetitions (seconds); steps packed as a tree")  # fmt: skip
    print("| phase | gspo-n16 | gspo-n8 | octopus 8->16 | octopus / gspo-n16 | octopus / gspo-n8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in [*PHASES, "total"]:
        a, b, c = med["gspo-n16"][p], med["gspo-n8"][p], med["octopus"][p]
        print(f"| {p} | {a:.2f} | {b:.2f} | {c:.2f} | {c / a:.2f} | {c / b:.2f} |")
    a, c = med["gspo-n16"], med["octopus"]
    g = a["generate"] / a["total"]
    gen_ratio = c["generate"] / a["generate"]
    overhead = (c["score"] + c["augment"]) / c["total"]
    print("| packing | octopus update tokens | octopus update (s) | gspo-n16 update tokens | "
          "gspo-n16 update (s) | octopus / gspo-n16 tokens | step ratio with it |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in PACKINGS:
        (cn, cs), (an, as_) = upd["octopus", m], upd["gspo-n16", m]
        # the steps' other phases as measured, their update timed again under this packing
        step = (c["total"] - c["update"] + cs) / (a["total"] - a["update"] + as_)
        print(f"| {m} | {cn:.0f} | {cs:.2f} | {an:.0f} | {as_:.2f} | {cn / an:.3f} | {step:.3f} |")
    u = a["update"] / a["total"]
    q = upd["octopus", "tree"][0] / upd["gspo-n16", "tree"][0]
    print(f"limit from the generation share (prompt shared): 1 - g(1 - r) = "
          f"{1 - g * (1 - gen_ratio):.2f}; with the tree's update tokens (u the update's share of "
          f"a gspo-n16 step, q = {q:.3f} octopus / gspo-n16 tree tokens): 1 - g(1 - r) - u(1 - q) = "
          f"{1 - g * (1 - gen_ratio) - u * (1 - q):.2f}")  # fmt: skip
    saved = statistics.median(skipped)
    print(f"old-log-prob pass skipped (one mini-batch per step, on-policy): {saved:.2f} s per octopus "
          f"step, {saved / (c['total'] + saved):.0%} of what the step would take with it")  # fmt: skip
    print(f"octopus/gspo-n16 total={c['total'] / a['total']:.3f} generate={gen_ratio:.3f} "
          f"overhead={overhead:.4f} gen_share={g:.3f}")  # fmt: skip
    t.engine.close()


if __name__ == "__main__":
    main()

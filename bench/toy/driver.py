"""The command line and the job driver: each job in its own process, a committed job skipped, a
rebuilt cold start checked against its committed checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from . import __doc__ as USAGE
from .arms import lr_for, rare_arm_job
from .calibration import rare_cold_job, rare_paths, rare_start_job, write_eval_sets
from .dense import dense_main
from .recipe import (
    ARMS,
    DENSE_ARMS,
    DIAGNOSTIC_ARMS,
    GRID_SEED,
    QUICK_ARMS,
    RARE_ARMS,
    RARE_SCALES,
    ROOT,
    code_commit,
    cpu_kernels,
    free_port,
    job_name,
    load_jobs,
)
from .stats import aggregate

# =============================================================================================
# The driver: jobs as subprocesses, at most --parallel at once
# =============================================================================================


def supersede_seed(out: str, seed: int, rebuilt: str) -> str:
    """A seed's jobs must all start from one cold start. When the rebuilt one differs from the
    committed one (another machine: `cpu_kernels`), every committed job of the seed moves to
    attempts/superseded-<its cold start's commit>-seed<S>/, kept as a finding, and the rebuilt
    cold start takes its place, so that the seed's start evaluations and arms run again from it.
    Returns the folder the jobs moved to."""
    jobs_dir = os.path.join(out, "jobs")
    cold = os.path.join(jobs_dir, job_name("cold", seed) + ".json")
    dest = os.path.join(out, "attempts",
                        f"superseded-{json.load(open(cold))['commit'][:10]}-seed{seed}")  # fmt: skip
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(jobs_dir)):
        path = os.path.join(jobs_dir, name)
        if name.endswith(".json") and json.load(open(path)).get("seed") == seed:
            os.replace(path, os.path.join(dest, name))
    shutil.copyfile(rebuilt, cold)
    return dest


# --------------------------------------------------------------------------- the driver


def rare_jobs(args, scale: dict, out: str, work: str, arms: list[str], seeds: list[int],
              provenance: dict) -> list[dict]:  # fmt: skip
    """The jobs still to run, in order: per seed the cold start (rebuilt, and checked against
    its committed checkpoints, when a later job of the seed needs it) and the start
    evaluations; the lr grid (seed GRID_SEED); every arm and seed at its lr. A job whose file
    is in `out/jobs` is skipped."""
    jobs = load_jobs(out)
    me = os.path.join(ROOT, "bench", "toy_replication.py")
    common = ["--regime", "rare", "--work", work, "--out", out, "--scale", args.scale_name,
              "--steps", str(scale["steps"]), "--commit", provenance["commit"]]  # fmt: skip
    if provenance["dirty"]:
        common.append("--dirty")
    if args.reuse_base:
        common.append("--reuse_base")

    def lr_of(arm: str) -> float | None:
        return lr_for(arm, jobs, scale, args.lr, args.lr_from)

    todo: list[dict] = []
    arm_runs = []  # (arm, seed, lr)
    rl_arms = [a for a in arms if ARMS[a][1]]
    if not args.lr and scale["lr_grid"]:
        arm_runs += [(a, GRID_SEED, lr) for a in rl_arms for lr in scale["lr_grid"]
                     if lr_of(a) is None and a not in DIAGNOSTIC_ARMS]  # fmt: skip
    for seed in seeds:
        arm_runs += [(a, seed, lr_of(a)) for a in rl_arms if lr_of(a) is not None]
    arm_runs = list(dict.fromkeys(arm_runs))
    needed_seeds = sorted(set(seeds) | {s for _, s, _ in arm_runs})
    for seed in needed_seeds:
        pending_arms = [(a, s, lr) for a, s, lr in arm_runs if s == seed
                        and job_name("arm", s, a, lr) not in jobs]  # fmt: skip
        start_missing = job_name("start", seed) not in jobs
        cache = os.path.exists(rare_paths(work, seed)["done"])
        name = job_name("cold", seed)
        if name not in jobs or (not cache and (pending_arms or start_missing)):
            verify = name in jobs
            todo.append({"name": name + ("-rebuild" if verify else ""), "after": [],
                         "file": os.path.join(work, "rebuilt", name + ".json") if verify
                         else os.path.join(out, "jobs", name + ".json"), "verify": verify,
                         "argv": [me, "--job", "cold", "--seed", str(seed), *common]})  # fmt: skip
        if start_missing:
            todo.append({"name": job_name("start", seed), "after": [name],
                         "file": os.path.join(out, "jobs", job_name("start", seed) + ".json"),
                         "argv": [me, "--job", "start", "--seed", str(seed), *common]})  # fmt: skip
        for a, s, lr in pending_arms:
            n = job_name("arm", s, a, lr)
            todo.append({"name": n, "after": [name], "file": os.path.join(out, "jobs", n + ".json"),
                         "argv": [me, "--job", "arm", "--arm", a, "--seed", str(s), "--lr",
                                  repr(lr), *common]})  # fmt: skip
    return todo


def run_rare_jobs(todo: list[dict], out: str, log_dir: str, parallel: int) -> list[str]:
    """Run `todo` as processes, at most `parallel` at once (a job starts once the jobs it is
    `after` finished here or were already done); a job counts as done when its file exists.
    A rebuilt cold start that differs from its committed checkpoints supersedes its seed
    (`supersede_seed`); the caller plans again once these jobs end."""
    names = {j["name"].removesuffix("-rebuild") for j in todo}
    finished: set[str] = set()
    pending, running, ran = list(todo), {}, []
    while pending or running:
        for j in list(pending):
            if len(running) >= parallel:
                break
            if all(a not in names or a in finished for a in j["after"]):
                pending.remove(j)
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                           VLLM_ENABLE_V1_MULTIPROCESSING="0", RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
                argv = [*j["argv"], "--job_file", j["file"]]
                log = open(os.path.join(log_dir, j["name"] + ".log"), "w")
                print(f"[regime] start {j['name']}", flush=True)
                proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
                running[j["name"]] = (proc, time.time(), log, j)
        time.sleep(0.5)
        for name, (proc, t0, log, j) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0 or not os.path.exists(j["file"]):
                for other, *_ in running.values():
                    other.kill()
                raise SystemExit(f"[regime] job {name} failed ({proc.returncode}): see "
                                 f"{os.path.join(log_dir, name + '.log')}")  # fmt: skip
            if j.get("verify"):
                base = name.removesuffix("-rebuild")
                committed = json.load(open(os.path.join(out, "jobs", base + ".json")))
                rebuilt = json.load(open(j["file"]))
                if committed["checkpoints"] != rebuilt["checkpoints"]:
                    dest = supersede_seed(out, rebuilt["seed"], j["file"])
                    print(f"[regime] {base}: the rebuilt checkpoints differ from the committed "
                          f"job's (committed on {committed.get('machine', 'another machine')}, "
                          f"rebuilt on {rebuilt.get('machine', '?')}): the seed's committed "
                          f"jobs moved to {dest}; it runs again from the rebuilt cold start",
                          flush=True)  # fmt: skip
                else:
                    print(f"[regime] {base}: rebuilt checkpoints match the committed job bit "
                          "for bit")  # fmt: skip
            finished.add(name.removesuffix("-rebuild"))
            ran.append(name)
            print(f"[regime] done {name} in {time.time() - t0:.0f} s", flush=True)
    return ran


def compare_jobs(out: str, reference: str) -> list[str]:
    """Each job of `out` that `reference` (the committed results) also has, compared: the
    checkpoints' sha256 of a cold start, the final test accuracies of an arm (issue: a rerun
    must reproduce its committed row within 0.03; the same commit should give them exactly)."""
    mine, theirs = load_jobs(out), load_jobs(reference)
    lines = []
    for name in sorted(set(mine) & set(theirs)):
        a, b = mine[name], theirs[name]
        head = f"{name} (here {a['commit'][:10]}, committed {b['commit'][:10]}):"
        if a["kind"] == "cold":
            same = a["checkpoints"] == b["checkpoints"]
            lines.append(f"{head} checkpoints {'identical' if same else 'DIFFER'}")
        elif a["kind"] == "arm":
            d1 = a["test"]["val_acc_o1"] - b["test"]["val_acc_o1"]
            d2 = a["test"]["val_acc_final"] - b["test"]["val_acc_final"]
            same = a["final_checkpoint"] == b["final_checkpoint"]
            lines.append(f"{head} test acc@1 {d1:+.4f}, acc@2 {d2:+.4f}, final checkpoint "
                         f"{'identical' if same else 'differs'}")  # fmt: skip
    return lines


def rare_main(args) -> None:
    scale = dict(RARE_SCALES[args.scale_name])
    if args.steps:
        scale["steps"] = args.steps
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", "regime"))
    work = os.path.abspath(args.work or os.path.join(ROOT, "runs", f"regime-{args.scale_name}"))
    provenance = ({"commit": args.commit, "dirty": args.dirty} if args.commit
                  else code_commit())  # fmt: skip
    provenance["machine"] = cpu_kernels()
    if args.job:
        job_file = args.job_file
        if args.job == "cold":
            return rare_cold_job(work, args.seed, scale, job_file, provenance, args.reuse_base)
        if args.job == "start":
            return rare_start_job(work, args.seed, scale, job_file, provenance)
        return rare_arm_job(work, args.arm, args.seed, args.lr, scale, job_file, provenance)
    arms = [a for a in (args.arms or ",".join(QUICK_ARMS if args.quick else RARE_ARMS)).split(",")
            if a]  # fmt: skip
    waiting = [a for a in arms if a in DIAGNOSTIC_ARMS and not args.lr and not args.lr_from
               and DIAGNOSTIC_ARMS[a] not in arms]  # fmt: skip
    if waiting and scale["lr_grid"]:
        print(f"[regime] {', '.join(waiting)} run at the lr the grid chose for "
              f"{', '.join(DIAGNOSTIC_ARMS[a] for a in waiting)}: found in --out's jobs, "
              "--lr_from, or --lr")  # fmt: skip
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick or args.smoke:  # one seed is a smoke (README commands run with --smoke)
        seeds = seeds[:1]
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.join(out, "jobs"), exist_ok=True)
    if not args.aggregate:
        write_eval_sets(work, scale)
    t0, ran = time.time(), 0
    while not args.aggregate:  # a second pass once the grid has chosen the learning rates
        todo = rare_jobs(args, scale, out, work, arms, seeds, provenance)
        if args.max_jobs:
            todo = todo[: args.max_jobs - ran]
        if not todo:
            break
        print(f"[regime] {len(todo)} job(s) to run: {', '.join(j['name'] for j in todo)}")
        ran += len(run_rare_jobs(todo, out, logs, args.parallel))
        if args.max_jobs and ran >= args.max_jobs:
            break
    md = aggregate(out, arms, scale, (args.lr, args.lr_from))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    reference = os.path.join(ROOT, "bench", "results", "regime")
    # the committed jobs are full scale: a --quick or --steps run shares their names, not sizes
    if os.path.abspath(reference) != out and args.scale_name == "full" and not args.steps:
        for line in compare_jobs(out, reference):
            print(f"[regime] rerun vs committed: {line}")
    print(f"[regime] results in {out}; wall-clock {time.time() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=USAGE.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=USAGE.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--regime", choices=("rare", "dense"), default="rare",
                    help="rare: the paper's regime (default); dense: the committed cold start")  # fmt: skip
    ap.add_argument("--arms", default="", help="comma-separated, from: " + ", ".join(ARMS))
    ap.add_argument(
        "--seeds", default="", help="comma-separated seeds (default rare 0-7, dense 0-2)"
    )
    ap.add_argument("--out", default="", help="results folder (default bench/results[/regime])")
    ap.add_argument(
        "--work", default="", help="cache of models and runs (default runs/toy*, runs/regime-*)"
    )
    ap.add_argument("--quick", action="store_true", help="1 seed (the first), fewer steps")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="every stage for 2 steps, tiny sizes (CI); rare: the first seed only",
    )
    ap.add_argument("--steps", type=int, default=0, help="RL steps per arm (0: the scale's)")
    ap.add_argument("--lr", type=float, default=0.0,
                    help="RL learning rate of every arm (0: rare: the lr grid's; dense: SHARED's)")  # fmt: skip
    ap.add_argument("--lr_from", default=os.path.join(ROOT, "bench", "results", "regime",
                                                      "lr_grid.json"),
                    help="rare: an arm whose grid is not in --out takes the lr chosen here")  # fmt: skip
    ap.add_argument("--parallel", type=int, default=1, help="jobs at once (one core each)")
    ap.add_argument("--max_jobs", type=int, default=0, help="rare: stop after this many jobs")
    ap.add_argument("--aggregate", action="store_true",
                    help="rare: run no job, only rewrite --out's tables and report from its job files")  # fmt: skip
    ap.add_argument("--fresh", action="store_true", help="dense: rerun the arms even if cached")
    for hidden in ("--job", "--arm", "--scale", "--commit", "--job_file"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dirty", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reuse_base", action="store_true",
                    help="rare, development only: reuse a cached base policy of the same recipe")  # fmt: skip
    args = ap.parse_args(argv)
    args.scale_name = args.scale or ("smoke" if args.smoke else "quick" if args.quick else "full")
    if args.regime == "rare":
        args.seeds = args.seeds or ",".join(str(s) for s in range(8))
        return rare_main(args)
    args.arms = args.arms or ",".join(DENSE_ARMS)
    args.seeds = args.seeds or "0,1,2"
    args.out = args.out or os.path.join(ROOT, "bench", "results")
    dense_main(args)

"""The rare regime's cold start (Sec. 4.1 in miniature) and its calibration on the dev set, and
each seed's start evaluations: the jobs `cold` and `start`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time

from .recipe import (
    BASELINE_SUFFIX,
    DEV_SEED,
    DOTS_VARIANTS,
    RARE_PROMPT,
    REGIME,
    SC,
    SFT,
    SHARED,
    TEST_SEED,
    VARIANT,
    answer_of,
    checkpoint_sha,
    image_hash,
    o1_prompts,
    preset,
    question_row,
    score,
    seed_dir,
    split_response,
    split_task,
    synthetic_answer,
    write_json,
    write_rows,
)


def _curve(out_dir: str) -> list[dict]:
    """(step, sampled accuracy, well-formed share) at each validation of a supervised stage."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    keep = ("val_acc_o1", "val_acc_final", "val_format", "val_sc_format", "val_corrects_itself")
    return [{"step": r["step"], **{k: round(r[k], 4) for k in keep if k in r}} for r in rows
            if keep[0] in r]  # fmt: skip


# The rare-correction regime's cold start (`--regime rare`, the default: the paper's regime).
#
# The dense cold start (dense.py) leaves w->c in ~30% of generated rollouts (the paper: < 1%): its
# oracle always writes the truth as o2 and only correct o2 are kept, so the cold start teaches
# o2 to count better than o1. Sec. 4.1's cold start is there to teach the *format*: the paper's
# SFT only scores 63.4 against the base policy's 62.2, and its policies correct themselves
# w->c in < 1% of rollouts. The rare cold start keeps Sec. 4.1's pipeline (o1 from the policy,
# o2 from a "stronger model" that reads o1 and the truth, SFT on o1 + SC + o2 with the vision
# tower frozen, as the release) and changes three things, each so that it teaches the format
# and not the skill:
#   - o1 is sampled at the training temperature (1.0, top-p 1.0) from the plain prompt the base
#     policy knows: SFT on a model's own samples at temperature 1 has zero expected gradient,
#     so the o1 part teaches the new prompt and nothing about counting. (The release samples o1
#     at 0.6: SFT on those sharpens the policy, a skill gain the paper's SFT only does not show.)
#   - the oracle's o2 gives the truth only with probability `q` and otherwise restates o1's
#     answer in a fresh well-formed part: a teacher whose corrections the student mostly cannot
#     absorb, as an 8B student's are (paper: w->c < 1% after the cold start);
#   - no filter on o2's correctness (a filter keeps mostly right o1: rejection sampling, a skill
#     gain); only o1 with an answer are used, since the format needs one;
#   - the base policy is a confident one with a systematic error (`base_label`: dots and
#     squares counted together on images with two or more squares), trained to its plateau
#     (sampled accuracy 0.35-0.6 and a well-formed answer >= 0.95 at temperature 1.0, as a real
#     instruct model's): fitting a policy's own samples has zero expected gradient, but its noise
#     is a random walk, and a base stopped mid-rise (designs 1-5, truth labels) lost 0.07-0.14 of
#     accuracy to it; a base at its plateau does not.
#     The stop rule fires where a noisy 128-prompt stop set first crosses the bar, often
#     mid-rise, so the base then trains `base_settle_steps` more with the lr annealed to 0.
#   - the cold start trains 1.5 epochs of its rows with the lr annealed to 0 (the exposure
#     control on the same schedule): a malformed self-correction scores 0, and SFT only's gap
#     to the base tracked the malformed share (designs 7-9). Cutting o1 out of the gradient
#     instead (design 3) let the model stop holding o1 together: acc@1 fell to 0.05.
# Each regime condition is *measured* per seed on the dev set (`calibration.json`), never set.
#
# Status: design 9 was inside the regime on seed 0 (base 0.479 / format 1.000, cold format
# 0.961, w->c 1.1%, SFT only - base -0.018) but not on seed 1 (-0.068: its base was stopped
# mid-rise); design 10, this code, anneals the base and the cold start. Every design is under
# bench/results/regime/attempts/ and in bench/README.md.


# --------------------------------------------------------------------------- the cold start


def squares_of(example: dict) -> int:
    """How many grey squares the hard task drew (each a 17 x 17 block of `square_fill`)."""
    image = next(i["image"] for i in example["messages"][0]["content"] if i["type"] == "image")
    grey = dict((c, n) for n, c in image.getcolors())
    return grey.get(DOTS_VARIANTS[VARIANT]["square_fill"], 0) // 289


def base_label(example: dict, labels: str) -> str:
    """The base policy's SFT answer: the truth ("truth"), or ("systematic") the dots and the
    squares counted together on images with two or more squares: a confident base with a
    systematic error, as a real base model's are, that plateaus near half right."""
    if labels == "systematic" and squares_of(example) >= 2:
        return str(int(example["answer"]) + squares_of(example))
    return example["answer"]


def restating_o2(o1: str, truth: str, rng: random.Random, q: float) -> str:
    """The rare regime's oracle: with probability `q` a part answering the truth, otherwise a
    fresh part restating o1's own answer (right or wrong). No model, no filter."""
    answer = answer_of(o1)
    return synthetic_answer(truth if rng.random() < q else answer)


def rare_coldstart_rows(engine, processor, examples: list[dict], *, samples: int, q: float,
                        seed: int, max_tokens: int, out: str) -> dict:  # fmt: skip
    """Mixed sampling (Sec. 4.1) for the rare regime: o1 from the base policy at temperature
    1.0 with the plain prompt it knows, o2 from `restating_o2`, every o1 with an answer kept.
    Writes `out` (data.py rows with a `response`); returns the counts."""
    import torch

    from rollout import Sampling

    torch.manual_seed(seed)
    rng = random.Random(seed)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    groups = engine.generate(o1_prompts(processor, examples, BASELINE_SUFFIX), samples, sampling)
    counts = dict(inputs=len(examples), o1_samples=0, o1_with_answer=0, o1_correct=0,
                  o2_correct=0, rows_wc=0, rows_cw=0, written=0)  # fmt: skip
    folder = os.path.join(os.path.dirname(out), "images")
    os.makedirs(folder, exist_ok=True)
    with open(out + ".tmp", "w") as f:
        for e, group in zip(examples, groups, strict=True):
            for g in group:
                counts["o1_samples"] += 1
                o1, _ = split_response(g.text)
                if not answer_of(o1):
                    continue
                counts["o1_with_answer"] += 1
                o2 = restating_o2(o1, e["answer"], rng, q)
                right1 = score(o1, e["answer"], kind="baseline").acc_final == 1.0
                right2 = score(o2, e["answer"], kind="baseline").acc_final == 1.0
                counts["o1_correct"] += right1
                counts["o2_correct"] += right2
                counts["rows_wc"] += right2 and not right1
                counts["rows_cw"] += right1 and not right2
                row = question_row(e, folder, "images")
                row["response"] = o1 + SC + o2
                f.write(json.dumps(row) + "\n")
                counts["written"] += 1
    os.replace(out + ".tmp", out)
    return counts


PLAIN_STAGES = ("base-format", "base-rise", "base")  # the base policy's SFT stages (out_dirs)


def _stop_on_plain_format(train_module) -> None:
    """train.run_stage stops SFT on `val_sc_format` (o1 + SC + o2 well-formed), which a
    plain-answer policy never has: for the base policy's stage the toy reads the plain answer's
    `val_format` there (kept as `val_sc_format_raw`). A library option naming the stop metric
    would be cleaner."""
    validate = train_module.validate

    def plain(t, step):
        row = validate(t, step)
        if t.cfg.stage == "sft" and os.path.basename(t.cfg.out_dir) in PLAIN_STAGES and row:
            row = dict(row, val_sc_format_raw=row["val_sc_format"],
                       val_sc_format=row["val_format"])  # fmt: skip
        return row

    train_module.validate = plain


def evaluate(engine, model: str, data: str, *, suffix: str, temperature: float, top_p: float,
             n: int, prompts: int, seed: int, out_dir: str) -> dict:  # fmt: skip
    """Sampled accuracy and format of `model` on `data` (train.validate, `n` samples per
    prompt, the first `prompts` prompts or all with 0)."""
    import train

    ev = preset("gspo-n8", **{**SHARED, "val_temperature": temperature, "val_top_p": top_p},
                model=model, train_data=data, val_data=data, prompt_suffix=suffix, val_n=n,
                val_max_prompts=prompts, out_dir=out_dir, export=False, seed=seed)  # fmt: skip
    t, _, _ = train.build_trainer(ev, engine)
    row = train.validate(t, -1)
    del t
    return {k: round(v, 6) for k, v in row.items()}


def regime_check(c: dict) -> list[str]:
    """The conditions of the regime that seed's calibration `c` misses (empty: accepted)."""
    lo, hi = REGIME["base_acc_t1"]
    miss = []
    if not lo <= c["base_acc_t1"] <= hi:
        miss.append(f"base_acc_t1 {c['base_acc_t1']:.3f} outside [{lo}, {hi}]")
    for key, bound, sign in (("base_format_t1", REGIME["base_format_t1"], ">="),
                             ("cold_format_t1", REGIME["cold_format_t1"], ">="),
                             ("cold_wc_generated", REGIME["cold_wc_generated"], "<=")):  # fmt: skip
        ok = c[key] >= bound if sign == ">=" else c[key] <= bound
        if not ok:
            miss.append(f"{key} {c[key]:.4f} not {sign} {bound}")
    if abs(c["sft_only_minus_base"]) > REGIME["sft_only_minus_base"]:
        miss.append(f"|sft_only_minus_base| {abs(c['sft_only_minus_base']):.4f} > "
                    f"{REGIME['sft_only_minus_base']}")  # fmt: skip
    return miss


def rare_paths(work: str, seed: int) -> dict[str, str]:
    d = seed_dir(work, seed)
    return {"base": os.path.join(d, "base", "export"), "cold": os.path.join(d, "cold", "export"),
            "exposed": os.path.join(d, "exposed", "export"),
            "done": os.path.join(d, "checkpoints.done")}  # fmt: skip


def data_paths(work: str) -> dict[str, str]:
    return {s: os.path.join(work, "data", s, f"{s}.jsonl") for s in ("dev", "test")}


def write_eval_sets(work: str, scale: dict) -> dict[str, str]:
    """The dev set (calibration, learning rates, curves) and the fixed test set, once."""
    paths = data_paths(work)
    held = os.path.join(work, "data", "heldout_hashes.json")
    if not os.path.exists(held):
        dev, test = (
            split_task(scale["dev"], DEV_SEED, "dev"),
            split_task(scale["test"], TEST_SEED, "test"),
        )
        write_rows(dev, paths["dev"])
        write_rows(test, paths["test"])
        write_json(
            {"dev": [image_hash(e) for e in dev], "test": [image_hash(e) for e in test]}, held
        )
    return paths


def rare_cold_job(
    work: str, seed: int, scale: dict, out: str, provenance: dict, reuse_base: bool = False
) -> None:
    """Per seed: tiny model, base policy, the rare cold start, the exposure-matched plain SFT,
    and the calibration on the dev set (temperature 1.0, every dev prompt x `calib_n`).
    Writes `out` (jobs/cold-seed<S>.json) with the checkpoints' sha256, so a rebuilt cache can be
    checked bit for bit against the committed job."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    import train
    from rollout import VLLMEngine
    from tiny import build_tiny

    t0 = time.time()
    _stop_on_plain_format(train)
    d, paths, sets = seed_dir(work, seed), rare_paths(work, seed), data_paths(work)
    shutil.rmtree(d, ignore_errors=True)  # a job runs from nothing: no cache of older code
    sft = {**SFT, **scale.get("sft", {})}
    tiny = build_tiny(os.path.join(d, "tiny-init"), seed=seed)
    base_rows = split_task(scale["base_rows"], seed * 10 + 1, "train")
    labels = scale.get("base_labels", "truth")
    base_sft = write_rows(base_rows, os.path.join(d, "base-sft", "rows.jsonl"),
                          [synthetic_answer(base_label(e, labels)) for e in base_rows])  # fmt: skip
    pool = split_task(scale["rl_pool"], seed * 10 + 2, "train")
    write_rows(pool, os.path.join(d, "rl", "rows.jsonl"))
    cold_inputs = split_task(scale["cold_inputs"], seed * 10 + 3, "train")
    format_rows = split_task(scale["format_rows"], seed * 10 + 4, "train")
    guess = random.Random(seed * 10 + 4)  # an answer that says nothing about the image
    format_sft = write_rows(format_rows, os.path.join(d, "format-sft", "rows.jsonl"),
                            [synthetic_answer(str(guess.randint(1, 9))) for _ in format_rows])  # fmt: skip
    # disjointness, checked on the very rows this seed trains on
    held = json.load(open(os.path.join(work, "data", "heldout_hashes.json")))
    held_out = set(held["dev"]) | set(held["test"])
    shared = held_out & {image_hash(e) for e in base_rows + pool + cold_inputs + format_rows}
    if shared:
        raise SystemExit(f"seed {seed}: {len(shared)} training images are in the dev/test sets")
    job: dict = {"job": f"cold-seed{seed}", "kind": "cold", "seed": seed, **provenance,
                 "scale": scale, "sft": sft, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                 time.gmtime()), "load_avg_start": os.getloadavg()[0]}  # fmt: skip

    # 1. the base policy, as a real instruct model: a well-formed answer (>= 0.95 at T 1.0)
    #    and a mediocre skill. Trained on the truth alone, format and accuracy rise together
    #    (seed 0: format 0.94 at T 1.0 when accuracy was already 0.57, design v1), so first
    #    the format on answers drawn at random (chance accuracy), stopped once the well-formed
    #    share at T 1.0 reaches `base_stop_format`; then the truth, stopped once sampled
    #    accuracy reaches `base_stop` with the format still there
    fmt_cfg = preset("sft", **sft, model=tiny, sft_data=format_sft, val_data=sets["dev"],
                     epochs=1, out_dir=os.path.join(d, "base-format"), prompt_suffix="baseline",
                     lr_schedule="constant", warmup_ratio=0.0, max_steps=scale["format_max_steps"],
                     val_every=scale["base_val_every"], val_temperature=1.0, val_top_p=1.0,
                     val_max_prompts=scale["stop_prompts"],
                     sft_stop_format=scale.get("format_stop", scale["base_stop_format"]),
                     seed=seed)  # fmt: skip
    cfg = preset("sft", **sft, model=os.path.join(fmt_cfg.out_dir, "export"), sft_data=base_sft,
                 val_data=sets["dev"], epochs=1,
                 out_dir=os.path.join(d, "base-rise" if scale.get("base_settle_steps") else "base"),
                 prompt_suffix="baseline", lr_schedule="constant",
                 warmup_ratio=0.0, max_steps=scale["base_max_steps"],
                 val_every=scale["base_val_every"], val_temperature=1.0, val_top_p=1.0,
                 val_max_prompts=scale["stop_prompts"], sft_stop_acc=scale["base_stop"],
                 sft_stop_format=scale["base_stop_format"], seed=seed)  # fmt: skip
    # then, once the stop rule fired, `base_settle_steps` more on the same rows with the lr
    # annealed to 0 (cosine): the stop rule fires where the noisy stop set first crosses the
    # bar, often mid-rise (design 9, seed 1: 0.34 -> 0.45 in the last 40 steps, and SFT on its
    # own answers then cost it 0.06); annealed, the base sits at its plateau's minimum
    settle_cfg = None
    if scale.get("base_settle_steps"):
        settle_cfg = cfg.replace(out_dir=os.path.join(d, "base"),
                                 max_steps=scale["base_settle_steps"], lr_schedule="cosine",
                                 val_every=0, sft_stop_acc=0.0, sft_stop_format=0.0,
                                 seed=seed + 7)  # fmt: skip
    base_stages = [c for c in (fmt_cfg, cfg, settle_cfg) if c is not None]
    # --reuse_base (development only): a base policy of the very same recipe, trained by an
    # earlier job, is copied instead of retrained; the job says so and from which commit (the
    # checkpoint's sha256 lets a rebuild from scratch confirm it)
    recipe = hashlib.sha256(
        json.dumps(
            [dataclasses.asdict(c.replace(out_dir="")) for c in base_stages]
            + [seed, scale["base_rows"], scale["format_rows"], scale.get("base_labels", "truth")],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    cache = os.path.join(work, "base-cache", f"seed{seed}-{recipe[:16]}")
    if reuse_base and os.path.exists(os.path.join(cache, "commit.json")):
        for c in base_stages:
            shutil.copytree(os.path.join(cache, os.path.basename(c.out_dir)), c.out_dir)
        base = os.path.join(base_stages[-1].out_dir, "export")
        job["base_reused_from"] = json.load(open(os.path.join(cache, "commit.json")))
        engine = VLLMEngine(base, max_model_len=cfg.max_prompt_len + cfg.max_response_len,
                            seed=seed, kv_cache_gb=cfg.kv_cache_gb, min_pixels=cfg.min_pixels,
                            max_pixels=cfg.max_pixels)  # fmt: skip
    else:
        _, engine = train.run_stage(fmt_cfg)
        base, engine = train.run_stage(cfg, engine)
        if settle_cfg is not None:
            base, engine = train.run_stage(settle_cfg.replace(model=base), engine)
        engine.wake()  # the engine last synced at the last validation: give it the export
        engine.sync_weights(load_file(os.path.join(base, "model.safetensors")).items())
        shutil.rmtree(cache, ignore_errors=True)
        for c in base_stages:
            shutil.copytree(c.out_dir, os.path.join(cache, os.path.basename(c.out_dir)))
        write_json(provenance, os.path.join(cache, "commit.json"))
    job["format_curve"] = _curve(fmt_cfg.out_dir)
    job["format_steps"] = _last_step(fmt_cfg.out_dir)
    job["base_curve"] = _curve(cfg.out_dir)
    job["base_steps"] = _last_step(cfg.out_dir)
    job["base_settle_steps"] = _last_step(settle_cfg.out_dir) if settle_cfg else 0

    # 2. the rare cold start: rows, then SFT (vision frozen, `cold_lr`) until the format holds
    #    at T 1.0
    processor = AutoProcessor.from_pretrained(base)
    processor.image_processor.size = dict(engine.image_size)
    rows = os.path.join(d, "cold-data", "rows.jsonl")
    os.makedirs(os.path.dirname(rows), exist_ok=True)
    job["coldstart_counts"] = rare_coldstart_rows(
        engine,
        processor,
        cold_inputs,
        samples=scale["cold_samples"],
        q=scale["q"],
        seed=seed,
        max_tokens=SFT["max_response_len"],
        out=rows,
    )
    written = job["coldstart_counts"]["written"]
    print(
        f"[regime] seed {seed} cold-start rows: {json.dumps(job['coldstart_counts'])}", flush=True
    )
    if not written:
        raise SystemExit(f"seed {seed}: no o1 with an answer; the base policy has no format")
    steps = max(1, math.ceil(scale["cold_epochs"] * written / sft["sft_batch"]))
    cold_sft = {**sft, "lr": scale.get("cold_lr", sft["lr"])}
    schedule = scale.get("cold_schedule", "constant")  # the exposure control's too
    cfg = preset("sft", **cold_sft, model=base, sft_data=rows, val_data=sets["dev"], epochs=1,
                 out_dir=os.path.join(d, "cold"), prompt_suffix=RARE_PROMPT, lr_schedule=schedule,
                 warmup_ratio=0.0, max_steps=steps, val_every=scale["cold_val_every"],
                 val_temperature=1.0, val_top_p=1.0, val_max_prompts=scale["stop_prompts"],
                 sft_stop_format=scale["cold_stop"], freeze_vision=True, seed=seed)  # fmt: skip
    cold, engine = train.run_stage(cfg, engine)
    job["cold_curve"] = _curve(cfg.out_dir)
    job["cold_steps"] = _last_step(cfg.out_dir)

    # 3. the exposure-matched control's start: the base policy given as many plain-answer SFT
    #    steps (same batch, lr, frozen vision) as the cold start took, on the cold start's own
    #    rows with its o2 as the answer: the same labels without the self-correction format.
    #    (Truth labels instead, design v1, made a near-perfect counter: dev acc 0.998 at T 1.0
    #    on seed 0, since the cold start's rows hold the truth only where o1 or the oracle had
    #    it.)
    exposure_sft = os.path.join(d, "cold-data", "exposure.jsonl")
    with open(rows) as f, open(exposure_sft, "w") as g:
        for line in f:
            row = json.loads(line)
            g.write(json.dumps(dict(row, response=split_response(row["response"])[1])) + "\n")
    cfg = preset("sft", **cold_sft, model=base, sft_data=exposure_sft, val_data="", epochs=1,
                 out_dir=os.path.join(d, "exposed"), prompt_suffix="baseline",
                 lr_schedule=schedule, warmup_ratio=0.0, max_steps=job["cold_steps"],
                 val_every=0, freeze_vision=True, seed=seed)  # fmt: skip
    exposed, engine = train.run_stage(cfg, engine)

    # 4. the calibration: every dev prompt x calib_n samples at the training temperature
    calib = {}
    for name, model, suffix in (("base", base, "baseline"), ("cold", cold, RARE_PROMPT),
                                ("exposed", exposed, "baseline")):  # fmt: skip
        n = scale["calib_n"] if name != "exposed" else 1  # exposed: information only
        calib[name] = evaluate(engine, model, sets["dev"], suffix=suffix, temperature=1.0,
                               top_p=1.0, n=n, prompts=0, seed=seed,
                               out_dir=os.path.join(d, f"calib-{name}"))  # fmt: skip
    engine.close()
    c = {"base_acc_t1": calib["base"]["val_acc_final"],
         "base_format_t1": calib["base"]["val_format"],
         "cold_format_t1": calib["cold"]["val_sc_format"],
         "cold_wc_generated": calib["cold"]["val_wc"],
         "cold_cw_generated": calib["cold"]["val_cw"],
         "cold_acc1_t1": calib["cold"]["val_acc_o1"],
         "cold_acc2_t1": calib["cold"]["val_acc_final"],
         "sft_only_minus_base": calib["cold"]["val_acc_final"] - calib["base"]["val_acc_final"],
         "exposed_acc_t1": calib["exposed"]["val_acc_final"],
         "samples": scale["dev"] * scale["calib_n"]}  # fmt: skip
    c = {k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()}
    misses = regime_check(c)
    job.update(calibration=c, calibration_detail=calib, regime_misses=misses,
               accepted=not misses, checkpoints={n: checkpoint_sha(p) for n, p in
                                                 (("base", base), ("cold", cold),
                                                  ("exposed", exposed))},
               seconds=round(time.time() - t0, 1), load_avg_end=os.getloadavg()[0])  # fmt: skip
    open(paths["done"], "w").write(json.dumps(job["checkpoints"]) + "\n")
    write_json(job, out)
    print(f"[regime] seed {seed} calibration {json.dumps(c)} accepted={not misses} {misses}")


def _last_step(out_dir: str) -> int:
    lines = open(os.path.join(out_dir, "metrics.jsonl")).readlines()
    return json.loads(lines[-1])["step"] if lines else 0


# --------------------------------------------------------------------------- evaluations


def rare_start_job(work: str, seed: int, scale: dict, out: str, provenance: dict) -> None:
    """Each starting checkpoint of the seed (base, cold, exposed) on the test set (T 0.6,
    `test_n` samples per image) and on the dev curve's prompts (T 0.6): every arm's step 0."""
    from rollout import VLLMEngine

    t0 = time.time()
    paths, sets = rare_paths(work, seed), data_paths(work)
    engine = VLLMEngine(paths["base"], max_model_len=SHARED["max_prompt_len"] +
                        SHARED["max_response_len"], seed=seed, kv_cache_gb=SHARED["kv_cache_gb"],
                        min_pixels=SHARED["min_pixels"], max_pixels=SHARED["max_pixels"])  # fmt: skip
    job: dict = {"job": f"start-seed{seed}", "kind": "start", "seed": seed, **provenance,
                 "load_avg_start": os.getloadavg()[0], "start": {}}  # fmt: skip
    for name, suffix in (("base", "baseline"), ("cold", RARE_PROMPT), ("exposed", "baseline")):
        d = os.path.join(seed_dir(work, seed), f"start-{name}")
        job["start"][name] = {
            "checkpoint": checkpoint_sha(paths[name]),
            "test": evaluate(engine, paths[name], sets["test"], suffix=suffix, temperature=0.6,
                             top_p=0.95, n=scale["test_n"], prompts=0, seed=seed, out_dir=d),
            "dev": evaluate(engine, paths[name], sets["dev"], suffix=suffix, temperature=0.6,
                            top_p=0.95, n=1, prompts=scale["dev_curve"], seed=seed, out_dir=d),
        }  # fmt: skip
    engine.close()
    job.update(seconds=round(time.time() - t0, 1), load_avg_end=os.getloadavg()[0])
    write_json(job, out)

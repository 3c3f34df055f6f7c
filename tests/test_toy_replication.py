"""bench/toy_replication.py (the package bench/toy/): the hard dot task, the oracles of both cold starts, the arms'
configs, the disjoint splits, the statistics of the claims, the lr rule, the tables; and one
smoke run of every stage of the rare regime (2 steps) that CI runs."""

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import toy_replication as toy  # noqa: E402
from toy import arms as toy_arms  # noqa: E402
from toy import recipe as toy_recipe  # noqa: E402

from coldstart import strong_messages  # noqa: E402
from data import DOTS_VARIANTS, dots_image, synthetic_answer, synthetic_task  # noqa: E402
from reward import score  # noqa: E402

# --------------------------------------------------------------------------- the hard task


def _blobs(image, colour) -> list[tuple[int, int]]:
    """(pixel count, bounding-box area) of each 4-connected blob of exactly `colour`."""
    px, (w, h) = image.load(), image.size
    seen, out = set(), []
    for x in range(w):
        for y in range(h):
            if px[x, y] != colour or (x, y) in seen:
                continue
            stack, pixels = [(x, y)], []
            while stack:
                a, b = stack.pop()
                if (a, b) in seen or not (0 <= a < w and 0 <= b < h) or px[a, b] != colour:
                    continue
                seen.add((a, b))
                pixels.append((a, b))
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
            xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
            out.append((len(pixels), (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)))
    return out


def test_hard_variant_answers_count_the_dots_and_not_the_squares():
    examples = synthetic_task(60, seed=7, variant="hard")
    again = synthetic_task(60, seed=7, variant="hard")
    assert [e["answer"] for e in examples] == [e["answer"] for e in again]  # deterministic
    answers = {int(e["answer"]) for e in examples}
    assert answers <= set(range(1, 10)) and len(answers) >= 7
    grey = DOTS_VARIANTS["hard"]["square_fill"]
    square_counts = set()
    for e in examples:
        image, text = e["messages"][0]["content"]
        assert image["image"].size == (128, 128) and "round dots" in text["text"]
        dots, squares = _blobs(image["image"], (0, 0, 0)), _blobs(image["image"], grey)
        assert len(dots) == int(e["answer"])
        assert all(n < area for n, area in dots)  # round: the corners of the box are white
        assert all(n == area for n, area in squares)  # a filled square
        square_counts.add(len(squares))
    assert square_counts == {0, 1, 2, 3}


def test_easy_variant_is_the_default_and_draws_no_squares():
    assert [e["answer"] for e in synthetic_task(20, seed=3)] == [
        e["answer"] for e in synthetic_task(20, seed=3, variant="easy")
    ]
    image = synthetic_task(1, seed=3)[0]["messages"][0]["content"][0]["image"]
    assert {c for _, c in image.getcolors()} == {(0, 0, 0), (255, 255, 255)}


def test_dots_image_refuses_more_shapes_than_cells():
    with pytest.raises(ValueError, match="do not fit 16 cells"):
        dots_image(9, random.Random(0), 128, 32, squares=8)
    with pytest.raises(ValueError, match="unknown dots variant"):
        synthetic_task(1, variant="impossible")


# --------------------------------------------------------------------------- the oracle


def _prompt(messages) -> dict:
    text = "".join(i["text"] for i in messages[0]["content"] if i["type"] == "text")
    return {"prompt": f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", "images": []}


def test_oracle_answers_the_truth_that_the_coldstart_prompt_gives_it():
    example = synthetic_task(1, seed=5, suffix="", variant="hard")[0]
    wrong_o1 = "<think>\nI count the dots: 1.\n</think>\n\n\\boxed{1}"
    (group,) = toy.Oracle().generate([_prompt(strong_messages(example, wrong_o1))], 2, None)
    assert len(group) == 2
    for g in group:
        s = score(g.text, example["answer"], kind="baseline")
        assert s.acc_final == 1.0 and s.format == 1.0 and not s.has_correction
    # a prompt without the ground truth gets no answer (coldstart.build then drops it)
    (group,) = toy.Oracle().generate([{"prompt": "How many dots?", "images": []}], 1, None)
    assert score(group[0].text, example["answer"], kind="baseline").acc_final == 0.0


# --------------------------------------------------------------------------- the arms


def test_arm_stages_split_the_budget_exactly():
    for steps in range(1, 60):
        for arm in toy.ARMS:
            stages = toy.arm_stages(arm, steps)
            assert sum(n for _, n, _ in stages) == (steps if stages else 0)
    assert [n for _, n, _ in toy.arm_stages("octopus", 100)] == [50, 50]
    assert [n for _, n, _ in toy.arm_stages("octopus", 7)] == [4, 3]


def _diff(a, b) -> set[str]:
    ignore = {"out_dir", "model", "seed", "max_steps"}  # set per stage, checked apart
    return {k for k in vars(a) if k not in ignore and getattr(a, k) != getattr(b, k)}


def test_each_arm_differs_from_octopus_only_in_what_defines_it():
    scale = dict(toy.SCALES["full"])
    cfg = {arm: toy.arm_configs(arm, 0, scale, "/w") for arm in toy.DENSE_ARMS}
    stage1, stage2 = cfg["octopus"]
    assert (stage1.stage, stage2.stage, stage1.kl_coef, stage2.kl_coef) == ("1", "2", 0.01, 0.0)
    assert cfg["octopus"][0].model == "/w/seed0/cold/export"
    assert cfg["gspo-n16"][0].model == "/w/seed0/base/export"
    assert cfg["sft-only"] == []
    assert _diff(cfg["gspo-n8"][0], stage2) == {
        "reward_kind",
        "prompt_suffix",
        "augment",
        "n_train",
    }
    assert _diff(cfg["gspo-n16"][0], stage2) == {"reward_kind", "prompt_suffix", "augment",
                                                 "n_rollouts"}  # fmt: skip
    for stages in cfg.values():  # the same RL step budget for every arm
        assert sum(c.max_steps for c in stages) == (100 if stages else 0)
    for arm, changed in (("no-augment", {"augment", "n_train"}), ("random-augment", {"augment"}),
                         ("released-augment", {"augment"})):  # fmt: skip
        assert [_diff(c, o) for c, o in zip(cfg[arm], cfg["octopus"], strict=True)] == [changed] * 2
    assert _diff(cfg["no-stage1"][0], stage2) == set()  # only Stage I is missing
    # the shared scale reaches every stage; the seeds of a later stage draw other prompts
    for arm, stages in cfg.items():
        for k, c in enumerate(stages):
            assert (c.prompts_per_step, c.lr, c.max_response_len, c.val_every) == (8, 3e-5, 96, 10)
            assert c.seed == 1000 * k and c.out_dir.endswith(f"{arm}/stage{k + 1}")


# --------------------------------------------------------------------------- the tables


def _row(arm, seed, step, acc1, acc2, seconds=0.0, **kw):
    return dict(arm=arm, seed=seed, step=step, stage="2", seconds=seconds, **{
        "val_acc@1": acc1, "val_acc@2": acc2}, val_wc=0.1, val_cw=0.0, val_corrects_itself=1.0,
        val_format=1.0, gen_wc_share=0.1, train_wc_share=0.3, **kw)  # fmt: skip


def test_tables_give_paired_differences_over_seeds():
    rows = [
        _row("octopus", 0, 0, 0.3, 0.4), _row("octopus", 0, 10, 0.5, 0.6, seconds=30.0),
        _row("octopus", 1, 0, 0.3, 0.4), _row("octopus", 1, 10, 0.6, 0.7, seconds=40.0),
        _row("gspo-n16", 0, 0, 0.3, 0.3), _row("gspo-n16", 0, 10, 0.5, 0.5, seconds=50.0),
        _row("gspo-n16", 1, 0, 0.3, 0.3), _row("gspo-n16", 1, 10, 0.5, 0.5, seconds=50.0),
    ]  # fmt: skip
    md = toy.tables(rows, [0, 1])
    line = next(x for x in md.splitlines() if x.startswith("| Octopus beats GSPO n=16"))
    assert "| 0.150 ± 0.071 | 2/2 |" in line  # differences 0.1 and 0.2
    octo = next(x for x in md.splitlines() if x.startswith("| octopus |"))
    assert "| 0.550 ± 0.071 | 0.650 ± 0.071 | 0.100 ± 0.000 |" in octo
    assert "| 3.50 ± 0.71 |" in octo and "| 71.7 |" in octo  # s/step 3.0 and 4.0; the paper
    ratio = next(x for x in md.splitlines() if x.startswith("| Octopus step time"))
    assert "| 0.70 ± 0.14 | 2/2 faster |" in ratio  # 3/5 and 4/5


# --------------------------------------------------------------------------- the rare regime


def test_rare_controls_differ_from_their_reference_only_in_what_defines_them():
    scale = dict(toy.RARE_SCALES["full"])
    cfg = {a: toy.rare_arm_configs(a, 3, scale, "/w", 3e-4) for a in toy.ARMS if toy.ARMS[a][1]}
    octopus = cfg["octopus"]
    # 16 generated and the 16 originals trained, no splicing, in both stages
    assert [_diff(c, o) for c, o in zip(cfg["no-splice-n16"], octopus, strict=True)] == [
        {"augment", "n_rollouts"}
    ] * 2
    assert [(c.n_rollouts, c.n_train, c.augment) for c in cfg["no-splice-n16"]] == [
        (16, 16, "none")
    ] * 2
    # the exposure-matched GSPO is GSPO n = 16 from another checkpoint
    (exposed,), (gspo,) = cfg["gspo-n16-exposed"], cfg["gspo-n16"]
    assert _diff(exposed, gspo) == set()
    assert (exposed.model, gspo.model) == ("/w/seed3/exposed/export", "/w/seed3/base/export")
    for arm, stages in cfg.items():
        assert sum(c.max_steps for c in stages) == 150
        for k, c in enumerate(stages):
            assert (c.lr, c.val_data, c.val_max_prompts, c.val_every) == (
                3e-4, "/w/data/dev/dev.jsonl", 256, 10)  # fmt: skip
            assert (
                c.seed == 3 + 1000 * k and c.out_dir == f"/w/seed3/arms/{arm}-lr0.0003/stage{k + 1}"
            )
    assert [c.max_steps for c in octopus] == [75, 75]


def test_splits_are_disjoint_by_pixels_and_deterministic():
    test = toy.split_task(64, toy.TEST_SEED, "test")
    dev = toy.split_task(64, toy.DEV_SEED, "dev")
    train = [e for s in (1, 2, 11) for e in toy.split_task(300, s, "train")]
    hashes = {name: [toy.image_hash(e) for e in rows] for name, rows in
              (("test", test), ("dev", dev), ("train", train))}  # fmt: skip
    for name, hs in hashes.items():
        assert {toy.split_of(h) for h in hs} == {name}
    assert len(set(hashes["test"])) == 64 and len(set(hashes["dev"])) == 64
    assert not set(hashes["test"]) & set(hashes["train"])
    assert not set(hashes["dev"]) & set(hashes["train"])
    assert not set(hashes["test"]) & set(hashes["dev"])
    # the same rows however many are asked for (a prefix), so the sets never move
    assert [e["id"] for e in toy.split_task(20, toy.TEST_SEED, "test")] == [
        e["id"] for e in test[:20]
    ]
    # the split really filters: test images are about 1/16 of what is drawn
    drawn = toy.task(1600, toy.TEST_SEED)
    share = sum(toy.split_of(toy.image_hash(e)) == "test" for e in drawn) / 1600
    assert 0.04 < share < 0.085


def test_restating_oracle_corrects_with_probability_q_and_otherwise_restates_o1():
    wrong_o1 = "<think>\nI count the dots: 4.\n</think>\n\n\\boxed{4}"
    rng = random.Random(0)
    assert {toy.restating_o2(wrong_o1, "5", rng, 0.0) for _ in range(50)} == {
        "<think>\nI count the dots: 4.\n</think>\n\n\\boxed{4}"
    }
    assert {score(toy.restating_o2(wrong_o1, "5", rng, 1.0), "5").acc_final for _ in range(50)} == {
        1.0
    }
    draws = [toy.restating_o2(wrong_o1, "5", random.Random(k), 0.3) for k in range(2000)]
    share = sum(score(d, "5").acc_final for d in draws) / 2000
    assert abs(share - 0.3) < 0.04  # 3.9 sd of a binomial share at n = 2000
    assert all(score(d, "5", kind="baseline").format == 1.0 and toy.SC not in d for d in draws)


class _FixedEngine:
    """An engine that answers every prompt with the same texts."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n, sampling, prefixes=None):
        from rollout import Rollout

        assert (sampling.temperature, sampling.top_p, n) == (1.0, 1.0, len(self.texts))
        assert all(p["prompt"].rstrip().endswith("assistant") for p in prompts)
        return [[Rollout([], [], t, "stop") for t in self.texts] for _ in prompts]


def test_rare_coldstart_keeps_every_o1_with_an_answer_and_filters_no_o2(tmp_path, processor):
    examples = synthetic_task(6, seed=9, suffix="", variant="hard")
    wrong = "<think>\nI count the dots: 0.\n</think>\n\n\\boxed{0}"  # never right: answers >= 1
    texts = [wrong, "<think>\nno box\n</think>", "<think>\nx\n</think>\n\n\\boxed{7}"]
    out = str(tmp_path / "rows.jsonl")
    counts = toy.rare_coldstart_rows(_FixedEngine(texts), processor, examples, samples=3, q=0.0,
                                     seed=1, max_tokens=32, out=out)  # fmt: skip
    sevens = sum(e["answer"] == "7" for e in examples)
    assert counts == {"inputs": 6, "o1_samples": 18, "o1_with_answer": 12, "o1_correct": sevens,
                      "o2_correct": sevens, "rows_wc": 0, "rows_cw": 0, "written": 12}  # fmt: skip
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 12  # the wrong o2 (a restated wrong o1) are kept: no correctness filter
    for row in rows:
        o1, o2 = row["response"].split(toy.SC)
        assert o1 in (texts[0], texts[2])
        assert o2 == synthetic_answer(o1[-2])  # q = 0: a fresh part restating o1's answer
        assert os.path.exists(tmp_path / row["images"][0])


def test_regime_check_names_every_condition_missed():
    ok = dict(base_acc_t1=0.35, base_format_t1=0.95, cold_format_t1=0.9, cold_wc_generated=0.02,
              sft_only_minus_base=-0.02)  # fmt: skip
    assert toy.regime_check(ok) == []
    bad = dict(base_acc_t1=0.61, base_format_t1=0.949, cold_format_t1=0.899,
               cold_wc_generated=0.0201, sft_only_minus_base=0.021)  # fmt: skip
    misses = toy.regime_check(bad)
    assert len(misses) == 5
    assert [m.split()[0].lstrip("|") for m in misses] == [
        "base_acc_t1", "base_format_t1", "cold_format_t1", "cold_wc_generated",
        "sft_only_minus_base|"]  # fmt: skip


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """Student t CDF by Simpson's rule on the density (an independent reference)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / steps
    f = [c * (1 + (k * h) ** 2 / df) ** (-(df + 1) / 2) for k in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_quantile_tables_match_the_t_distribution():
    for df in range(1, 31):
        assert abs(_t_cdf(toy.T975[df - 1], df) - 0.975) < 2e-4, df
        assert abs(_t_cdf(toy.T80[df - 1], df) - 0.80) < 2e-4, df
    assert toy.t_quantile(toy.T975, 200) == 1.960


def test_paired_stats_by_hand():
    st = toy.paired_stats([0.1, 0.2])  # mean 0.15, sd 0.0707, t(0.975, 1) = 12.706
    assert st["n_seeds"] == 2 and st["seeds_a_gt_b"] == 2
    assert math.isclose(st["mean_diff"], 0.15)
    assert math.isclose(st["ci_low"], 0.15 - 12.706 * 0.05, rel_tol=1e-9)  # sd / sqrt(2) = 0.05
    assert math.isclose(st["ci_high"], 0.15 + 12.706 * 0.05, rel_tol=1e-9)
    assert math.isclose(st["detectable_diff"], (12.706 + 1.376) * 0.05, rel_tol=1e-9)
    one = toy.paired_stats([-0.1])
    assert one["seeds_a_gt_b"] == 0 and math.isnan(one["ci_low"])


def test_claims_say_reproduced_only_when_the_t_interval_and_the_sign_flip_test_agree():
    def fin(acc2s, acc1s=None):
        return {s: {"acc2": a, "acc1": (acc1s or acc2s)[s]} for s, a in enumerate(acc2s)}

    finals = {"octopus": fin([0.60, 0.62, 0.61, 0.63, 0.60, 0.62],
                             [0.50, 0.52, 0.55, 0.50, 0.50, 0.52]),
              "random-augment": fin([0.50, 0.51, 0.52, 0.50, 0.50, 0.51]),  # octopus +0.1, tight
              "no-augment": fin([0.55, 0.48, 0.70, 0.52, 0.45, 0.56]),  # random - none spans 0
              "gspo-n16": fin([0.70, 0.72, 0.71, 0.73, 0.70, 0.72]),
              "gspo-n8": fin([0.70, 0.72, 0.7105, 0.73, 0.70, 0.72])}  # fmt: skip
    rows = {c["claim"]: c for c in toy.claims_table(finals)}
    sel = rows["paper selection > random splicing"]
    assert sel["verdict"] == "reproduced (A > B)" and sel["seeds_a_gt_b"] == 6
    assert math.isclose(sel["perm_p"], 2 / 64)  # all six positive: 2 of the 64 sign patterns
    assert rows["random splicing > none"]["verdict"] == "not resolved (interval spans 0)"
    assert rows["Octopus > GSPO n=16"]["verdict"] == "reversed (A < B)"
    assert math.isclose(rows["acc@2 > acc@1 (Octopus)"]["mean_diff"], 0.59 / 6)
    assert rows["Stage I helps"]["verdict"] == "too few seeds"
    # n = 16 - n = 8: 0, 0, -0.0005, 0, 0, 0: a tie on every seed (|A - B| < 0.001)
    gspo = rows["GSPO n=16 > GSPO n=8"]
    assert (gspo["n_ties"], gspo["wins_a"], gspo["wins_b"]) == (6, 0, 0)
    assert gspo["verdict"] == "no difference (a tie on every seed)"
    assert [c["claim"] for c in toy.claims_table(finals)] == [c[0] for c in toy.CLAIMS]
    # restricted to seeds 0 and 2: acc@2 - acc@1 of octopus is 0.10 and 0.06
    sub = {c["claim"]: c for c in toy.claims_table(finals, seeds=[0, 2])}
    assert sub["acc@2 > acc@1 (Octopus)"]["n_seeds"] == 2
    assert math.isclose(sub["acc@2 > acc@1 (Octopus)"]["mean_diff"], 0.08)
    # four seeds: the t interval excludes 0, but the sign-flip p cannot go below 2 / 16
    four = {c["claim"]: c for c in toy.claims_table(finals, seeds=[0, 1, 2, 3])}
    assert four["paper selection > random splicing"]["verdict"] == (
        "not resolved (t interval excludes 0, sign-flip p 0.125, its floor with 4 seeds 0.125)"
    )


def test_claims_per_machine_and_their_interaction_in_one_table():
    finals = {"octopus": {s: {"acc2": a, "acc1": a} for s, a in enumerate((0.5, 0.6, 0.8, 0.9))},
              "no-augment": {s: {"acc2": 0.5, "acc1": 0.5} for s in range(4)}}  # fmt: skip
    cost = ("c", "octopus", "x", "dev", ">= 0", {0: 0.01, 3: 0.02})
    rows = toy.claims_table(finals, machines={"2": [0, 1], "3": [2, 3]}, extra=[cost])
    names = [c[0] for c in toy.CLAIMS] + ["c"]
    assert [(r["machine"], r["claim"]) for r in rows] == [(m, n) for m in ("all", "2", "3")
                                                          for n in names]  # fmt: skip
    pooled = next(r for r in rows if r["claim"] == "paper selection > none")
    assert math.isclose(pooled["mean_machine_2"], 0.05)  # diffs 0, 0.1 | 0.3, 0.4
    assert math.isclose(pooled["mean_machine_3"], 0.35)
    assert math.isclose(pooled["interaction"], 0.3)
    assert math.isclose(pooled["interaction_t"], 0.3 / math.sqrt(0.005))
    assert math.isclose(pooled["interaction_p"], 2 / 6)  # 2 of the 6 splits reach |0.3|
    assert pooled["n_ties"] == 1 and pooled["wins_a"] == 3  # seed 0: a difference of 0
    assert pooled["caveat"].startswith("no-augment rerun at the shared cold-start lr")
    m3 = next(r for r in rows if r["claim"] == "paper selection > none" and r["machine"] == "3")
    assert (m3["n_seeds"], m3["analysis"]) == (2, toy.MACHINE_SPLIT)
    extra = [r for r in rows if r["claim"] == "c"]
    assert [(r["machine"], r["n_seeds"]) for r in extra] == [("all", 2), ("2", 1), ("3", 1)]
    assert extra[0]["analysis"] == toy.POST_HOC.get("c", "pre-registered (bd2abda)")
    gspo = next(r for r in rows if r["claim"] == "Octopus > GSPO n=16")
    assert "degenerate" in gspo["caveat"]
    assert toy.analysis_of(toy.COST_CLAIM, "octopus", "no-splice-n16")[0].startswith("post hoc")


def test_sign_flip_p_by_hand():
    # [1, 2, 3]: the 8 sign patterns sum to 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice
    assert toy.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # [3, 1, -1]: sum 3; |sum| >= 3 for 5, 3, 3, -3, -3, -5
    assert toy.sign_flip_p([3.0, 1.0, -1.0]) == 0.75
    assert toy.sign_flip_p([3.0, -1.0, 1.0]) == toy.sign_flip_p([-3.0, 1.0, -1.0])
    assert toy.sign_flip_p([0.1, -0.1]) == 1.0 and math.isnan(toy.sign_flip_p([]))
    assert toy.sign_flip_p([0.1] * 8) == 2 / 256


def test_interaction_by_hand():
    out = toy.interaction([0.0, 0.1], [0.3, 0.4])
    assert math.isclose(out["interaction"], 0.3)
    assert math.isclose(out["interaction_t"], 0.3 / math.sqrt(0.005 / 2 + 0.005 / 2))
    # the 6 ways to pick 2 of [0, 0.1, 0.3, 0.4] as the first machine: differences 0.3, 0.1,
    # 0, 0, -0.1, -0.3
    assert math.isclose(out["interaction_p"], 2 / 6)
    assert math.isnan(toy.interaction([0.1], [0.2, 0.3])["interaction_p"])
    assert toy.interaction([0.1, 0.1], [0.2, 0.2])["interaction_t"] == math.inf


def test_seed_machines_reads_the_recorded_cpu_and_falls_back_to_the_hand_written_list():
    machines = {"2": {"isa": "avx512+amx", "seeds": [0, 1]}, "3": {"isa": "avx512", "seeds": [4]}}
    intel, amd = "Intel(R) Xeon(R) Processor, avx512+amx, 2 cores", "AMD EPYC, avx512, 2 cores"
    jobs = {"cold-seed0": {"seed": 0}, "arm-x-seed0": {"seed": 0, "machine": intel},
            "cold-seed4": {"seed": 4}, "cold-seed5": {"seed": 5, "machine": amd},
            "cold-seed9": {"seed": 9}}  # fmt: skip
    assert toy.seed_machines(jobs, machines) == {0: "2", 4: "3", 5: "3"}  # seed 9: unknown
    assert toy.seed_machines(jobs, {}) == {}
    jobs["arm-y-seed1"] = {"seed": 1, "machine": amd}  # hand: machine 2; recorded: machine 3
    jobs["cold-seed1"] = {"seed": 1}
    # jobs in name order: arm-y-seed1 (recorded: 3) first, then cold-seed1 (by hand: 2)
    with pytest.raises(SystemExit, match="cold-seed1.json ran on machine 2, the other jobs of "
                       "seed 1 on machine 3"):  # fmt: skip
        toy.seed_machines(jobs, machines)
    with pytest.raises(SystemExit, match="no machine of machines.json has isa 'avx2'"):
        toy.seed_machines({"j": {"seed": 0, "machine": "Old CPU, avx2, 4 cores"}}, machines)


def test_lr_rule_is_the_same_for_every_arm():
    assert toy.choose_lr({3e-5: 0.5, 1e-4: 0.7, 3e-4: 0.6}) == 1e-4
    assert toy.choose_lr({3e-5: 0.7, 1e-4: 0.7, 3e-4: 0.6}) == 3e-5  # a tie: the smaller lr
    job = {"curve": [{"val_acc_final": a} for a in (0.1, 0.9, 0.5, 0.6, 0.7)]}
    assert math.isclose(toy.grid_score(job), 0.6)  # the last three validations
    jobs = {toy.job_name("arm", 0, "octopus", lr): job for lr in (3e-5, 1e-4)}
    grid = toy.lr_grid(jobs, ["octopus", "sft-only"], (3e-5, 1e-4, 3e-4))
    assert grid == {"octopus": {"scores": {"3e-05": 0.6, "0.0001": 0.6}, "chosen": None}}
    jobs[toy.job_name("arm", 0, "octopus", 3e-4)] = {"curve": [{"val_acc_final": 0.61}]}
    assert toy.lr_grid(jobs, ["octopus"], (3e-5, 1e-4, 3e-4))["octopus"]["chosen"] == 3e-4


def test_the_aggregation_diagnostic_is_octopus_with_a_token_mean_in_stage_2_at_its_lr():
    scale = dict(toy.RARE_SCALES["full"])
    del scale["cold_start_rl_lr"]  # the grid's path: the diagnostic waits for Octopus's grid
    token = toy.rare_arm_configs("octopus-agg-token", 3, scale, "/w", 1e-4)
    octopus = toy.rare_arm_configs("octopus", 3, scale, "/w", 1e-4)
    assert [_diff(c, o) for c, o in zip(token, octopus, strict=True)] == [set(), {"agg"}]
    assert (token[1].agg, octopus[1].agg) == ("token", "seq")
    # no grid of its own: it waits for Octopus's, then runs at the lr Octopus's grid chose
    assert "octopus-agg-token" not in toy.RARE_ARMS
    job = {"curve": [{"val_acc_final": 0.5}]}
    jobs = {toy.job_name("arm", 0, "octopus", lr): job for lr in (3e-5, 1e-4)}
    assert toy.lr_for("octopus-agg-token", jobs, scale) is None
    jobs[toy.job_name("arm", 0, "octopus", 3e-4)] = {"curve": [{"val_acc_final": 0.7}]}
    assert toy.lr_for("octopus-agg-token", jobs, scale) == 3e-4
    args = argparse.Namespace(lr=0.0, lr_from="", reuse_base=False, scale_name="full")
    todo = toy.rare_jobs(args, scale, "/nonexistent", "/w", ["octopus-agg-token"], [0],
                         {"commit": "c", "dirty": False})  # fmt: skip
    assert not [j for j in todo if j["name"].startswith("arm-")]  # the grid is Octopus's


def test_compute_counters_add_generated_and_trained_tokens_to_each_step():
    from rollout import Rollout

    def generate(t, prompts, step):
        return [[Rollout([1] * (3 + k), [], "", "stop") for k in range(2)] for _ in prompts]

    def make_group(t, n):
        sample = types.SimpleNamespace
        return types.SimpleNamespace(samples=[sample(ids=[0] * 5), sample(ids=[0] * 2)],
                                     policy_masks=[torch.tensor([0.0, 1, 1, 1, 1]), torch.ones(2)])  # fmt: skip

    def rl_step(t, step):
        module.generate(t, ["p", "q", "r"], step)
        for n in range(3):
            module.make_group(t, n)
        return {"step": step}

    import torch

    module = types.SimpleNamespace(generate=generate, make_group=make_group, rl_step=rl_step)
    toy_arms._count_compute(module)
    for step in (0, 1):  # the counters restart each step
        assert module.rl_step(None, step) == {
            "step": step, "gen_rollouts": 6, "gen_tokens": 3 * (3 + 4), "trained_samples": 6,
            "trained_tokens": 3 * 7, "trained_policy_tokens": 3 * 6}  # fmt: skip


def test_stability_windows_are_the_first_and_last_ten_steps_of_each_stage():
    rows = [dict(stage="1", format=1.0 if k < 10 else 0.5, sc_format=0.0, truncated=0.0)
            for k in range(25)] + [dict(stage="2", format=0.8, sc_format=0.6,
                                        truncated=float(k >= 5)) for k in range(12)]  # fmt: skip
    st = toy_arms._stability(rows)
    assert (st["stage1_first10_format"], st["stage1_last10_format"]) == (1.0, 0.5)
    assert (st["stage2_first10_truncated"], st["stage2_last10_truncated"]) == (0.5, 0.7)
    assert st["stage2_last10_sc_format"] == 0.6


# --------------------------------------------------------------------------- the CI smoke


@pytest.mark.slow
def test_smoke_runs_every_stage_and_resumes_from_its_job_files(tmp_path):
    """cold start (base, cold, exposure, calibration), start evaluations, Stage I + II with the
    dev curve and the test set, aggregation; then a second call runs no job."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    argv = [sys.executable, os.path.join(ROOT, "bench", "toy_replication.py"), "--smoke",
            "--arms", "octopus,sft-only", "--seeds", "0", "--parallel", "2", "--out", str(out), "--work", str(work)]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in (work / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    jobs = {p.stem: json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")}
    assert sorted(jobs) == ["arm-octopus-seed0-lr0.0001", "cold-seed0", "start-seed0"]
    commit = jobs["cold-seed0"]["commit"]
    assert len(commit) == 40 and {j["commit"] for j in jobs.values()} == {commit}
    # the arm started from the very checkpoint the cold start made and the start job scored
    assert jobs["cold-seed0"]["base_settle_steps"] == 2  # the base annealed after its stop
    cold_sha = jobs["cold-seed0"]["checkpoints"]["cold"]
    assert jobs["arm-octopus-seed0-lr0.0001"]["start_checkpoint"] == cold_sha
    assert jobs["start-seed0"]["start"]["cold"]["checkpoint"] == cold_sha
    calib = json.loads((out / "calibration.json").read_text())["seeds"]["0"]
    for key in ("base_acc_t1", "base_format_t1", "cold_format_t1", "cold_wc_generated"):
        assert calib[key] * 16 == round(calib[key] * 16)  # 8 dev prompts x 2 samples
    assert math.isclose(calib["sft_only_minus_base"],
                        calib["cold_acc2_t1"] - calib["base_acc_t1"], abs_tol=1e-6)  # fmt: skip
    with open(out / "runs.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == toy.RUN_COLUMNS
        rows = list(reader)
    assert [(r["arm"], r["step"], r["stage"], r["split"]) for r in rows] == [
        ("octopus", "0", "start", "dev"), ("octopus", "0", "start", "test"),
        ("octopus", "1", "1", "dev"), ("octopus", "2", "2", "dev"),
        ("octopus", "2", "end", "test"),
        ("sft-only", "0", "start", "dev"), ("sft-only", "0", "start", "test")]  # fmt: skip
    assert {r["commit"] for r in rows} == {commit}
    for r in rows:  # sampled shares of 4 dev prompts x 1 and 8 test images x 1
        n = 4 if r["split"] == "dev" else 8
        assert float(r["acc2"]) * n == round(float(r["acc2"]) * n)
    assert rows[1]["acc2"] == rows[6]["acc2"]  # sft-only is the cold start's evaluation
    compute = next(csv.DictReader(open(out / "compute.csv")))
    # 2 steps x 8 prompts x 8 rollouts generated; 8 to 16 samples trained per prompt
    assert int(compute["gen_rollouts"]) == 128 and 128 <= int(compute["trained_samples"]) <= 256
    assert int(compute["trained_policy_tokens"]) <= int(compute["trained_tokens"])
    grid = json.loads((out / "lr_grid.json").read_text())
    assert grid["arms"]["octopus"]["chosen"] == 1e-4 and "sft-only" not in grid["arms"]
    claims = list(csv.DictReader(open(out / "claims.csv")))
    assert [c["claim"] for c in claims] == [c[0] for c in toy.CLAIMS] + [toy.COST_CLAIM]
    # resumed: every job's file is there, so nothing runs again
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[regime] start" not in again.stdout, again.stdout[-2000:]


def _metrics(acc1, acc2):
    return {"val_acc_o1": acc1, "val_acc_final": acc2, "val_wc": 0.0, "val_cw": 0.0,
            "val_format": 1.0, "val_sc_format": 1.0, "val_corrects_itself": 1.0}  # fmt: skip


def _job_files(tmp_path) -> None:
    """Cold, start and arm (octopus, random-augment at 1e-4) jobs of seeds 0 and 1 in tmp_path."""
    jobs = tmp_path / "jobs"
    calib = dict(base_acc_t1=0.4, base_format_t1=0.97, cold_format_t1=0.93,
                 cold_wc_generated=0.01, sft_only_minus_base=0.01)  # fmt: skip
    for seed in (0, 1):
        toy.write_json({"kind": "cold", "seed": seed, "commit": "c0", "calibration": calib,
                        "accepted": True, "regime_misses": [], "base_steps": 300,
                        "cold_steps": 120, "coldstart_counts": {}}, str(jobs / f"cold-seed{seed}.json"))  # fmt: skip
        toy.write_json({"kind": "start", "seed": seed, "commit": "c1", "start": {
            name: {"dev": _metrics(0.4, 0.4), "test": _metrics(0.4, 0.41 + seed / 100)}
            for name in ("base", "cold", "exposed")}}, str(jobs / f"start-seed{seed}.json"))  # fmt: skip
        for arm, acc in (("octopus", 0.6), ("random-augment", 0.5)):
            steps = [{"global_step": k, "gen_tokens": 100} for k in (1, 2, 3, 4)]
            toy.write_json({"kind": "arm", "arm": arm, "seed": seed, "lr": 1e-4, "commit": "c2",
                            "curve": [dict(_metrics(0.3, 0.5), step=2, stage="1"),
                                      dict(_metrics(0.3, acc), step=4, stage="2")],
                            "test": _metrics(acc - 0.1, acc + seed / 10), "steps": steps,
                            "compute": {"rl_steps": 4, "gen_tokens": 400, "trained_tokens": 800,
                                        "median_step_s": 1.5}, "seconds": 9.0,
                            "load_avg_start": 1.0, "load_avg_end": 2.0,
                            "stability": {f"stage{st}_{end}_{key}": 0.9 if end == "first10" else 0.8
                                          for st in "12" for end in ("first10", "last10")
                                          for key in ("format", "sc_format", "truncated")}},
                           str(jobs / (toy.job_name("arm", seed, arm, 1e-4) + ".json")))  # fmt: skip


def test_aggregate_writes_runs_claims_and_calibration_from_job_files(tmp_path):
    _job_files(tmp_path)
    machines = {"a": {"cpu": "cpu A", "seeds": [0]}, "b": {"cpu": "cpu B", "seeds": [1]}}
    toy.write_json({"machines": machines}, str(tmp_path / "machines.json"))
    scale = dict(toy.RARE_SCALES["quick"])  # no grid: every arm at 1e-4
    md = toy.aggregate(str(tmp_path), ["octopus", "random-augment", "sft-only"], scale)
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    octo0 = [(r["step"], r["split"], r["acc2"], r["commit"]) for r in rows
             if r["arm"] == "octopus" and r["seed"] == "0"]  # fmt: skip
    assert octo0 == [("0", "dev", "0.4", "c1"), ("0", "test", "0.41", "c1"),
                     ("2", "dev", "0.5", "c2"), ("4", "dev", "0.6", "c2"),
                     ("4", "test", "0.6", "c2")]  # fmt: skip
    claims = {c["claim"]: c for c in csv.DictReader(open(tmp_path / "claims.csv"))
              if c["machine"] == "all"}  # fmt: skip
    sel = claims["paper selection > random splicing"]
    assert (float(sel["mean_diff"]), sel["seeds_a_gt_b"], sel["n_seeds"]) == (0.1, "2", "2")
    assert (sel["machine"], sel["perm_p"], sel["mean_machine_a"]) == ("all", "0.5", "0.1")
    by_machine = [(c["machine"], c["n_seeds"], c["mean_diff"]) for c in
                  csv.DictReader(open(tmp_path / "claims.csv"))
                  if c["claim"] == "paper selection > random splicing"]  # fmt: skip
    assert by_machine == [("all", "2", "0.1"), ("a", "1", "0.1"), ("b", "1", "0.1")]
    assert claims[toy.COST_CLAIM]["verdict"] == "too few seeds"  # no no-splice-n16 job
    assert (
        "| paper selection > random splicing | +0.100 (n = 1): too few seeds | +0.100 (n = 1)" in md
    )
    assert "| machine | a | b |" in md
    rl = claims["RL > the cold start"]  # octopus 0.6 / 0.7 against the cold start 0.41 / 0.42
    assert math.isclose(float(rl["mean_diff"]), 0.235, abs_tol=1e-4)
    cal = json.loads((tmp_path / "calibration.json").read_text())
    assert cal["seeds"]["1"]["accepted"] and cal["seeds"]["0"]["cold_steps"] == 120
    cost = list(csv.DictReader(open(tmp_path / "accuracy_vs_generated_tokens.csv")))
    assert [(r["arm"], r["gen_tokens"], r["dev_acc2"]) for r in cost if r["arm"] == "octopus"] == [
        ("octopus", "200", "0.5"), ("octopus", "400", "0.6")]  # fmt: skip
    assert "| 0 | 0.400 | 0.970 | 0.930 | 0.0100 | +0.010 | yes |" in md
    assert md.startswith("Jobs: 8 from 3 commit(s) whose Python code is that of unknown")
    assert "| octopus | 2 | 400 | 800 | 1.50 | 9 |" in md  # compute, mean over the 2 seeds
    # the per-seed table: octopus's test acc@2 is 0.6 + seed / 10, the cold start's 0.41 + seed / 100
    assert "| arm (test acc@2) | seed 0 | seed 1 |" in md
    assert "| octopus | 0.600 | 0.700 |" in md and "| sft-only | 0.410 | 0.420 |" in md
    stab = list(csv.DictReader(open(tmp_path / "stability.csv")))
    assert [(r["arm"], r["seed"], r["stage"]) for r in stab] == [
        (arm, str(seed), st) for arm in ("octopus", "random-augment") for seed in (0, 1) for st in "12"]  # fmt: skip
    assert "| octopus | 1 | 2 | 0.900 / 0.800 | 0.900 / 0.800 | 0.900 / 0.800 |" in md


def test_aggregate_flag_rewrites_the_tables_and_runs_no_job(tmp_path, capsys):
    _job_files(tmp_path)
    out, work = str(tmp_path), str(tmp_path / "work")
    argv = ["--arms", "octopus,random-augment,no-augment", "--seeds", "0,1", "--out", out,
            "--work", work, "--quick"]  # fmt: skip
    # without the flag the driver would run jobs: no-augment has none on either seed
    args = argparse.Namespace(lr=0.0, lr_from="", reuse_base=False, scale_name="quick")
    todo = toy.rare_jobs(args, dict(toy.RARE_SCALES["quick"]), out, work,
                         ["octopus", "random-augment", "no-augment"], [0, 1],
                         {"commit": "c", "dirty": False})  # fmt: skip
    assert [j["name"] for j in todo if j["name"].startswith("arm-")] == [
        "arm-no-augment-seed0-lr0.0001", "arm-no-augment-seed1-lr0.0001"]  # fmt: skip
    toy.main([*argv, "--aggregate"])
    printed = capsys.readouterr().out
    assert "[regime] start" not in printed and "job(s) to run" not in printed
    assert not os.path.exists(os.path.join(work, "data"))  # not even the eval sets were drawn
    claims = list(csv.DictReader(open(tmp_path / "claims.csv")))
    sel = next(c for c in claims if c["claim"] == "paper selection > random splicing")
    assert (sel["n_seeds"], sel["mean_diff"]) == ("2", "0.1")
    assert (tmp_path / "report.md").read_text().startswith("Jobs: 8 from 3 commit(s)")


def test_compare_jobs_reports_checkpoints_and_test_accuracy_against_the_committed(tmp_path):
    here, ref = str(tmp_path / "here"), str(tmp_path / "ref")
    for folder, sha, acc in ((here, "aa", 0.70), (ref, "aa", 0.72)):
        toy.write_json({"kind": "cold", "commit": "1" * 40, "checkpoints": {"cold": sha}},
                       os.path.join(folder, "jobs", "cold-seed0.json"))  # fmt: skip
        toy.write_json({"kind": "arm", "commit": "2" * 40, "final_checkpoint": sha + str(acc),
                        "test": {"val_acc_o1": 0.5, "val_acc_final": acc}},
                       os.path.join(folder, "jobs", "arm-octopus-seed0-lr0.0001.json"))  # fmt: skip
    toy.write_json(
        {"kind": "cold", "commit": "3" * 40, "checkpoints": {"cold": "bb"}},
        os.path.join(ref, "jobs", "cold-seed1.json"),
    )  # only in the reference
    assert toy.compare_jobs(here, ref) == [
        "arm-octopus-seed0-lr0.0001 (here 2222222222, committed 2222222222): test acc@1 +0.0000, "
        "acc@2 -0.0200, final checkpoint differs",
        "cold-seed0 (here 1111111111, committed 1111111111): checkpoints identical",
    ]


def test_systematic_base_labels_count_the_squares_on_images_with_two_or_more():
    grey = DOTS_VARIANTS["hard"]["square_fill"]
    seen = set()
    for e in synthetic_task(40, seed=21, suffix="", variant="hard"):
        squares = len(_blobs(e["messages"][0]["content"][0]["image"], grey))
        assert toy.squares_of(e) == squares
        want = int(e["answer"]) + squares if squares >= 2 else int(e["answer"])
        assert toy.base_label(e, "systematic") == str(want)
        assert toy.base_label(e, "truth") == e["answer"]
        seen.add(squares >= 2)
    assert seen == {True, False}


def test_a_rebuilt_cold_start_that_differs_supersedes_only_its_own_seed(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    committed = {
        "cold-seed1": {"kind": "cold", "seed": 1, "commit": "abcdef0123456789", "checkpoints": 1},
        "start-seed1": {"kind": "start", "seed": 1},
        "arm-octopus-seed1-lr0.0001": {"kind": "arm", "seed": 1},
        "cold-seed10": {"kind": "cold", "seed": 10, "commit": "ffff", "checkpoints": 3},
        "arm-octopus-seed10-lr0.0001": {"kind": "arm", "seed": 10},
    }
    for name, job in committed.items():
        (jobs / f"{name}.json").write_text(json.dumps(job))
    rebuilt = tmp_path / "rebuilt.json"
    rebuilt.write_text(json.dumps({"kind": "cold", "seed": 1, "commit": "0123", "checkpoints": 2}))
    dest = toy.supersede_seed(str(tmp_path), 1, str(rebuilt))
    assert dest == str(tmp_path / "attempts" / "superseded-abcdef0123-seed1")
    # seed 10's names contain "seed1": only the seed field decides
    assert sorted(os.listdir(jobs)) == ["arm-octopus-seed10-lr0.0001.json", "cold-seed1.json",
                                        "cold-seed10.json"]  # fmt: skip
    assert json.loads((jobs / "cold-seed1.json").read_text())["checkpoints"] == 2
    kept = {p[:-5]: json.loads(open(os.path.join(dest, p)).read()) for p in os.listdir(dest)}
    assert kept == {k: v for k, v in committed.items() if v["seed"] == 1}
    # the loaded jobs are what the planner reads: the seed's start and arm are to run again
    assert set(toy.load_jobs(str(tmp_path))) == {"cold-seed1", "cold-seed10",
                                                 "arm-octopus-seed10-lr0.0001"}  # fmt: skip


@pytest.mark.parametrize(
    "flags, isa",
    [("fpu sse avx avx2 fma", "avx2"), ("avx2 avx512f avx512bw", "avx512"),
     ("avx2 avx512f amx_bf16 amx_tile", "avx512+amx"), ("neon asimd", "other")],
)  # fmt: skip
def test_cpu_kernels_names_the_widest_isa(tmp_path, flags, isa):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: {flags}\n\n"
                    "processor\t: 1\nflags\t\t: nothing\n")  # fmt: skip
    assert toy.cpu_kernels(str(info)) == f"Some Xeon, {isa}, {os.cpu_count()} cores"
    assert toy.cpu_kernels(str(tmp_path / "absent")).startswith("unknown CPU, other, ")


def test_every_cold_start_arm_runs_at_the_one_shared_lr_and_no_grid_is_planned_for_them():
    scale = dict(toy.RARE_SCALES["full"])
    assert scale["cold_start_rl_lr"] == 1e-4
    jobs = {toy.job_name("arm", 0, "no-augment", lr): {"curve": [{"val_acc_final": v}]}
            for lr, v in ((3e-5, 0.9), (1e-4, 0.1), (3e-4, 0.1))}  # fmt: skip
    cold = [a for a in toy.ARMS if toy.ARMS[a][0] == "cold" and toy.ARMS[a][1]]
    assert {a: toy.lr_for(a, jobs, scale) for a in cold} == dict.fromkeys(cold, 1e-4)
    assert toy.lr_for("no-augment", jobs, scale, lr=3e-4) == 3e-4  # --lr still wins
    # the grid still chooses for the arms that start elsewhere, and only it does
    del scale["cold_start_rl_lr"]
    assert toy.lr_for("no-augment", jobs, scale) == 3e-5
    args = argparse.Namespace(lr=0.0, lr_from="", reuse_base=False, scale_name="full")
    todo = toy.rare_jobs(args, dict(toy.RARE_SCALES["full"]), "/nonexistent", "/w",
                         ["no-augment", "gspo-n8"], [1], {"commit": "c", "dirty": False})  # fmt: skip
    arms = sorted(j["name"] for j in todo if j["name"].startswith("arm-"))
    assert arms == sorted([f"arm-gspo-n8-seed0-lr{lr:g}" for lr in toy.RARE_LR_GRID]
                          + ["arm-no-augment-seed1-lr0.0001"])  # fmt: skip


def test_stability_rows_keep_self_correction_arms_at_their_chosen_lr():
    st = {f"stage{s}_{e}_{k}": v for s, v in (("1", 0.5), ("2", 0.25))
          for e in ("first10", "last10") for k in ("format", "sc_format", "truncated")}  # fmt: skip
    # b: not at the chosen lr; c: a GSPO arm answers once; d: not an arm
    jobs = {
        "a": {"kind": "arm", "arm": "octopus", "seed": 0, "lr": 1e-4, "stability": st},
        "b": {"kind": "arm", "arm": "octopus", "seed": 0, "lr": 3e-5, "stability": st},
        "c": {"kind": "arm", "arm": "gspo-n16", "seed": 0, "lr": 1e-4, "stability": st},
        "d": {"kind": "cold", "seed": 0},
    }
    rows = toy.stability_rows(jobs, {"octopus": 1e-4, "gspo-n16": 1e-4})
    assert [(r["arm"], r["stage"], r["format_first10"], r["truncated_last10"]) for r in rows] == [
        ("octopus", "1", 0.5, 0.5), ("octopus", "2", 0.25, 0.25)]  # fmt: skip


def test_code_of_names_the_last_commit_that_changed_python(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "code")
    code = git("rev-parse", "--short", "HEAD")
    (tmp_path / "job.json").write_text("{}")
    git("add", ".")
    git("commit", "-qm", "a job's result")
    results = git("rev-parse", "HEAD")
    monkeypatch.setattr(toy_recipe, "ROOT", str(tmp_path))  # git() runs there
    assert toy.code_of({results, "0" * 40}) == {"0" * 40: "unknown", results: code}


def test_cost_matched_compares_at_the_same_generated_tokens_by_interpolation():
    def job(arm, seed, accs, tokens_per_step):
        steps = [{"global_step": k, "gen_tokens": tokens_per_step} for k in range(1, 5)]
        curve = [dict(_metrics(0.0, acc), step=k) for k, acc in zip((2, 4), accs, strict=True)]
        return {"kind": "arm", "arm": arm, "seed": seed, "lr": 1e-4, "steps": steps, "curve": curve}

    # octopus generates 100 a step: its last point (0.7) at 400 tokens; no-splice generates 200 a
    # step: 0.5 at 400 and 0.9 at 800 tokens, so at 400 it is 0.5 (seed 0). Seed 1: no-splice's
    # first point is at 400 tokens and 0.6, its last at 0.8: at 400, 0.6.
    jobs = {"a0": job("octopus", 0, (0.6, 0.7), 100), "b0": job("no-splice-n16", 0, (0.5, 0.9), 200),
            "a1": job("octopus", 1, (0.6, 0.9), 100), "b1": job("no-splice-n16", 1, (0.6, 0.8), 200),
            "other-lr": {**job("no-splice-n16", 2, (0.1, 0.1), 1), "lr": 3e-4}}  # fmt: skip
    chosen = {"octopus": 1e-4, "no-splice-n16": 1e-4}
    st = toy.cost_matched(jobs, chosen, "octopus", "no-splice-n16")
    assert st["n_seeds"] == 2 and math.isclose(st["mean_diff"], (0.2 + 0.3) / 2)
    # halfway between two validations: linear; past the curve's end: None
    curve = toy.cost_curve(jobs["b0"])
    assert math.isclose(toy.at_tokens(curve, 600), 0.7)
    assert math.isclose(toy.at_tokens(curve, 200), 0.5) and toy.at_tokens(curve, 801) is None

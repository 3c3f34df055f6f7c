"""bench/toy_replication.py: the hard dot task, the oracle of the cold start, the arms' configs,
the tables; and a smoke run of every stage (2 steps) that CI runs."""

import csv
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import toy_replication as toy  # noqa: E402

from coldstart import strong_messages  # noqa: E402
from data import DOTS_VARIANTS, dots_image, synthetic_task  # noqa: E402
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
    cfg = {arm: toy.arm_configs(arm, 0, scale, "/w") for arm in toy.ARMS}
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


# --------------------------------------------------------------------------- the CI smoke


@pytest.mark.slow
def test_smoke_runs_every_stage_and_writes_the_csv(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "toy_replication.py"), "--smoke",
         "--arms", "octopus,gspo-n8,sft-only", "--seeds", "0", "--out", str(out),
         "--work", str(work)], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = "".join(p.read_text()[-3000:] for p in (work / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    with open(out / "toy_replication.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == toy.COLUMNS
        rows = list(reader)
    by_arm = {a: [(r["step"], r["stage"]) for r in rows if r["arm"] == a] for a in
              ("octopus", "gspo-n8", "sft-only")}  # fmt: skip
    assert by_arm == {"octopus": [("0", "start"), ("1", "1"), ("2", "2")],
                      "gspo-n8": [("0", "start"), ("1", "2"), ("2", "2")],
                      "sft-only": [("0", "start")]}  # fmt: skip
    for r in rows:
        assert 0.0 <= float(r["val_acc@2"]) <= 1.0
        if r["step"] != "0":
            assert float(r["s_per_step"]) > 0 and float(r["seconds"]) > 0
    # GSPO trains its n = 8 rollouts; Octopus at least those (spliced ones need an o2, which a
    # 2-step cold start rarely writes)
    trained = {(r["arm"], float(r["samples_per_prompt"])) for r in rows if r["step"] != "0"}
    assert {n for a, n in trained if a == "gspo-n8"} == {8.0}
    assert all(8.0 <= n <= 16.0 for a, n in trained if a == "octopus")
    calib = json.loads((out / "toy_calibration.json").read_text())
    counts = calib["seeds"]["0"]["coldstart_counts"]
    assert counts["written"] > 0 and counts["o2_correct"] == counts["written"]
    assert "| octopus | cold |" in (out / "toy_replication.md").read_text()

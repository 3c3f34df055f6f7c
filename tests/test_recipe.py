"""train.py's launch of the whole recipe: the default preset, the dry run, the missing-data stop,
the data order (one permutation per epoch) and a step that leaves out a prompt whose image does
not decode while the ranks stay in step."""

import io
import json
import os
import random
import subprocess
import sys

import pytest

import train
from config import SEQUENCES, parse_args, preset, stage_configs
from data import dots_image, epoch_order, load_split, prompts_of_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _old_prompts_of_step(n_examples, step, per_step, seed):
    """The order as first written: one full shuffle per prompt (the reference)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n_examples)
        perm = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[k])
    return out


@pytest.mark.parametrize("n, per_step", [(10, 3), (7, 7), (5, 12), (64, 16)])
def test_one_permutation_per_epoch_gives_the_same_order(n, per_step):
    """Same indices as the per-prompt shuffle, steps across epoch ends included (resume stays
    exact: a step's prompts depend on the step number only)."""
    for seed in (0, 3):
        for step in range(9):
            assert prompts_of_step(n, step, per_step, seed) == _old_prompts_of_step(
                n, step, per_step, seed
            )


def test_epoch_order_is_drawn_once():
    epoch_order.cache_clear()
    for step in range(40):
        prompts_of_step(1000, step, 50, 0)  # 2 epochs
    info = epoch_order.cache_info()
    assert info.misses == 2 and info.hits == 38


class _G:
    def __init__(self, k):
        self.k = k


@pytest.mark.parametrize("groups, minis, sizes", [(64, 4, [16] * 4), (63, 4, [15, 16, 16, 16]),
                                                   (5, 4, [1, 1, 1, 2]), (3, 1, [3])])  # fmt: skip
def test_mini_batches_keep_every_group_and_none_is_empty(groups, minis, sizes):
    cfg = preset("octopus-8b-stage1", prompts_per_step=128 * minis, mini_batch_prompts=128)
    got = train.mini_batches_of([_G(k) for k in range(groups)], cfg)
    assert [len(m) for m in got] == sizes
    assert [g.k for m in got for g in m] == list(range(groups))


def test_the_bare_command_is_the_recipe():
    name, overrides, flags = parse_args([])
    assert name == "octopus-8b" and overrides == {} and not any(flags.values())
    stages = stage_configs(name, {})
    assert [c.stage for c in stages] == ["sft", "1", "2"]
    assert [c.out_dir for c in stages] == [f"runs/octopus-8b/stage-{s}" for s in ("sft", "1", "2")]
    # each stage from the previous export; Stage I's reference is the cold-start model
    assert stages[0].model == "Qwen/Qwen3-VL-8B-Instruct"
    assert stages[1].model == "runs/octopus-8b/stage-sft/export"
    assert stages[2].model == "runs/octopus-8b/stage-1/export"
    sft, s1, s2 = stages
    # the paper's settings (Sec. 4.1, 4.3, experimental setup)
    assert (sft.lr, sft.epochs, sft.sft_max_len, sft.freeze_vision) == (1e-6, 1, 8192, False)
    assert (s1.kl_coef, s1.n_rollouts, s1.n_train, s1.prompts_per_step) == (0.01, 8, 16, 512)
    assert (s1.lr, s1.weight_decay, s1.warmup_steps, s1.epochs) == (1e-6, 0.1, 10, 5)
    assert (s2.kl_coef, s2.augment, s2.max_prompt_len, s2.max_response_len) == (
        0.0,
        "paper",
        2048,
        6144,
    )
    assert (s1.val_temperature, s1.val_top_p) == (0.6, 0.95)
    assert (sft.sft_data, s1.train_data, s1.val_data) == (
        "data/coldstart.jsonl", "data/ViRL39K", "data/geometry3k"
    )  # fmt: skip
    assert SEQUENCES["octopus-8b"][1:] == ["octopus-8b-stage1", "octopus-8b-stage2"]


def test_dry_run_prints_three_stages_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    train.main(["--dry_run", "--lr", "2e-6"])
    out, err = capsys.readouterr()
    configs = [json.loads(line) for line in out.splitlines()]
    assert [c["stage"] for c in configs] == ["sft", "1", "2"]
    assert all(c["lr"] == 2e-6 for c in configs)
    assert "not found: --sft_data data/coldstart.jsonl, --train_data data/ViRL39K" in err
    # under torchrun only rank 0 prints
    monkeypatch.setenv("RANK", "3")
    train.main(["--dry_run"])
    assert capsys.readouterr() == ("", "")


def test_missing_data_stops_before_any_model_loads(tmp_path):
    """One message naming the flags and the README section, no traceback, status 1 (0 under
    torchrun, whose launcher would bury the message under its own traceback)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TORCHELASTIC_RUN_ID", None)
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and '"Getting the data"' in lines[0]
    assert (
        "--sft_data data/coldstart.jsonl, --train_data data/ViRL39K, --val_data data/geometry3k"
        in lines[0]
    )
    # with the RL prompts in place only what is still missing is named (under torchrun: 0)
    (tmp_path / "data" / "ViRL39K").mkdir(parents=True)
    proc = subprocess.run([*cmd, "--preset", "octopus-8b-stage1"], cwd=tmp_path,
                          env=dict(env, TORCHELASTIC_RUN_ID="x"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "not found: --val_data data/geometry3k." in proc.stderr and "ViRL39K," not in proc.stderr


def test_no_image_bytes_are_decoded_at_load(tmp_path, processor):
    """load_split keeps images encoded: the prompt-length filter reads sizes from headers."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "white").save(buf, format="JPEG")
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    rows = [{"id": "a", "question": "<image>q", "answer": "1", "image": "a.jpg"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]))
    cfg = preset("octopus-8b-stage1")
    examples, skipped = load_split(str(tmp_path / "d.jsonl"), cfg, processor, seed=0)
    image = examples[0]["messages"][0]["content"][0]["image"]
    assert skipped == 0 and type(image).__name__ == "EncodedImage" and image.size == (640, 480)


def test_the_shared_engine_takes_the_most_images_of_any_stage(tmp_path):
    """The cold start's chats hold one image, an RL row two: the sequence's one engine must take
    two, or Stage I's first two-image prompt is refused mid-run."""
    from data import images_per_prompt

    rng = random.Random(0)
    for i in range(3):
        dots_image(i + 1, rng).save(tmp_path / f"{i}.png")
    sft_row = {"question": "<image>How many?", "answer": "1", "images": ["0.png"], "response": "x"}
    rl_rows = [
        {"question": "<image>How many?", "answer": "2", "images": ["1.png"]},
        {"question": "<image><image>How many?", "answer": "3", "images": ["1.png", "2.png"]},
    ]
    (tmp_path / "sft.jsonl").write_text(json.dumps(sft_row) + "\n")
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rl_rows) + "\n")
    stages = stage_configs(
        "octopus-8b",
        {
            "sft_data": str(tmp_path / "sft.jsonl"),
            "train_data": str(tmp_path / "rl.jsonl"),
            "val_data": "",
        },
    )
    assert images_per_prompt(stages[:1]) == 1  # the cold start alone
    assert images_per_prompt(stages) == 2  # with Stage I and II's data
    assert images_per_prompt([preset("demo-1")]) == 1  # synthetic: one image a prompt


# A cold start capped at 4,096 pixels, then Stage I at up to 16,384: the demo's 96x96 dots are
# 64x64 (4 visual tokens) in the first stage and stay 96x96 (9 tokens) in the second.
IMAGE_SIZE_SEQUENCE = """
import json, sys
import train
from config import preset
tiny, out = sys.argv[1], sys.argv[2]
small = dict(model=tiny, val_every=0, save_every=0, max_steps=1, min_pixels=1024, kv_cache_gb=0.1)
stages = [
    preset("demo-sft", **small, out_dir=out + "/stage-sft", sft_batch=2, max_pixels=4096),
    preset("demo-1", **small, out_dir=out + "/stage-1", prompts_per_step=2, mini_batch_prompts=2,
           n_rollouts=2, n_train=4, max_response_len=16, max_pixels=16384),
]
train.run_sequence(stages).close()
"""


@pytest.mark.slow
def test_every_stage_trains_at_its_own_image_size(tiny_path, tmp_path):
    """One engine serves the whole sequence, yet each stage tokenizes its images at its own
    range (the engine takes each request's size), and no export keeps a stage's narrowing."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", IMAGE_SIZE_SEQUENCE, tiny_path, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def first_row(stage):
        return json.loads(
            (tmp_path / f"stage-{stage}" / "metrics.jsonl").read_text().splitlines()[0]
        )

    # the same prompt text in both stages: the difference is the image's visual tokens
    assert first_row("1")["prompt_tokens"] - first_row("sft")["prompt_tokens"] == 9 - 4
    # the engine's log-probs are the trainer's: both saw Stage I's 9 tokens
    assert first_row("1")["logprob_gap"] < 1e-3
    from transformers import AutoImageProcessor

    base = AutoImageProcessor.from_pretrained(tiny_path).size
    for stage in ("sft", "1"):
        export = tmp_path / f"stage-{stage}" / "export"
        assert AutoImageProcessor.from_pretrained(str(export)).size == base

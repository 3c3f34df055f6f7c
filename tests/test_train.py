"""train.py end to end with 2 processes on gloo (and 1 for the gradient comparison)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from data import dots_image

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(29400 + os.getpid() % 500), os.path.join(ROOT, "tests", "torchrun_train.py"), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_each_stage_runs_and_bad_rows_are_counted(tiny_path, tmp_path):
    import random

    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    lines = []
    for i in range(8):
        dots_image(i % 6 + 1, rng).save(data / f"{i}.png")
        lines.append(
            {
                "question": "<image>How many dots are in the image?",
                "answer": str(i % 6 + 1),
                "image": f"{i}.png",
            }
        )
    (data / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines.append({"question": "<image>How many?", "answer": "2", "image": "corrupt.png"})
    lines.append({"question": "<image>How many?", "image": "0.png"})  # no answer
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    out = tmp_path / "run"
    torchrun(2, "stages", str(out), tiny_path, str(data / "train.jsonl"))
    for stage, steps in (("sft", 3), ("1", 2), ("2", 2)):
        got = rows(out / f"stage-{stage}" / "metrics.jsonl")
        assert [r["step"] for r in got] == list(range(1, steps + 1)) and all(
            r["stage"] == stage for r in got
        )
        for r in got:
            assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert os.path.exists(out / f"stage-{stage}" / "export" / "model.safetensors")
    rl = rows(out / "stage-1" / "metrics.jsonl")
    needed = {"reward", "format", "acc_o1", "acc_final", "gen_wc", "train_wc", "clip_low", "clip_high",
              "kl_o1", "grad_norm", "lr", "logprob_gap", "time_generate", "time_score", "time_augment",
              "time_logprobs", "time_update", "time_sync", "response_len", "val_acc_final"}  # fmt: skip
    assert needed <= set(rl[-1]), needed - set(rl[-1])
    # the engine serves the trainer's weights: its log-probs match the trainer's old log-probs
    assert all(r["logprob_gap"] < 1e-3 for r in rl)
    # n = 4 generated, up to N = 8 trained: a 3-step cold start seldom gives splicable parts
    assert all(4 <= r["samples_per_prompt"] <= 8 for r in rl)
    assert rows(out / "stage-2" / "metrics.jsonl")[-1]["data_skipped"] == 2


def test_gradient_is_the_same_on_one_and_two_ranks(tiny_path, tmp_path):
    # different token budgets too: the micro-batches differ as well as the ranks
    torchrun(1, "grads", str(tmp_path), tiny_path, "600:seq,250:token")
    torchrun(2, "grads", str(tmp_path), tiny_path, "1200:seq,500:token")
    for agg in ("seq", "token"):
        one = torch.load(tmp_path / f"grads_world1_{agg}.pt")
        two = torch.load(tmp_path / f"grads_world2_{agg}.pt")
        assert one.keys() == two.keys() and len(one) > 50
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        scale = max(one[k].abs().max().item() for k in one)
        assert scale > 0 and worst < 1e-6 * max(scale, 1.0), (agg, worst, scale)


def test_resume_matches_an_uninterrupted_run(tiny_path, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, "run", str(full), tiny_path, "3", "0", "0")
    torchrun(2, "run", str(cut), tiny_path, "2", "2", "0")  # stops after saving step 2
    # a crash while saving step 4 left a half-written checkpoint: it must be ignored
    os.makedirs(cut / "checkpoints" / "step_000004.tmp")
    os.makedirs(cut / "checkpoints" / "step_000005")  # no trainer.json: incomplete
    assert train.latest_checkpoint(str(cut)).endswith("step_000002")
    torchrun(2, "run", str(cut), tiny_path, "3", "0", "1")
    a, b = rows(full / "metrics.jsonl"), rows(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]  # the resumed run did only step 3
    skip = {k for k in a[2] if k.startswith("time_")}
    assert {k: v for k, v in a[2].items() if k not in skip} == {
        k: v for k, v in b[2].items() if k not in skip
    }
    from safetensors.torch import load_file

    wa, wb = (
        load_file(full / "export" / "model.safetensors"),
        load_file(cut / "export" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_prompts_of_step_never_repeat_within_an_epoch_and_resume_exactly():
    n, per = 10, 3
    seen = [i for step in range(3) for i in train.prompts_of_step(n, step, per, seed=1)]
    assert len(set(seen)) == len(seen) == 9  # 3 steps of one epoch: no prompt twice
    epoch = [i for pos in range(n) for i in [train.prompts_of_step(n, 0, n, seed=1)[pos]]]
    assert sorted(epoch) == list(range(n))
    assert train.prompts_of_step(n, 2, per, seed=1) == train.prompts_of_step(n, 2, per, seed=1)


def test_pack_by_tokens():
    lengths = [5, 100, 7, 60, 61, 3]
    batches = train.pack_by_tokens(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128
    assert train.pack_by_tokens([500], 128) == [[0]]  # too long: alone, not dropped


def test_collate_aligns_responses(processor):
    from data import synthetic_task
    from rollout import render_prompt

    exs = synthetic_task(2, seed=0)
    enc = [train.encode_prompt(processor, render_prompt(processor, e["messages"])) for e in exs]
    enc[1] = {
        **enc[1],
        "input_ids": enc[1]["input_ids"][:, 3:],
        "mm_token_type_ids": enc[1]["mm_token_type_ids"][:, 3:],
    }
    batch = train.collate(enc, [[5, 6, 7], [8]], pad_id=0)
    ids, P = batch["inputs"]["input_ids"], enc[0]["input_ids"].shape[1]
    assert ids[:, P:].tolist() == [[5, 6, 7], [8, 0, 0]]  # responses start together
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["inputs"]["attention_mask"][1, :3].tolist() == [0, 0, 0]  # left padding
    assert batch["inputs"]["pixel_values"].shape[0] == 2 * enc[0]["pixel_values"].shape[0]

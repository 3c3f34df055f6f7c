"""train.py and fsdp.py end to end with 2 processes on gloo (and 1 for comparisons)."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import fsdp
import train
from data import dots_image, prompts_of_step
from octopus import check_config, parse_args, preset, stage_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(29400 + os.getpid() % 500), os.path.join(ROOT, "tests", "torchrun_train.py"), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    return proc.stdout + proc.stderr


def rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def dots_rows(data, n: int, images_per_row: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        names = []
        for _ in range(images_per_row):
            dots_image(i % 6 + 1, rng).save(data / f"{len(os.listdir(data))}.png")
            names.append(f"{len(os.listdir(data)) - 1}.png")
        question = "<image>" * images_per_row + "How many dots are in the images?"
        out.append({"question": question, "answer": str(i % 6 + 1), "images": names})
    return out


@pytest.mark.slow
def test_each_stage_runs_and_bad_rows_are_counted(tiny_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = dots_rows(data, 8, 1, random.Random(0))
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
              "time_logprobs", "time_update", "time_sync", "response_len", "val_acc_final",
              "splice_too_long"}  # fmt: skip
    assert needed <= set(rl[-1]), needed - set(rl[-1])
    # the engine serves the trainer's weights: its log-probs match the trainer's old log-probs
    assert all(r["logprob_gap"] < 1e-3 for r in rl)
    # n = 4 generated, up to N = 8 trained: a 3-step cold start seldom gives splicable parts
    assert all(4 <= r["samples_per_prompt"] <= 8 for r in rl)
    assert rows(out / "stage-2" / "metrics.jsonl")[-1]["data_skipped"] == 2
    # the cold start keeps the engine asleep through its updates (it wakes only to validate)
    assert all(r["engine_asleep"] == 1.0 for r in rows(out / "stage-sft" / "metrics.jsonl"))
    # --keep_checkpoints 2 with a checkpoint every step: only the newest two are left
    ckpts = sorted(os.listdir(out / "stage-sft" / "checkpoints"))
    assert ckpts == ["step_000002", "step_000003"]
    # the method at work: trained groups written as readable text every step
    dumped = rows(out / "stage-1" / "samples.jsonl")
    assert len(dumped) == 2 * 2  # 2 steps x --dump_groups 2 (rank 0 holds 2 of the 4 prompts)
    sample = dumped[0]["samples"][0]
    assert {"kind", "reward", "advantage", "trains", "trained_text"} <= set(sample)


@pytest.mark.slow
def test_gradient_is_the_same_on_one_and_two_ranks(tiny_path, tmp_path):
    # different token budgets and packings too: the micro-batches differ as well as the ranks
    one = "600:seq:shared,250:token:shared,400:seq:per_sample"
    two = "1200:seq:shared,500:token:shared,300:seq:per_sample"
    torchrun(1, "grads", str(tmp_path), tiny_path, one)
    torchrun(2, "grads", str(tmp_path), tiny_path, two)
    for a, b in zip(one.split(","), two.split(","), strict=True):
        ga = torch.load(tmp_path / f"grads_world1_{a.replace(':', '_')}.pt")
        gb = torch.load(tmp_path / f"grads_world2_{b.replace(':', '_')}.pt")
        assert ga.keys() == gb.keys() and len(ga) > 50
        worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
        scale = max(ga[k].abs().max().item() for k in ga)
        assert scale > 0 and worst < 1e-6 * max(scale, 1.0), (a, b, worst, scale)
    # shared and per-sample prompts give the same gradient (seq aggregation, two budgets)
    shared = torch.load(tmp_path / "grads_world1_600_seq_shared.pt")
    per_sample = torch.load(tmp_path / "grads_world1_400_seq_per_sample.pt")
    worst = max((shared[k] - per_sample[k]).abs().max().item() for k in shared)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tiny_path, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, "run", str(full), tiny_path, "3", "0", "0")
    torchrun(2, "run", str(cut), tiny_path, "2", "2", "0")  # stops after saving step 2
    # a crash while saving step 4 left a half-written checkpoint: it must be ignored
    os.makedirs(cut / "checkpoints" / "step_000004.tmp")
    os.makedirs(cut / "checkpoints" / "step_000005")  # no trainer.json: incomplete
    assert fsdp.latest_checkpoint(str(cut)).endswith("step_000002")
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


@pytest.mark.slow
def test_two_image_rows_mixed_with_text_rows_on_two_ranks(tiny_path, tmp_path):
    """Rows with two images, rows with none (one rank's micro-batch can have images while the
    other's has none: the vision tower must still run in step on both) and a prompt over
    --max_prompt_len, which is skipped at load, counted and named."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    lines = dots_rows(data, 4, 2, rng)
    lines += [
        {"id": f"text-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)
    ]
    lines.append({"id": "too-long", "question": "count " * 400, "answer": "1"})
    (data / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    cfg = preset("demo-2", prompts_per_step=4, mini_batch_prompts=2)
    order = [prompts_of_step(8, s, 4, cfg.seed) for s in range(3)]
    has_image = [[i < 4 for i in o] for o in order]  # rows 0-3 have images (load order)
    # some mini-batch puts an image prompt on one rank and a text prompt on the other
    assert any(h[k] != h[k + 1] for h in has_image for k in (0, 2))
    out = tmp_path / "run"
    log = torchrun(2, "run", str(out), tiny_path, "3", "0", "0", json.dumps(
        {"train_data": str(data / "mixed.jsonl"), "val_data": "", "max_prompt_len": 300}))  # fmt: skip
    got = rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(r["data_skipped"] == 1 for r in got)
    assert "too-long" in log and "--max_prompt_len 300" in log


@pytest.mark.slow
def test_load_model_reads_the_checkpoint_on_rank_0_only(tiny_path, tmp_path):
    torchrun(2, "load", str(tmp_path), tiny_path)
    r0 = json.loads((tmp_path / "load_rank0.json").read_text())
    r1 = json.loads((tmp_path / "load_rank1.json").read_text())
    assert r0["weights_equal"] is True and r0["n"] > 50
    assert r0["buffers_equal"] and r1["buffers_equal"]  # rotary frequencies reached rank 1 too


@pytest.mark.slow
def test_checkpointing_acts_in_the_update_and_the_first_minibatch_is_on_policy(tiny_path, tmp_path):
    torchrun(1, "update", str(tmp_path), tiny_path)
    report = json.loads((tmp_path / "update.json").read_text())
    on, off = report["checkpointing=True"], report["checkpointing=False"]
    assert on["logprobs_pass"] == off["logprobs_pass"] > 0  # eval mode: never recomputed
    assert on["update"] == 2 * off["update"] > 0  # each layer runs again in the backward
    for r in (on, off):  # old log-probs = the update's own, detached: the ratio is exactly 1
        assert r["ratio"] == 1.0 and r["clip_low"] == 0.0 and r["clip_high"] == 0.0
        assert r["old_filled"]


# --------------------------------------------------------------------------- pure parts


def test_prompts_of_step_never_repeat_within_an_epoch_and_resume_exactly():
    n, per = 10, 3
    seen = [i for step in range(3) for i in prompts_of_step(n, step, per, seed=1)]
    assert len(set(seen)) == len(seen) == 9  # 3 steps of one epoch: no prompt twice
    epoch = [i for pos in range(n) for i in [prompts_of_step(n, 0, n, seed=1)[pos]]]
    assert sorted(epoch) == list(range(n))
    assert prompts_of_step(n, 2, per, seed=1) == prompts_of_step(n, 2, per, seed=1)


def test_pack_by_tokens():
    lengths = [5, 100, 7, 60, 61, 3]
    batches = fsdp.first_fit(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 128
    assert fsdp.first_fit([500], 128) == [[0]]  # too long: alone, not dropped
    assert len(batches) == 2  # 236 tokens in 2 micro-batches of at most 128


def test_micro_batches_pad_ranks_with_weightless_passes(monkeypatch):
    monkeypatch.setattr(fsdp, "all_reduce", lambda values, op=None: [5.0])  # another rank has 5
    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda: 2)
    got = fsdp.micro_batches([10, 10, 10], 20)
    assert [w for _, w in got] == [2.0, 2.0, 0.0, 0.0, 0.0]
    assert sorted(i for b, w in got if w for i in b) == [0, 1, 2]
    assert all(b == got[0][0][:1] for b, w in got if not w)  # a real item, weight 0
    with pytest.raises(ValueError, match="no items"):
        fsdp.micro_batches([], 20)


def test_setup_distributed_builds_a_device_aware_group_on_gpus(monkeypatch):
    calls = {}
    monkeypatch.setattr(fsdp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fsdp.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fsdp.torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(
        fsdp.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw)
    )
    monkeypatch.setattr(fsdp.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    rank, world, device = fsdp.setup_distributed()
    # CPU-side counts and metrics need gloo; NCCL alone fails on a CPU tensor
    assert calls["backend"] == "cpu:gloo,cuda:nccl" and calls["device_id"] == torch.device(
        "cuda", 3
    )
    assert device == torch.device("cuda", 3) and calls["timeout"].total_seconds() >= 1800


def test_check_config_refuses_what_cannot_run():
    check_config(preset("octopus-8b-stage1"), 8)
    with pytest.raises(ValueError, match="tensor_parallel must be 1"):
        check_config(preset("octopus-8b-stage1", tensor_parallel=2), 8)
    with pytest.raises(ValueError, match="multiple of"):
        check_config(preset("octopus-8b-stage1", mini_batch_prompts=100), 8)


def test_every_flag_has_help_and_one_spelling():
    import dataclasses

    from octopus import Config

    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))
    name, overrides, flags = parse_args(
        ["--preset", "gspo-n16", "--lr", "2e-6", "--shared_prompt", "false"]
    )
    assert name == "gspo-n16" and overrides == {"lr": 2e-6, "shared_prompt": False}
    cfgs = stage_configs("demo", {"lr": 0.5})
    assert [c.stage for c in cfgs] == ["sft", "1", "2"] and all(c.lr == 0.5 for c in cfgs)
    assert cfgs[1].out_dir == os.path.join("runs/demo", "stage-1")


def test_cosine_schedule_with_warmup_ratio():
    model = torch.nn.Linear(2, 2)
    cfg = preset("sft", lr=1.0)
    _, sched = train.make_optimizer(model, cfg, 100)  # warm-up 3 steps (3%), then cosine to 0
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))

"""train.py and fsdp.py end to end with 2 processes on gloo (and 1 for comparisons)."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import fsdp
import train
from config import check_config, parse_args, preset, stage_configs
from data import dots_image, prompts_of_step
from octopus import SC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, *args: str) -> str:
    """tests/torchrun_train.py under torchrun; `--standalone` picks a free port, so two test
    sessions on one machine never meet."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "torchrun_train.py"), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"{' '.join(args[:1])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
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


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def moved(a: dict, b: dict) -> float:
    """The largest change of any weight between two checkpoints."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Expensive runs, each launched once and shared by the tests that read it. The RL stages grade
# with tests/torchrun_train.py's varying reward: advantages are non-zero and the weights move, and
# every test below checks that first.


@pytest.fixture(scope="module")
def stages(tiny_path, tmp_path_factory):
    """Cold start (3 steps) -> Stage I (2) -> Stage II (3, KL on every response token) on 2
    ranks. Stage II's file mixes rows with two images, text-only rows (one rank's micro-batch
    can have images while the other's has none: the vision tower must still run in step on
    both), a prompt over --max_prompt_len, an unreadable image and a row without an answer."""
    root = tmp_path_factory.mktemp("stages")
    data = root / "data"
    data.mkdir()
    lines = dots_rows(data, 4, 2, random.Random(0))
    lines += [
        {"id": f"text-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)
    ]
    lines.append({"id": "too-long", "question": "count " * 400, "answer": "1"})
    (data / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines.append({"question": "<image>How many?", "answer": "2", "image": "corrupt.png"})
    lines.append({"question": "<image>How many?", "image": "0.png"})  # no answer
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    # Stage I's file: 8 one-image rows, r3's image broken after its header (it loads, it does
    # not decode)
    stage1 = root / "stage1"
    stage1.mkdir()
    rng = random.Random(1)
    rows1 = []
    for i in range(8):
        dots_image(i % 6 + 1, rng).save(stage1 / f"{i}.png")
        rows1.append({"id": f"r{i}", "question": "<image>How many dots are in the image?",
                      "answer": str(i % 6 + 1), "image": f"{i}.png"})  # fmt: skip
    whole = (stage1 / "3.png").read_bytes()
    (stage1 / "3.png").write_bytes(whole[: len(whole) // 2])
    (stage1 / "stage1.jsonl").write_text("\n".join(json.dumps(r) for r in rows1))
    out = root / "run"
    log = torchrun(2, "stages", str(out), tiny_path, str(data / "train.jsonl"),
                   str(stage1 / "stage1.jsonl"))  # fmt: skip
    return out, log


@pytest.fixture(scope="module")
def checks(tiny_path, tmp_path_factory):
    """The fixed-group checks of tests/torchrun_train.py on 1 rank, then on 2."""
    out = tmp_path_factory.mktemp("checks")
    torchrun(1, "checks", str(out), tiny_path)
    torchrun(2, "checks", str(out), tiny_path)
    return out


@pytest.fixture(scope="module")
def resumed(checks, tiny_path, tmp_path_factory):
    """A 3-step Stage II run with a checkpoint every step (`full`, run by the 2-rank checks
    launch); its step-2 checkpoint copied to `cut` and resumed there to step 3; its step-3
    checkpoint copied to `exported` and turned into an HF folder by --export_only."""
    root = tmp_path_factory.mktemp("resume")
    full, cut, exported = checks / "full", root / "cut", root / "exported"
    shutil.copytree(full / "checkpoints" / "step_000002", cut / "checkpoints" / "step_000002")
    shutil.copytree(full / "checkpoints" / "step_000003", exported / "checkpoints" / "step_000003")
    (cut / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows(full / "metrics.jsonl")[:2]))  # fmt: skip
    # a crash while saving step 4 left a half-written checkpoint: it must be ignored
    os.makedirs(cut / "checkpoints" / "step_000004.tmp")
    os.makedirs(cut / "checkpoints" / "step_000005")  # no trainer.json: incomplete
    assert fsdp.latest_checkpoint(str(cut)).endswith("step_000002")
    torchrun(2, "resume", str(cut), tiny_path, str(exported))
    return full, cut, exported


@pytest.mark.slow
def test_each_stage_learns_and_bad_rows_are_counted(stages, tiny_path):
    out, log = stages
    for stage, steps in (("sft", 3), ("1", 2), ("2", 3)):
        got = rows(out / f"stage-{stage}" / "metrics.jsonl")
        assert all(r["grad_norm"] > 1e-3 for r in got), [r["grad_norm"] for r in got]
        assert [r["step"] for r in got] == list(range(1, steps + 1)) and all(
            r["stage"] == stage for r in got
        )
        for r in got:
            assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert os.path.exists(out / f"stage-{stage}" / "export" / "model.safetensors")
    # each stage moved the weights it started from
    starts = [tiny_path, *(out / f"stage-{s}" / "export" for s in ("sft", "1", "2"))]
    assert all(
        moved(weights(a), weights(b)) > 1e-4 for a, b in zip(starts, starts[1:], strict=False)
    )
    rl = rows(out / "stage-1" / "metrics.jsonl") + rows(out / "stage-2" / "metrics.jsonl")
    needed = {"reward", "format", "acc_o1", "acc_final", "gen_wc", "train_wc", "clip_low", "clip_high",
              "kl_o1", "grad_norm", "lr", "logprob_gap", "time_generate", "time_score", "time_augment",
              "time_logprobs", "time_update", "time_sync", "response_len", "val_acc_final",
              "splice_too_long"}  # fmt: skip
    assert needed <= set(rl[1]), needed - set(rl[1])
    # the engine serves the trainer's newest weights at every step, though they move each step:
    # its log-probs match the trainer's old log-probs (exactly, here: 0.0 on CPU in fp32)
    assert all(r["logprob_gap"] < 1e-3 for r in rl), [r["logprob_gap"] for r in rl]
    # n = 4 generated, up to N = 8 trained: a 3-step cold start seldom gives splicable parts
    assert all(4 <= r["samples_per_prompt"] <= 8 for r in rl)
    # kl_tokens="response" in Stage II: a KL on every token to the stage's start (0 in a step's
    # first mini-batch only, at the start; Stage II's default has none)
    s2 = rows(out / "stage-2" / "metrics.jsonl")
    assert all(r["kl_o1"] > 1e-5 for r in s2), [r["kl_o1"] for r in s2]
    # Stage I: an image broken after its header is left out of each step, named and counted,
    # and both ranks run the same collectives (3 groups on one, 4 on the other)
    s1 = rows(out / "stage-1" / "metrics.jsonl")
    assert all(r["bad_images"] == 1 and r["data_skipped"] == 0 for r in s1), s1
    assert "1 prompts left out, an image does not decode: r3:" in log
    assert "stage1.jsonl:row 4: field image[0]: unreadable image" in log
    # Stage II's file: 3 rows skipped at load, the too-long one named with the flag's value
    assert all(r["data_skipped"] == 3 for r in s2)
    assert "too-long" in log and "--max_prompt_len 300" in log
    # some mini-batch put an image prompt on one rank and a text prompt on the other
    cfg = preset("demo-2", prompts_per_step=4, mini_batch_prompts=2)
    order = [prompts_of_step(8, s, 4, cfg.seed) for s in range(3)]
    has_image = [[i < 4 for i in o] for o in order]  # rows 0-3 have images (load order)
    assert any(h[k] != h[k + 1] for h in has_image for k in (0, 2))
    # the cold start keeps the engine asleep through its updates (it wakes only to validate)
    assert all(r["engine_asleep"] == 1.0 for r in rows(out / "stage-sft" / "metrics.jsonl"))
    # --keep_checkpoints 2 with a checkpoint every step: only the newest two are left
    ckpts = sorted(os.listdir(out / "stage-sft" / "checkpoints"))
    assert ckpts == ["step_000002", "step_000003"]
    # the method at work: trained groups written as readable text every step
    dumped = rows(out / "stage-1" / "samples.jsonl")
    assert len(dumped) == 2 * 2  # 2 steps x --dump_groups 2 (rank 0 holds 3 or 4 of the 8)
    sample = dumped[0]["samples"][0]
    assert {"kind", "reward", "advantage", "trains", "trained_text"} <= set(sample)
    assert any(s["advantage"] != 0 for d in dumped for s in d["samples"])


@pytest.mark.slow
def test_gradient_is_the_same_on_one_and_two_ranks(checks):
    # different token budgets and packings too: the micro-batches differ as well as the ranks
    one = "600:seq:tree,250:token:prompt,400:seq:sample"
    two = "1200:seq:prompt,500:token:tree,300:seq:tree"
    for a, b in zip(one.split(","), two.split(","), strict=True):
        ga = torch.load(checks / f"grads_world1_{a.replace(':', '_')}.pt")
        gb = torch.load(checks / f"grads_world2_{b.replace(':', '_')}.pt")
        assert ga.keys() == gb.keys() and len(ga) > 50
        worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
        scale = max(ga[k].abs().max().item() for k in ga)
        assert scale > 1e-4 and worst < 1e-6 * max(scale, 1.0), (a, b, worst, scale)
    # the KL of Stage I is in these gradients: its k3 terms sit below the clamp, where they
    # have a gradient (demo-1's kl_coef is 0.01)
    kl = json.load(open(checks / "kl_terms.json"))
    assert kl["n"] >= 4 and kl["below_clamp"] == kl["n"], kl
    # a group packed as a tree and one prompt per sample give the same gradient (seq, two budgets)
    shared = torch.load(checks / "grads_world1_600_seq_tree.pt")
    per_sample = torch.load(checks / "grads_world1_400_seq_sample.pt")
    worst = max((shared[k] - per_sample[k]).abs().max().item() for k in shared)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_tree_and_prompt_packing_end_two_stage1_and_two_stage2_updates_in_the_same_weights(checks):
    got = json.loads((checks / "packing.json").read_text())
    tokens = got["tokens"]  # the tree ran each shared o1 + SC once
    assert tokens["tree"] < 0.8 * tokens["prompt"] < 0.8 * tokens["sample"], got
    # the same weights up to float rounding: no farther apart than two other exact packings
    # (within a factor for the noise), and far below how much the four updates moved them
    assert got["tree_vs_prompt"] < 3 * got["prompt_vs_sample"] + 1e-6, got
    assert got["tree_vs_prompt"] < 0.01 * got["moved"], got


@pytest.mark.slow
def test_stage1_gradient_is_its_policy_part_plus_the_kl_over_the_kl_count(checks):
    report = json.loads((checks / "normalizers.json").read_text())
    for agg, r in report.items():
        # the two counts differ, so swapping the normalizers would show; the KL part is large
        assert r["policy_count"] != r["kl_count"] and r["kl_scale"] > 1e-3 * r["scale"] > 0, r
        assert r["worst"] < 1e-6 * max(r["scale"], 1.0), (agg, r)


@pytest.mark.slow
def test_load_model_reads_the_checkpoint_on_rank_0_only(checks):
    r0 = json.loads((checks / "load_rank0.json").read_text())
    r1 = json.loads((checks / "load_rank1.json").read_text())
    assert r0["weights_equal"] is True and r0["n"] > 50
    assert r0["buffers_equal"] and r1["buffers_equal"]  # rotary frequencies reached rank 1 too


@pytest.mark.slow
def test_checkpointing_acts_in_the_update_and_the_first_minibatch_is_on_policy(checks):
    report = json.loads((checks / "update.json").read_text())
    on, off = report["checkpointing=True"], report["checkpointing=False"]
    assert on["grad_norm"] > 0 and off["grad_norm"] > 0
    assert on["logprobs_pass"] == off["logprobs_pass"] > 0  # eval mode: never recomputed
    assert on["update"] == 2 * off["update"] > 0  # each layer runs again in the backward
    for r in (on, off):  # old log-probs = the update's own, detached: the ratio is exactly 1
        assert r["ratio"] == 1.0 and r["clip_low"] == 0.0 and r["clip_high"] == 0.0
        assert r["old_filled"]


@pytest.mark.slow
def test_a_checkpoint_restores_weights_optimizer_schedule_and_rngs(checks):
    for rank in (0, 1):
        r = json.loads((checks / f"round_trip_rank{rank}.json").read_text())
        assert all(n > 0 for n in r["grad_norms"]), r
        assert r["step"] == 1
        # each of these moved between the save and the load, and the load put each back
        assert all(r["changed"].values()), r["changed"]
        assert all(r["same"].values()), r["same"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(resumed, tiny_path):
    full, cut, _ = resumed
    a, b = rows(full / "metrics.jsonl"), rows(cut / "metrics.jsonl")
    assert all(r["grad_norm"] > 1e-3 for r in a), [r["grad_norm"] for r in a]
    assert moved(weights(tiny_path), weights(full / "export")) > 1e-4
    # 2 warm-up steps then cosine (factors 2/3, 1, 0 after each step): step 3 runs at the full
    # rate, which a resume that lost the scheduler's state (1/3) would not
    assert [r["lr"] for r in a] == pytest.approx([2e-3 / 3, 1e-3, 0.0])
    # the engine serves the weights of every update (they move every step)
    assert all(r["logprob_gap"] < 1e-3 for r in a), [r["logprob_gap"] for r in a]
    assert [r["step"] for r in b] == [1, 2, 3]  # the resumed run did only step 3
    skip = {k for k in a[2] if k.startswith("time_")}
    assert {k: v for k, v in a[2].items() if k not in skip} == {
        k: v for k, v in b[2].items() if k not in skip
    }
    wa, wb = weights(full / "export"), weights(cut / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_export_only_writes_the_newest_checkpoint(resumed, tiny_path):
    full, _, exported = resumed
    trained = weights(full / "export")  # the run's own export after step 3
    assert moved(weights(tiny_path), trained) > 1e-4  # not the initial model
    got = weights(exported / "export")  # --export_only of the step-3 checkpoint alone
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in got)


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
    assert [real for _, real in got] == [True, True, False, False, False]
    assert sorted(i for b, real in got if real for i in b) == [0, 1, 2]
    assert all(b == [] for b, real in got if not real)  # no item: the caller runs a dummy


def test_backward_scales_by_the_world_size_and_zeroes_dummy_passes(monkeypatch):
    """FSDP averages gradients over ranks while the loss is already normalized over all of
    them: a real pass is scaled by the world size, a pass that only keeps ranks in step by 0."""
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 4)
    for real, expected in ((True, 4.0 * 3.0), (False, 0.0)):
        w = torch.tensor(2.0, requires_grad=True)
        train.backward(w * 3.0, real)  # d(3w)/dw = 3
        assert w.grad.item() == expected
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
    monkeypatch.delenv("MASTER_PORT", raising=False)
    rank, world, device = fsdp.setup_distributed()
    # CPU-side counts and metrics need gloo; NCCL alone fails on a CPU tensor
    assert calls["backend"] == "cpu:gloo,cuda:nccl" and calls["device_id"] == torch.device(
        "cuda", 3
    )
    assert device == torch.device("cuda", 3) and calls["timeout"].total_seconds() >= 1800
    # without torchrun a world of one meets in memory: no port two test workers could both take
    assert calls["world_size"] == 1 and isinstance(calls["store"], fsdp.dist.HashStore)
    calls.clear()
    monkeypatch.setenv("MASTER_PORT", "29400")  # under torchrun: its env:// rendezvous
    fsdp.setup_distributed()
    assert calls["backend"] == "cpu:gloo,cuda:nccl" and "store" not in calls


def test_check_config_refuses_what_cannot_run():
    check_config(preset("octopus-8b-stage1"), 8)
    with pytest.raises(ValueError, match="tensor_parallel must be 1"):
        check_config(preset("octopus-8b-stage1", tensor_parallel=2), 8)
    with pytest.raises(ValueError, match="multiple of"):
        check_config(preset("octopus-8b-stage1", mini_batch_prompts=100), 8)


def test_every_flag_has_help_and_one_spelling():
    import dataclasses

    from config import Config

    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))
    name, overrides, flags = parse_args(
        ["--preset", "gspo-n16", "--lr", "2e-6", "--packing", "prompt"]
    )
    assert name == "gspo-n16" and overrides == {"lr": 2e-6, "packing": "prompt"}
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


# --------------------------------------------------------------------------- one step's parts,
# in process: a scripted engine returns known texts and a world of one stands in for the group


@pytest.fixture
def one_rank(monkeypatch):
    """torch.distributed as a world of one, whether or not a group exists in this process."""
    monkeypatch.setattr(fsdp.dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(
        fsdp.dist, "all_gather_object", lambda out, obj, *a: out.__setitem__(0, obj)
    )
    monkeypatch.setattr(fsdp.dist, "all_reduce", lambda tensor, *a, **k: None)


def part(n) -> str:
    """One well-formed answer: <think> ... </think> \\boxed{n}."""
    return f"<think>\nI count {n}.\n</think>\n\n\\boxed{{{n}}}"


class ScriptedEngine:
    """Returns `texts` in order, `n` per prompt, and records the sampling it was asked for."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tok, self.texts, self.calls = tokenizer, texts, []

    def generate(self, prompts, n, sampling, prefixes=None, image_size=None):
        from rollout import Rollout

        self.calls.append(sampling)
        eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        out = []
        for k in range(len(prompts)):
            group = []
            for text in self.texts[k * n : (k + 1) * n]:
                ids = self.tok.encode(text, add_special_tokens=False) + [eos]
                group.append(Rollout(ids, [-0.5] * len(ids), text, "stop"))
            out.append(group)
        return out


def scripted_trainer(processor, cfg, texts, val=()):
    from data import synthetic_task

    engine = ScriptedEngine(processor.tokenizer, texts)
    _, sched = train.make_optimizer(torch.nn.Linear(1, 1), cfg, 10)
    return train.Trainer(cfg, None, None, sched.optimizer, sched, engine, processor,
                         torch.device("cpu"), synthetic_task(1), list(val))  # fmt: skip


def three(example: dict) -> dict:
    return {**example, "answer": "3"}


# the README's worked example: w->c, c->c (o2 repeats o1), w->w, no correction; the answer is 3
WORKED = [part(2) + SC + part(3), part(3) + SC + part(3), part(4) + SC + part(5), part(3)]


def test_validate_counts_each_transition_where_it_happened(processor, one_rank):
    from data import synthetic_task

    texts = [part(2) + SC + part(3), part(2) + SC + part(3), part(3) + SC + part(4), part(3)]
    cfg = preset("demo-1", val_n=4)
    t = scripted_trainer(processor, cfg, texts, [three(synthetic_task(1)[0])])
    got = train.validate(t, 0)
    assert got["val_wc"] == 2 / 4 and got["val_cw"] == 1 / 4
    assert got["val_acc_o1"] == 2 / 4 and got["val_acc_final"] == 3 / 4
    assert got["val_corrects_itself"] == 3 / 4 and got["val_sc_format"] == 3 / 4
    assert got["val_format"] == 1.0
    assert got["val_reward"] == pytest.approx((3 * 1.0 + 0.1) / 4)  # 0.9 acc + 0.1 fmt
    (sampling,) = t.engine.calls  # the paper's validation sampling, not training's
    assert (sampling.temperature, sampling.top_p) == (cfg.val_temperature, cfg.val_top_p) != (1, 1)


def worked_group(processor, cfg):
    """The README's worked example as train.py builds it: the scripted trainer and the one group
    `make_group` makes from its four rollouts."""
    from data import synthetic_task
    from rollout import render_prompt

    t = scripted_trainer(processor, cfg, WORKED)
    example = three(synthetic_task(1)[0])
    prompt = render_prompt(processor, example["messages"])
    (rollouts,) = t.engine.generate([prompt], 4, None)
    scores = train.score_rollouts(t, [example], [rollouts])[0]
    return t, train.make_group(t, example, prompt, rollouts, scores, random.Random(0))


def test_step_metrics_of_the_worked_example(processor, one_rank):
    t, group = worked_group(
        processor, preset("demo-1", n_rollouts=4, n_train=8, max_response_len=200)
    )
    # the trainer 0.25 above the engine on the originals (the first samples)
    group.old_logps = [torch.tensor(r.logprobs) + 0.25 for r in group.rollouts]
    clock = fsdp.Clock()
    clock.seconds = {"generate": 2.0, "update": 1.0}
    stats = [
        {"grad_norm": 2.0, "loss": 0.5, "skipped_steps": 0.0},
        {"grad_norm": 4.0, "loss": 1.5, "skipped_steps": 1.0},
    ]
    got = train.step_metrics(t, [group], stats, clock)
    assert got["reward"] == pytest.approx((1.0 + 0.55 + 0.1 + 0.55) / 4)
    assert got["acc_o1"] == 2 / 4 and got["acc_final"] == 3 / 4  # o1: r1, r3; final: r0, r1, r3
    assert got["corrects_itself"] == 3 / 4 and got["logprob_gap"] == pytest.approx(0.25)
    # transitions before splicing (r0 w->c, r1 c->c, r2 w->w) and among the 8 trained samples
    assert [got[f"gen_{k}"] for k in ("wc", "cc", "cw", "ww")] == [1, 1, 0, 1]
    assert [got[f"train_{k}"] for k in ("wc", "cc", "cw", "ww")] == [2, 1, 2, 2]
    assert got["samples_per_prompt"] == 8
    assert got["grad_norm"] == 3.0 and got["loss"] == 1.0
    assert got["skipped_steps"] == 1.0  # the mini-batches' skips add up, the ranks' do not
    assert got["time_generate"] == 2.0 and got["lr"] == t.scheduler.get_last_lr()[0]


@pytest.mark.parametrize("kl_tokens", ["o1", "response"])
def test_kl_tokens_response_puts_the_kl_on_every_token_of_stage2(processor, one_rank, kl_tokens):
    cfg = preset("demo-2", n_rollouts=4, n_train=8, max_response_len=200, kl_tokens=kl_tokens)
    _, group = worked_group(processor, cfg)
    kl = [m.tolist() for m in group.kl_masks]
    if kl_tokens == "o1":  # Stage II has no KL (Sec. 4.3)
        assert all(sum(m) == 0 for m in kl)
    else:  # the released GRPO runs: k3 on every response token
        assert all(m == [1.0] * len(s.ids) for m, s in zip(kl, group.samples, strict=True))


def test_export_only_exports_and_trains_nothing(monkeypatch):
    called = []
    monkeypatch.setattr(train, "export_only", lambda cfg: called.append(("export", cfg.out_dir)))
    monkeypatch.setattr(train, "run_sequence", lambda stages: called.append(("train", None)))
    # main ends by destroying the process group: not this session's (the shared engine's)
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda *a: None)
    train.main(["--preset", "demo", "--export_only", "--out_dir", "x"])
    assert called == [("export", os.path.join("x", "stage-2"))]  # a sequence: its last stage


@pytest.mark.parametrize("case", ["missing", "empty folder", "every row bad"])
def test_unusable_training_data_stops_before_loading_anything(
    case, tiny_path, tmp_path, monkeypatch, capsys
):
    def refuse(*a, **k):
        raise AssertionError("loaded a model for data that cannot train")

    monkeypatch.setattr(train, "setup_distributed", lambda: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(train, "load_model", refuse)
    monkeypatch.setattr(train, "VLLMEngine", refuse)
    path = tmp_path / "data"
    if case == "empty folder":
        path.mkdir()
    elif case == "every row bad":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"question": "How many?"}\nnot json\n')
    cfg = preset("demo-2", model=tiny_path, train_data=str(path), val_data="",
                 out_dir=str(tmp_path / "run"))  # fmt: skip
    expected = {"missing": (FileNotFoundError, f"dataset not found: {path}"),
                "empty folder": (FileNotFoundError, f"no .* data files under {path}"),
                "every row bad": (SystemExit, f"{path}: no usable training rows \\(2 skipped\\)")}  # fmt: skip
    error, message = expected[case]
    with pytest.raises(error, match=message):
        train.build_trainer(cfg)
    if case == "every row bad":  # and why, row by row
        out = capsys.readouterr().out
        assert "bad.jsonl:row 1: no answer" in out and "bad.jsonl:row 2: invalid JSON" in out

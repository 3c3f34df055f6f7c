"""Run under torchrun by test_train.py: `MODE OUT_DIR TINY_PATH [args]`.

    stages OUT TINY DATA DATA1      cold start -> Stage I (on DATA1) -> Stage II (on DATA), 2 ranks
    resume OUT TINY EXPORT_FROM     resume OUT to step 3, then `--export_only` of EXPORT_FROM
    checks OUT TINY                 fixed-group gradients and the checks built on them
                                    (world 1: the Stage I normalizers, gradient checkpointing;
                                    world 2: rank-0 loading, a checkpoint round trip,
                                    then OUT/full: a 3-step Stage II run that saves a
                                    checkpoint every step)

The RL modes grade with `varying_reward`: on the random tiny model every rollout would get the
same reward, every advantage would be 0 and no weight would move, so resuming, syncing the
engine or the KL of Stage II could break unseen.
"""

import dataclasses
import hashlib
import json
import os
import random
import sys

import torch
import torch.distributed as dist
from train_items import fixed_groups

import config
import fsdp
import train
from config import preset
from loss import kl_k3

mode, out_dir, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="synthetic:8",
    prompts_per_step=4, mini_batch_prompts=2, n_rollouts=4, n_train=8, max_prompt_len=384,
    max_response_len=24, kv_cache_gb=0.1, val_every=2, save_every=0, lr=1e-3, warmup_steps=1,
    sft_batch=4, gradient_checkpointing=True, out_dir=out_dir, dump_every=1,
)  # fmt: skip


def small(name="demo-1", **kw):
    return preset(name, **dict(SMALL, **kw))


def varying_reward(score_batch):
    """reward.score_batch with the reward replaced by a number in [0, 1) drawn from the text's
    md5: deterministic on every rank and run, different for different rollouts."""

    def scored(texts, truths, **kw):
        out = score_batch(texts, truths, **kw)
        return [dataclasses.replace(s, reward=int(hashlib.md5(t.encode()).hexdigest()[:8], 16)
                                    / 16**8) for s, t in zip(out, texts, strict=True)]  # fmt: skip

    return scored


def trainer_for(cfg, processor, device, ref=True):
    model = fsdp.load_model(tiny, device, gradient_checkpointing=cfg.gradient_checkpointing)
    ref_model = fsdp.load_model(tiny, device, trainable=False) if ref else None
    opt, sched = train.make_optimizer(model, cfg, 10)
    return train.Trainer(cfg, model, ref_model, opt, sched, None, processor, device, [], [])


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def save_json(name: str, value) -> None:
    if dist.get_rank() == 0:
        with open(f"{out_dir}/{name}", "w") as f:
            json.dump(value, f)


def fixed_group_gradients(processor, device, specs: str) -> None:
    """The summed gradient of the same fixed groups, for each `budget:agg:packing` spec."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for spec in specs.split(","):
        budget, agg, packing = spec.split(":")
        cfg = small(update_token_budget=int(budget), agg=agg, packing=packing)
        t = trainer_for(cfg, processor, device)
        groups = fixed_groups(processor)[rank::world]
        train.accumulate_gradients(t, groups)
        grads = gradients(t.model)
        if rank == 0:
            torch.save(grads, f"{out_dir}/grads_world{world}_{spec.replace(':', '_')}.pt")
    if world == 1:  # the KL's terms these gradients hold (the same groups and weights for
        k3 = []  # every spec): below the clamp of 10, where they have a gradient
        for group, lps in zip(groups, train.logprobs(t, groups), strict=True):
            for lp, ref, kl_mask in zip(lps, group.ref_logps, group.kl_masks, strict=True):
                k3 += kl_k3(lp, ref)[kl_mask > 0].tolist()
        save_json("kl_terms.json", {"n": len(k3), "below_clamp": sum(x < 10.0 for x in k3)})


def packing_equivalence(processor, device) -> dict:
    """Two Stage I then two Stage II updates of one Octopus group (splices that share o1 + SC
    with their originals) from the same start, packed each way. The packings are exact, so
    they end in the same weights up to float rounding, which AdamW magnifies on weights with a
    near-zero gradient: the tree's distance to the prompt packing is set against the distance
    between two other exact packings (prompt, sample) and against how far the weights moved."""
    from data import synthetic_task
    from octopus import SC
    from packing import pack
    from rollout import Rollout, render_prompt

    def part(n, words):  # o1 / o2 long enough that a shared o1 + SC is worth a node of its own
        think = " ".join(["I look at each dot in turn"] * words)
        return f"<think>\n{think}: {n}.\n</think>\n\n\\boxed{{{n}}}"

    texts = [part(2, 8) + SC + part(3, 6), part(3, 7) + SC + part(3, 9), part(4, 9) + SC + part(5, 5),
             part(3, 6)]  # fmt: skip
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok.encode(t, add_special_tokens=False) + [eos] for t in texts]
    rollouts = [Rollout(r, [], t, "stop") for r, t in zip(ids, texts, strict=True)]
    example = {**synthetic_task(1)[0], "answer": "3"}
    prompt = render_prompt(processor, example["messages"])
    scores = train.score_batch(texts, ["3"] * 4)
    rows: list[int] = []

    def counting(segments, rope_index, packing):  # train.pack, counting the packed tokens
        packed = pack(segments, rope_index, packing)
        rows.append(packed.inputs["input_ids"].shape[1])
        return packed

    weights, tokens = {}, {}
    for packing in ("tree", "prompt", "sample"):
        state, rows[:] = None, []
        for name in ("demo-1", "demo-2"):  # Stage I (KL on o1), then Stage II
            cfg = small(name, packing=packing, n_rollouts=4, n_train=8, max_response_len=400,
                        lr=1e-4, warmup_steps=0)  # fmt: skip
            t = trainer_for(cfg, processor, device, ref=cfg.uses_reference)
            if state is not None:
                t.model.load_state_dict(state)
            for step in range(2):
                group = train.make_group(t, example, prompt, rollouts, scores, random.Random(step))
                if t.ref_model is not None:
                    group.ref_logps = train.logprobs(t, [group], t.ref_model)[0]
                train.pack = counting
                train.update(t, [group], on_policy=True)
                train.pack = pack
            state = t.model.state_dict()
        weights[packing] = {k: v.full_tensor() for k, v in state.items()}
        tokens[packing] = sum(rows)
    start = {k: v.full_tensor() for k, v in fsdp.load_model(tiny, device).state_dict().items()}

    def distance(a, b):  # the L2 norm of the difference over all weights
        return sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a) ** 0.5

    return {"tree_vs_prompt": distance(weights["tree"], weights["prompt"]),
            "prompt_vs_sample": distance(weights["prompt"], weights["sample"]),
            "moved": distance(weights["tree"], start), "tokens": tokens}  # fmt: skip


def stage1_normalizers(processor, device) -> dict:
    """accumulate_gradients' Stage I gradient against its two parts computed apart: the policy
    loss of a trainer without a reference (its own normalizer), plus kl_coef x the k3 KL written
    out here, each sequence's (agg "seq") or token's (agg "token") terms over the KL count of the
    whole batch. Swapping the two normalizers in the Stage I loss changes the first only."""
    report = {}
    for agg in ("seq", "token"):
        cfg = small(update_token_budget=300, agg=agg, kl_coef=0.5)
        t = trainer_for(cfg, processor, device)
        groups = fixed_groups(processor)
        # a reference near the policy: k3 is clamped at 10, where it has no gradient, and the
        # fixed groups' random reference log-probs sit there
        noise = torch.Generator().manual_seed(1)
        for group, lps in zip(groups, train.logprobs(t, groups), strict=True):
            group.ref_logps = [lp + 0.5 * torch.randn(lp.shape, generator=noise) for lp in lps]
        train.accumulate_gradients(t, groups)
        full = gradients(t.model)
        t.model.zero_grad(set_to_none=True)
        ref, t.ref_model = t.ref_model, None
        train.accumulate_gradients(t, groups)
        policy = gradients(t.model)
        t.model.zero_grad(set_to_none=True)
        t.ref_model = ref
        kl_masks = [m for g in groups for m in g.kl_masks]
        policy_masks = [m for g in groups for m in g.policy_masks]
        kl_count = sum(float(m.sum() > 0) if agg == "seq" else float(m.sum()) for m in kl_masks)
        sequences = [(g.prompt, [s.ids for s in g.samples]) for g in groups]
        for segments, logps, real in train.forward_micro_batches(t, t.model, sequences, 300):
            total = 0.0
            for (g, k), lp in zip([(g, k) for g, ks in segments for k in ks], logps, strict=True):
                ref, kl_mask = groups[g].ref_logps[k], groups[g].kl_masks[k]
                d = ref - lp
                k3 = ((torch.exp(d) - d - 1.0).clamp(-10.0, 10.0) * kl_mask).sum()
                total = total + (k3 / kl_mask.sum().clamp(min=1) if agg == "seq" else k3)
            train.backward(cfg.kl_coef * total / kl_count, real)
        kl = gradients(t.model)
        worst = max((full[k] - policy[k] - kl[k]).abs().max().item() for k in full)
        report[agg] = {
            "worst": worst,
            "scale": max(full[k].abs().max().item() for k in full),
            "kl_scale": max(kl[k].abs().max().item() for k in kl),
            "policy_count": sum(float(m.sum() > 0) for m in policy_masks)
            if agg == "seq"
            else sum(float(m.sum()) for m in policy_masks),
            "kl_count": kl_count,
        }
    return report


def checkpointing(processor, device) -> dict:
    """Layer-0 forwards in the log-prob pass and in the update, with and without gradient
    checkpointing, and the on-policy first mini-batch's ratio."""
    report = {}
    for flag in (True, False):
        cfg = small(gradient_checkpointing=flag)
        t = trainer_for(cfg, processor, device, ref=False)
        layer = t.model.model.language_model.layers[0]
        calls = []
        handle = layer.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        groups = fixed_groups(processor, n_groups=2)
        train.logprobs(t, groups)
        for g in groups:
            g.old_logps = [None] * len(g.samples)  # the on-policy update must fill these itself
        in_logprobs = len(calls)
        stats = train.update(t, groups, on_policy=True)
        report[f"checkpointing={flag}"] = {"logprobs_pass": in_logprobs,
                                           "update": len(calls) - in_logprobs,
                                           "ratio": stats["ratio"], "clip_low": stats["clip_low"],
                                           "clip_high": stats["clip_high"],
                                           "grad_norm": stats["grad_norm"],
                                           "old_filled": all(lp is not None for g in groups for lp in g.old_logps)}  # fmt: skip
        handle.remove()
    return report


def rank0_loading(device) -> dict:
    """Rank 0 alone reads the weights; every rank ends with all of them (and the buffers)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    rank = dist.get_rank()
    original = Qwen3VLForConditionalGeneration.from_pretrained
    if rank != 0:

        def refuse(*a, **k):
            raise AssertionError("only rank 0 may read the checkpoint")

        Qwen3VLForConditionalGeneration.from_pretrained = refuse
    model = fsdp.load_model(tiny, device)
    Qwen3VLForConditionalGeneration.from_pretrained = original
    full = dict(fsdp.full_weights(model))
    fresh = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(tiny))
    same_buffers = all(
        torch.equal(b, dict(fresh.named_buffers())[n]) for n, b in model.named_buffers()
    )
    same = None
    if rank == 0:
        reference = original(tiny).state_dict()
        same = full.keys() == reference.keys() and all(
            torch.equal(full[k], reference[k]) for k in reference
        )
    return {"weights_equal": same, "buffers_equal": same_buffers, "n": len(full)}


def checkpoint_round_trip(processor, device) -> dict:
    """save_checkpoint, then another update, scheduler step and random draws, then
    load_checkpoint: weights, optimizer moments, learning rate and both RNGs are back."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = small(lr_schedule="cosine", warmup_steps=2)
    t = trainer_for(cfg, processor, device, ref=False)
    groups = fixed_groups(processor)[rank::world]

    def step():
        for g in groups:
            g.old_logps = [None] * len(g.samples)
        norm = train.update(t, groups, on_policy=True)["grad_norm"]
        t.scheduler.step()
        return norm

    def state():
        name, p = next((n, p) for n, p in t.model.named_parameters() if p.requires_grad)
        moment = t.optimizer.state[p]["exp_avg"]
        return {"weight": p.full_tensor().clone(), "exp_avg": moment.full_tensor().clone(),
                "lr": t.scheduler.get_last_lr()[0], "random": random.random(),
                "torch": torch.rand(3)}  # fmt: skip

    norms = [step()]
    path = fsdp.save_checkpoint(f"{out_dir}/round_trip", 1, t.model, t.optimizer, t.scheduler)
    saved = state()  # draws once from each RNG: load must rewind them to before these draws
    norms.append(step())
    moved = state()
    at = fsdp.load_checkpoint(path, t.model, t.optimizer, t.scheduler)
    loaded = state()
    same = {k: bool(torch.equal(saved[k], loaded[k])) if isinstance(saved[k], torch.Tensor)
            else saved[k] == loaded[k] for k in saved}  # fmt: skip
    changed = {k: bool(not torch.equal(saved[k], moved[k])) if isinstance(saved[k], torch.Tensor)
               else saved[k] != moved[k] for k in saved}  # fmt: skip
    return {"step": at, "same": same, "changed": changed, "grad_norms": norms}


# The resumed runs' schedule: 2 warm-up steps, then cosine to 0 at step 3. Its factors at steps
# 0, 1, 2 are 1/3, 2/3, 1: a resume that lost the scheduler's state would run step 3 at 1/3.
SCHEDULE = dict(lr_schedule="cosine", warmup_steps=2)

if mode in ("stages", "resume"):
    train.score_batch = varying_reward(train.score_batch)
if mode == "stages":  # every stage runs a few steps, Stage II on a file with bad rows
    stages = [
        # the engine is built here and reused by the later stages: run_sequence sizes it for
        # Stage II's two-image rows (a cold start's one-image limit would refuse them)
        small("demo-sft", max_steps=3, save_every=1, keep_checkpoints=2,
              keep_finished_checkpoints=True),
        # Stage I on 8 one-image rows, one truncated after its header: the rank that draws it
        # trains 3 groups (mini-batches of 1 and 2), the other 4 (2 and 2), in step
        small("demo-1", max_steps=2, train_data=sys.argv[5], prompts_per_step=8,
              mini_batch_prompts=4),
        # the grpo-n16-released way of KL: on every response token, in Stage II
        small("demo-2", max_steps=3, train_data=sys.argv[4], val_data="", max_prompt_len=300,
              kl_tokens="response", kl_coef=0.5),
    ]  # fmt: skip
    stages = [c.replace(out_dir=f"{out_dir}/stage-{c.stage}") for c in stages]
    engine = train.run_sequence(stages)
    engine.close()
elif mode == "resume":  # the newest checkpoint of OUT to step 3; then --export_only of another
    cfg = small("demo-2", max_steps=3, resume=True, **SCHEDULE)
    _, engine = train.run_stage(cfg)
    name, overrides, flags = config.parse_args(
        ["--preset", "demo-2", "--model", tiny, "--out_dir", sys.argv[4], "--export_only"]
    )
    assert flags["export_only"]
    train.export_only(config.stage_configs(name, overrides)[-1])
    engine.close()
elif mode == "checks":
    from transformers import AutoProcessor

    rank, world, device = fsdp.setup_distributed()
    processor = AutoProcessor.from_pretrained(tiny)
    if world == 1:
        fixed_group_gradients(processor, device, "600:seq:tree,250:token:prompt,400:seq:sample")
        save_json("normalizers.json", stage1_normalizers(processor, device))
        save_json("packing.json", packing_equivalence(processor, device))
        save_json("update.json", checkpointing(processor, device))
    else:
        fixed_group_gradients(processor, device, "1200:seq:prompt,500:token:tree,300:seq:tree")
        with open(f"{out_dir}/load_rank{rank}.json", "w") as f:
            json.dump(rank0_loading(device), f)
        report = checkpoint_round_trip(processor, device)
        with open(f"{out_dir}/round_trip_rank{rank}.json", "w") as f:
            json.dump(report, f)
    dist.barrier()  # every rank's files are written before any rank tears down
    if world > 1:  # the run the resume tests cut (a launch of its own would cost a start-up)
        train.score_batch = varying_reward(train.score_batch)
        cfg = small(
            "demo-2",
            max_steps=3,
            save_every=1,
            out_dir=f"{out_dir}/full",
            keep_finished_checkpoints=True,
            **SCHEDULE,
        )
        _, engine = train.run_stage(cfg)
        engine.close()  # takes the default process group along
    if dist.is_initialized():
        dist.destroy_process_group()
    # once in CI, with every file written, rank 1 aborted in interpreter teardown ("terminate
    # called without an active exception": a C++ thread still joinable at exit); the checks'
    # results are on disk, so leave without the teardown
    os._exit(0)
else:
    raise SystemExit(f"unknown mode {mode}")

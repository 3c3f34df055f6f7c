"""Run under torchrun by test_train.py: `MODE OUT_DIR TINY_PATH [args]`."""

import json
import sys

import torch
import torch.distributed as dist
from train_items import fixed_groups

import fsdp
import train
from octopus import preset

mode, out_dir, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="synthetic:8",
    prompts_per_step=4, mini_batch_prompts=2, n_rollouts=4, n_train=8, max_prompt_len=384,
    max_response_len=24, kv_cache_gb=0.1, val_every=2, save_every=0, lr=1e-3, warmup_steps=1,
    sft_batch=4, gradient_checkpointing=True, out_dir=out_dir, dump_every=1,
)  # fmt: skip


def small(name="demo-1", **kw):
    return preset(name, **dict(SMALL, **kw))


def trainer_for(cfg, processor, device, ref=True):
    model = fsdp.load_model(tiny, device, gradient_checkpointing=cfg.gradient_checkpointing)
    ref_model = fsdp.load_model(tiny, device, trainable=False) if ref else None
    opt, sched = train.make_optimizer(model, cfg, 10)
    return train.Trainer(cfg, model, ref_model, opt, sched, None, processor, device, [], [])


if mode == "stages":  # every stage runs a few steps, the last on a file with bad rows
    stages = [
        small("demo-sft", max_steps=3, save_every=1, keep_checkpoints=2),
        small("demo-1", max_steps=2),
        small("demo-2", max_steps=2, train_data=sys.argv[4]),
    ]
    stages = [c.replace(out_dir=f"{out_dir}/stage-{c.stage}") for c in stages]
    engine = train.run_sequence(stages)
    engine.close()
elif mode == "run":  # one RL stage; resume and save_every from the command line
    steps, save_every, resume = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    cfg = small("demo-2", max_steps=steps, save_every=save_every, resume=resume)
    _, engine = train.run_stage(cfg.replace(**extra))
    engine.close()
elif mode == "grads":  # the same fixed groups on 1 or 2 ranks: the summed gradient must agree
    from transformers import AutoProcessor

    rank, world, device = fsdp.setup_distributed()
    processor = AutoProcessor.from_pretrained(tiny)
    for spec in sys.argv[4].split(","):
        budget, agg, shared = spec.split(":")
        cfg = small(update_token_budget=int(budget), agg=agg, shared_prompt=shared == "shared")
        t = trainer_for(cfg, processor, device)
        train.accumulate_gradients(t, fixed_groups(processor)[rank::world])
        grads = {
            n: p.grad.full_tensor() for n, p in t.model.named_parameters() if p.grad is not None
        }
        if rank == 0:
            torch.save(grads, f"{out_dir}/grads_world{world}_{spec.replace(':', '_')}.pt")
    dist.destroy_process_group()
elif mode == "load":  # rank 0 alone reads the weights; every rank ends with all of them
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    rank, world, device = fsdp.setup_distributed()
    if rank != 0:

        def refuse(*a, **k):
            raise AssertionError("only rank 0 may read the checkpoint")

        Qwen3VLForConditionalGeneration.from_pretrained = refuse
    model = fsdp.load_model(tiny, device)
    full = dict(fsdp.full_weights(model))
    fresh = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(tiny))
    same_buffers = all(
        torch.equal(b, dict(fresh.named_buffers())[n]) for n, b in model.named_buffers()
    )
    if rank == 0:
        reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny).state_dict()
        same = (
            all(torch.equal(full[k], reference[k]) for k in reference)
            and full.keys() == reference.keys()
        )
    else:
        same = None
    with open(f"{out_dir}/load_rank{rank}.json", "w") as f:
        json.dump({"weights_equal": same, "buffers_equal": same_buffers, "n": len(full)}, f)
    dist.destroy_process_group()
elif mode == "update":  # gradient checkpointing and the on-policy first mini-batch, observed
    from transformers import AutoProcessor

    rank, world, device = fsdp.setup_distributed()
    processor = AutoProcessor.from_pretrained(tiny)
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
            for it in g.items:
                it.old_logp = None  # the on-policy update must fill these itself
        in_logprobs = len(calls)
        stats = train.update(t, groups, on_policy=True)
        report[f"checkpointing={flag}"] = {"logprobs_pass": in_logprobs,
                                           "update": len(calls) - in_logprobs,
                                           "ratio": stats["ratio"], "clip_low": stats["clip_low"],
                                           "clip_high": stats["clip_high"],
                                           "old_filled": all(it.old_logp is not None for g in groups for it in g.items)}  # fmt: skip
        handle.remove()
    with open(f"{out_dir}/update.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()

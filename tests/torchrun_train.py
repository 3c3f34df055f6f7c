"""Run under torchrun by test_train.py: `MODE OUT_DIR TINY_PATH [args]`."""

import sys

import torch
import torch.distributed as dist

import train
from data import synthetic_task
from octopus import preset
from rollout import render_prompt

mode, out_dir, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="synthetic:8",
    prompts_per_step=4, mini_batch_prompts=2, n_rollouts=4, n_train=8, max_prompt_len=384,
    max_response_len=24, kv_cache_gb=0.1, val_every=2, save_every=0, lr=1e-3, warmup_steps=1,
    sft_batch=4, gradient_checkpointing=True, out_dir=out_dir,
)  # fmt: skip


def small(**kw):
    return preset("demo", **dict(SMALL, **kw))


if mode == "stages":  # every stage runs a few steps, the last on a file with bad rows
    cfg = small(stages="sft,1,2", stage_overrides={
        "sft": dict(max_steps=3), "1": dict(max_steps=2),
        "2": dict(max_steps=2, kl_coef=0.0, train_data=sys.argv[4]),
    })  # fmt: skip
    engine = train.run_stages(cfg)
    engine.close()
elif mode == "run":  # one RL stage; resume and save_every from the command line
    steps, save_every, resume = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    _, engine = train.run_stage(
        small(stage="2", kl_coef=0.0, max_steps=steps, save_every=save_every, resume=resume)
    )
    engine.close()
elif mode == "grads":  # the same fixed items on 1 or 2 ranks: the summed gradient must agree
    from transformers import AutoProcessor

    rank, world, device = train.setup_distributed()
    processor = AutoProcessor.from_pretrained(tiny)
    for budget, agg in [(int(b), a) for b, a in (x.split(":") for x in sys.argv[4].split(","))]:
        cfg = small(stage="1", update_token_budget=budget, agg=agg)
        model = train.load_model(tiny, cfg, device)
        ref = train.load_model(tiny, cfg, device, trainable=False)
        t = train.Trainer(cfg, model, ref, None, None, None, processor, device, [], [])
        g = torch.Generator().manual_seed(0)
        items = []
        for k, ex in enumerate(synthetic_task(6, seed=5)):
            prompt = train.encode_prompt(processor, render_prompt(processor, ex["messages"]))
            n = 5 + 3 * k
            ids = torch.randint(
                0, min(processor.tokenizer.all_special_ids), (n,), generator=g
            ).tolist()
            cut = k % 3
            policy = torch.tensor([0.0] * cut + [1.0] * (n - cut))
            kl = torch.tensor([1.0] * (cut // 2) + [0.0] * (n - cut // 2))
            items.append(train.Item(prompt, ids, policy, kl, float(torch.randn(1, generator=g)),
                                    -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5))  # fmt: skip
        train.accumulate_gradients(t, items[rank::world])
        grads = {
            name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None
        }
        if rank == 0:
            torch.save(grads, f"{out_dir}/grads_world{world}_{agg}.pt")
    dist.destroy_process_group()

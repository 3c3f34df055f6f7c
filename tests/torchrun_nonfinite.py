"""Run under torchrun (2 ranks, gloo) by test_nonfinite.py: `OUT_DIR TINY_PATH`.

Writes `report_rank{r}.json`: a NaN put into ONE rank's gradient shard skips the optimizer step
on every rank (weights and AdamW state unchanged, counted), the RL and SFT paths alike; steps
after it apply again; N in a row stop the run. Also the weight gather in bf16 (cast before the
all-gather) and the HF export (dtype, `use_cache`).
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from train_items import fixed_groups
from transformers import AutoProcessor

import fsdp
import train
from config import preset
from data import load_split
from fsdp import Clock

out_dir, tiny = sys.argv[1], sys.argv[2]
rank, world, device = fsdp.setup_distributed()
processor = AutoProcessor.from_pretrained(tiny)
report: dict = {"rank": rank, "world": world}


def trainer(cfg) -> train.Trainer:
    model = fsdp.load_model(tiny, device)
    opt, sched = train.make_optimizer(model, cfg, 10)
    return train.Trainer(cfg, model, None, opt, sched, None, processor, device, [], [])


def snapshot(t) -> dict:
    """This rank's shards of the weights and of AdamW's moments, copied."""
    weights = {n: p.to_local().clone() for n, p in t.model.named_parameters()}
    moments = {
        (n, k): v.to_local().clone() if isinstance(v, DTensor) else v.clone()
        for n, p in t.model.named_parameters()
        for k, v in t.optimizer.state.get(p, {}).items()
    }
    return {"weights": weights, "moments": moments}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finite(s: dict) -> bool:
    return all(torch.isfinite(v).all() for v in s["weights"].values())


def poison_on_rank_1(t):
    """NaN into one element of rank 1's local gradient shard, after the backward: the other
    rank's gradients are all finite."""
    if rank == 1:
        p = next(p for p in t.model.parameters() if p.grad is not None)
        p.grad.to_local().view(-1)[0] = float("nan")


cfg = preset("demo-2", model=tiny, lr=1e-3, warmup_steps=0, max_nonfinite_steps=3,
             update_token_budget=4096, out_dir=out_dir)  # fmt: skip
t = trainer(cfg)
groups = fixed_groups(processor, n_groups=4)[rank::world]
accumulate = train.accumulate_gradients


def poisoned(t, groups, on_policy=False):
    stats = accumulate(t, groups, on_policy=on_policy)
    poison_on_rank_1(t)
    return stats


# -- RL: a clean step, a poisoned one, a clean one; then the limit ----------------------------
steps = []
for kind in ("clean", "poisoned", "clean"):
    train.accumulate_gradients = poisoned if kind == "poisoned" else accumulate
    before = snapshot(t)
    stats = train.update(t, groups)
    after = snapshot(t)
    grads_freed = all(p.grad is None for p in t.model.parameters())
    row = train.step_metrics(t, [], [stats], Clock())
    steps.append({"kind": kind, "skipped": stats["skipped_steps"],
                  "grad_norm_finite": math.isfinite(stats["grad_norm"]),
                  "weights_unchanged": same(before["weights"], after["weights"]),
                  "moments_unchanged": same(before["moments"], after["moments"]),
                  "finite": finite(after), "grads_freed": grads_freed,
                  "row_skipped": row["skipped_steps"], "in_a_row": t.nonfinite_in_a_row})  # fmt: skip
report["rl_steps"] = steps

train.accumulate_gradients = poisoned
errors = []
for _ in range(3):
    try:
        train.update(t, groups)
        errors.append(None)
    except FloatingPointError as e:
        errors.append(str(e))
report["limit_errors"] = errors
report["finite_after_limit"] = finite(snapshot(t))
train.accumulate_gradients = accumulate

# -- SFT: a poisoned sample on rank 1 skips the step; the schedule still advances -------------
sft_cfg = preset("demo-sft", model=tiny, lr=1e-3, warmup_steps=2, sft_batch=2 * world,
                 out_dir=out_dir)  # fmt: skip
s = trainer(sft_cfg)
s.train = load_split("synthetic:8", sft_cfg, processor, seed=0, sft=True)[0]
s.engine = type("Asleep", (), {"asleep": True})()
sft_loss = train.sft_loss


def poisoned_sft_loss(*args, **kwargs):
    loss = sft_loss(*args, **kwargs)
    return loss * float("nan") if rank == 1 else loss


sft_rows = []
for step, kind in enumerate(("poisoned", "clean")):
    train.sft_loss = poisoned_sft_loss if kind == "poisoned" else sft_loss
    before = snapshot(s)
    row = train.sft_step(s, step)
    sft_rows.append({"kind": kind, "skipped": row["skipped_steps"], "lr": row["lr"],
                     "weights_unchanged": same(before["weights"], snapshot(s)["weights"])})  # fmt: skip
train.sft_loss = sft_loss
report["sft_steps"] = sft_rows

# -- the weight gather in the engine's dtype: each shard cast before its all-gather ----------
gathered_dtypes = []
full_tensor = DTensor.full_tensor


def recording_full_tensor(self, *args, **kwargs):
    gathered_dtypes.append(str(self.to_local().dtype))
    return full_tensor(self, *args, **kwargs)


DTensor.full_tensor = recording_full_tensor
bf16 = dict(fsdp.full_weights(s.model, dtype=torch.bfloat16))
DTensor.full_tensor = full_tensor
fp32 = dict(fsdp.full_weights(s.model))
report["gather_dtypes"] = sorted(set(gathered_dtypes))
report["gather_equal_rounded"] = bf16.keys() == fp32.keys() and all(
    torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32
)

# -- the export: the training's dtype, the KV cache on -----------------------------------------
fsdp.export_hf(s.model, processor, os.path.join(out_dir, "export-fp32"))
s.model.compute_dtype = torch.bfloat16  # as load_model records it on GPUs
fsdp.export_hf(s.model, processor, os.path.join(out_dir, "export-bf16"))
report["training_use_cache"] = s.model.config.use_cache  # unchanged by the export

with open(os.path.join(out_dir, f"report_rank{rank}.json"), "w") as f:
    json.dump(report, f, indent=1)
dist.destroy_process_group()

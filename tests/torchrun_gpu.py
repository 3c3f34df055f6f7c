"""Run under torchrun by test_gpu.py on a GPU node: `OUT_DIR TINY_PATH`. Writes report.json.

Every stage for 2 steps in bf16 with the engine asleep around each update; save, stop,
resume; the sleep's freed memory per step; lr 0 (ratio exactly 1, a flat engine/trainer gap);
a stale engine (sync switched off) whose gap grows; bf16 vs float32 gradients. Uses vLLM when
it is installed (sleep mode, CUDA graphs: the default `--enforce_eager false`), else the
transformers stand-in of tests/hf_engine.py. Runs on a CPU too (OCTOPUS_GPU_CHECKS_ON_CPU=1),
which only exercises the harness.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_items import fixed_groups  # noqa: E402

import fsdp  # noqa: E402
import train  # noqa: E402
from octopus import preset  # noqa: E402

out_dir, tiny = sys.argv[1], sys.argv[2]
rank, world, device = fsdp.setup_distributed()
report: dict = {"device": str(device), "world": world, "engine": None}
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="synthetic:8",
    prompts_per_step=2 * world, mini_batch_prompts=2 * world, n_rollouts=4, n_train=8,
    max_prompt_len=384, max_response_len=32, kv_cache_gb=0.1, val_every=2, save_every=0,
    warmup_steps=0, sft_batch=2 * world, gradient_checkpointing=True, dump_every=0,
    gpu_memory_utilization=0.3,
)  # fmt: skip


def make_engine(model_path: str):
    try:
        import vllm  # noqa: F401
    except ImportError:
        from hf_engine import HFEngine

        report["engine"] = "transformers stand-in (no vLLM here)"
        return HFEngine(model_path, device)
    from rollout import VLLMEngine

    report["engine"] = "vllm"
    return VLLMEngine(model_path, max_model_len=1024, seed=rank, kv_cache_gb=0.1,
                      gpu_memory_utilization=0.3, max_images=1, load_format="dummy")  # fmt: skip


def watch_sleep(engine, freed: list) -> None:
    """Record the GPU memory each sleep() hands back."""
    sleep = engine.sleep

    def measured():
        was_awake = not engine.asleep
        before = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        sleep()
        if was_awake and torch.cuda.is_available():
            freed.append((torch.cuda.mem_get_info()[0] - before) / 2**30)

    engine.sleep = measured


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# -- every stage, 2 steps each, with the engine asleep during updates --------------------------
engine = make_engine(tiny)
freed: list[float] = []
watch_sleep(engine, freed)
model = tiny
for name in ("demo-sft", "demo-1", "demo-2"):
    cfg = preset(name, **SMALL, max_steps=2, out_dir=f"{out_dir}/stages/{name}", lr=1e-4)
    model, engine = train.run_stage(cfg.replace(model=model), engine)
    report[f"{name}_rows"] = rows(f"{cfg.out_dir}/metrics.jsonl")
report["sleep_freed_gib"] = freed

# -- save, stop, resume ------------------------------------------------------------------------
run = f"{out_dir}/resume"
cfg = preset("demo-2", **SMALL, out_dir=run, lr=1e-4)
train.run_stage(cfg.replace(max_steps=2, save_every=2), engine)
train.run_stage(cfg.replace(max_steps=3), engine)
report["resumed_steps"] = [r["step"] for r in rows(f"{run}/metrics.jsonl")]

# -- lr 0: the first mini-batch is exactly on-policy; the gap stays flat -----------------------
cfg = preset("demo-2", **SMALL, out_dir=f"{out_dir}/lr0", lr=0.0, max_steps=3)
train.run_stage(cfg, engine)
report["lr0_rows"] = rows(f"{out_dir}/lr0/metrics.jsonl")

# -- a stale engine: no sync after the first while the weights move; the gap must grow ---------
sync, update = train.sync_engine, train.update
calls = []


def sync_once(t):
    if not calls:
        sync(t)
    calls.append(1)
    t.engine.wake()


def update_and_move(t, groups, on_policy=False):
    """The update, then every weight moved a little, as learning would (the tiny random model's
    rewards are all equal, so its advantages are 0 and its updates move nothing)."""
    stats = update(t, groups, on_policy=on_policy)
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return stats


train.sync_engine, train.update = sync_once, update_and_move
cfg = preset("demo-2", **dict(SMALL, out_dir=f"{out_dir}/stale", lr=0.0, max_steps=4, val_every=0))
train.run_stage(cfg, engine)
train.sync_engine, train.update = sync, update
report["stale_rows"] = rows(f"{out_dir}/stale/metrics.jsonl")

# -- bf16 vs float32 gradients on the same items -----------------------------------------------
from transformers import AutoProcessor  # noqa: E402

processor = AutoProcessor.from_pretrained(tiny)
grads = {}
for bf16 in (True, False):
    m = fsdp.load_model(tiny, device, bf16=bf16)
    opt, sched = train.make_optimizer(m, cfg, 1)
    t = train.Trainer(cfg.replace(agg="seq"), m, None, opt, sched, None, processor, device, [], [])
    train.accumulate_gradients(t, fixed_groups(processor)[rank::world])
    grads[bf16] = torch.cat([p.grad.full_tensor().flatten().float() for p in m.parameters()])
    del m, opt
report["grad_cosine_bf16_fp32"] = float(
    torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
)

if rank == 0:
    with open(f"{out_dir}/report.json", "w") as f:
        json.dump(report, f, indent=1)
engine.close()
if dist.is_initialized():
    dist.destroy_process_group()

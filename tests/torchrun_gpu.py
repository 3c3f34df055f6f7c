"""Run under torchrun by test_gpu.py on a GPU node: `OUT_DIR TINY_PATH`. Writes report.json.

Every stage for 2 steps in bf16 with the engine asleep around each update; save, stop,
resume; the sleep's freed memory per step; lr 0 (ratio exactly 1, a flat engine/trainer gap);
a stale engine (synced with the first step's weights every step) whose gap grows; bf16 vs
float32 gradients; the packed attention against per-sample forwards on CUDA, float32 and bf16,
with the GPU kernels forced (flash in bf16, memory-efficient in float32: flash has no float32).
Uses vLLM when it is installed (sleep mode, CUDA graphs: the default `--enforce_eager false`),
else the transformers stand-in of tests/hf_engine.py; report["engine"] says which. Every engine
takes at most 0.2 of the card, so engines started later in the suite still fit. Runs on a CPU
too (OCTOPUS_GPU_CHECKS_ON_CPU=1), which only exercises the harness.
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
from config import preset  # noqa: E402

out_dir, tiny = sys.argv[1], sys.argv[2]
rank, world, device = fsdp.setup_distributed()
report: dict = {"device": str(device), "world": world, "engine": None}
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="synthetic:8",
    prompts_per_step=2 * world, mini_batch_prompts=2 * world, n_rollouts=4, n_train=8,
    max_prompt_len=384, max_response_len=32, kv_cache_gb=0.1, val_every=2, save_every=0,
    warmup_steps=0, sft_batch=2 * world, gradient_checkpointing=True, dump_every=0,
    gpu_memory_utilization=0.2,
)  # fmt: skip


def make_engine(model_path: str):
    try:
        import vllm  # noqa: F401
    except ImportError:
        from hf_engine import HFEngine

        report["engine"] = "transformers stand-in"
        return HFEngine(model_path, device)
    from rollout import VLLMEngine

    report["engine"] = "vllm"
    return VLLMEngine(model_path, max_model_len=1024, seed=rank, kv_cache_gb=0.1,
                      gpu_memory_utilization=0.2, max_images=1, load_format="dummy")  # fmt: skip


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
train.run_stage(cfg.replace(max_steps=2, save_every=2, keep_finished_checkpoints=True), engine)
os.remove(f"{run}/DONE.json")  # as if stopped after step 2: a finished stage is not resumed
train.run_stage(cfg.replace(max_steps=3), engine)
report["resumed_steps"] = [r["step"] for r in rows(f"{run}/metrics.jsonl")]

# -- lr 0: the first mini-batch is exactly on-policy; the gap stays flat -----------------------
cfg = preset("demo-2", **SMALL, out_dir=f"{out_dir}/lr0", lr=0.0, max_steps=3)
train.run_stage(cfg, engine)
report["lr0_rows"] = rows(f"{out_dir}/lr0/metrics.jsonl")

# -- a stale engine: synced every step with the first step's weights while the trainer's move;
# the gap must grow. (Not "no sync": a sleep discards vLLM's weights, so every wake needs one.)
sync, update = train.sync_engine, train.update
first: dict = {}


def sync_stale(t):
    if not first:  # every rank gathers (a collective), once
        first.update((k, v.clone()) for k, v in fsdp.full_weights(t.model, dtype=t.engine.dtype))
    t.engine.wake(["weights"])
    t.engine.sync_weights(first.items())
    t.engine.wake(["kv_cache"])


def update_and_move(t, groups, on_policy=False):
    """The update, then every weight moved a little, as learning would (the tiny random model's
    rewards are all equal, so its advantages are 0 and its updates move nothing)."""
    stats = update(t, groups, on_policy=on_policy)
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return stats


train.sync_engine, train.update = sync_stale, update_and_move
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

# -- the packed attention against per-sample forwards, with the GPU kernels forced ------------
import torch.nn.attention.bias as causal_bias  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import Qwen3VLForConditionalGeneration  # noqa: E402

import packing  # noqa: E402


class ForcedKernel:
    """Stands in for packing's `F`: every attention of the packed path under one SDPA kernel
    (no fallback: an input that kernel cannot take raises); the vision tower keeps its own."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def scaled_dot_product_attention(self, *args, **kwargs):
        if self.backend is None:
            return F.scaled_dot_product_attention(*args, **kwargs)
        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(*args, **kwargs)


lower_right = []  # which kernel each prompt-then-causal (lower-right) attention ran on
can_flash, can_efficient = (
    causal_bias.can_use_flash_attention,
    causal_bias.can_use_efficient_attention,
)


def recording_flash(params, *a):
    ok = can_flash(params, *a)
    if ok:
        lower_right.append("flash")
    return ok


def recording_efficient(params, *a):
    ok = can_efficient(params, *a)
    lower_right.append("efficient" if ok else "math")
    return ok


causal_bias.can_use_flash_attention = recording_flash
causal_bias.can_use_efficient_attention = recording_efficient


def per_sample_logprobs(model, prompt, response):
    """One plain forward of prompt + response (causal attention, no packing)."""
    ids = torch.cat([prompt["input_ids"], torch.tensor([response])], dim=1).to(device)
    types = torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)],
                      1).to(device)  # fmt: skip
    extra = {k: prompt[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in prompt}
    logits = model(input_ids=ids, mm_token_type_ids=types, **extra).logits[0]  # (P + n, V)
    n_prompt = prompt["input_ids"].shape[1]
    logp = torch.log_softmax(logits[n_prompt - 1 : -1].float(), -1)  # (n, V)
    return logp.gather(-1, torch.tensor(response, device=device)[:, None])[:, 0]  # (n,)


def logprobs_and_grads(model, chunks, packed: bool):
    """log-probs of every response (float32, flat) and the gradient of a fixed weighted sum."""
    model.zero_grad(set_to_none=True)
    if packed:
        logps = packing.response_logprobs(model, packing.pack(chunks, model.model.get_rope_index),
                                          device)  # fmt: skip
    else:
        logps = [per_sample_logprobs(model, p, r) for p, rs in chunks for r in rs]
    flat = torch.cat(logps).float()
    weights = torch.linspace(-1.0, 1.0, len(flat), device=device)
    (flat * weights).sum().backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return flat.detach(), grads


chunks = [(g.prompt, [s.ids for s in g.samples]) for g in fixed_groups(processor, n_groups=4)]
kernels = {
    torch.float32: SDPBackend.EFFICIENT_ATTENTION,
    torch.bfloat16: SDPBackend.FLASH_ATTENTION,
}
dtypes = (torch.float32, torch.bfloat16) if torch.cuda.is_available() else (torch.float32,)
sdpa, packed_report = packing.F, {}
truth = None
for dtype in dtypes:
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny, dtype=dtype).to(device).train()
    packing.use_packed_attention(model)
    packing.F = ForcedKernel(kernels[dtype] if torch.cuda.is_available() else None)
    lower_right.clear()
    packed_lp, packed_grad = logprobs_and_grads(model, chunks, packed=True)
    used = sorted(set(lower_right))
    sample_lp, sample_grad = logprobs_and_grads(model, chunks, packed=False)
    packing.F = sdpa
    if truth is None:  # float32 per-sample: the reference the bf16 errors are measured against
        truth = sample_lp
    packed_report[str(dtype)] = {
        "lower_right_kernels": used,
        "max_gap": float((packed_lp - sample_lp).abs().max()),
        "packed_err": float((packed_lp - truth).abs().max()),
        "per_sample_err": float((sample_lp - truth).abs().max()),
        "grad_cosine": float(F.cosine_similarity(packed_grad, sample_grad, dim=0)),
        "grad_rel_err": float((packed_grad - sample_grad).abs().max() / sample_grad.abs().max()),
    }
    del model
report["packed_vs_per_sample"] = packed_report

if rank == 0:
    with open(f"{out_dir}/report.json", "w") as f:
        json.dump(report, f, indent=1)
engine.close()
if dist.is_initialized():
    dist.destroy_process_group()

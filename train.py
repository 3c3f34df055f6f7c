"""Octopus training: cold-start SFT, RL Stage I / II and the baselines, torchrun + FSDP2.

    # the CPU demo (tiny model, synthetic task: SFT -> Stage I -> Stage II, ~10 min, 2 cores)
    torchrun --nproc_per_node=2 train.py --preset demo
    # one 8-GPU node: the paper's runs (PAPER.md §7); any Config field is a flag
    torchrun --nproc_per_node=8 train.py --preset octopus-8b-stage1 --model ckpts/coldstart \\
        --train_data data/virl39k --val_data data/geometry3k/test --out_dir runs/stage1
    torchrun --nproc_per_node=8 train.py --preset octopus-8b-stage2 --model runs/stage1/export ...
    # 1 GPU: same command with --nproc_per_node=1 (and smaller --prompts_per_step)
    # multi-node: torchrun --nnodes=N --node_rank=i --master_addr=HOST --nproc_per_node=8 ...

One RL step (`rl_step`, read it top to bottom): generate n rollouts per prompt with the
colocated vLLM engine -> score -> splice and mask (augment.py) -> group advantages -> old (and
Stage I reference) log-probs -> mini-batch updates of the masked GSPO loss -> sync weights into
the engine -> metrics. Each rank owns its prompts, its engine and whole groups.

What this simplifies relative to the paper's EasyR1 runs:
- one PPO epoch per step (as the paper), no dynamic sampling, no overlong shaping;
- the learning-rate schedule counts RL steps (warm-up over the first `warmup_steps`);
- no sequence packing inside a row: micro-batches are formed by a token budget instead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine in process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from augment import loss_masks, make_rollout, splice_group, transition_counts  # noqa: E402
from data import load_examples, synthetic_coldstart, synthetic_task  # noqa: E402
from loss import count_for, group_advantages, policy_loss, sft_loss, stage1_loss, token_logprobs  # noqa: E402
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, PRESETS, SC, Config, preset  # noqa: E402
from reward import score_batch  # noqa: E402
from rollout import Sampling, VLLMEngine, render_prompt  # noqa: E402

# =============================================================================================
# Distributed set-up, model, optimizer
# =============================================================================================


def setup_distributed() -> tuple[int, int, torch.device]:
    """NCCL on GPU, gloo on CPU; works without torchrun as a world of one."""
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def log0(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def load_model(path: str, cfg: Config, device: torch.device, *, trainable: bool = True):
    """Qwen3-VL, FSDP2-sharded: each vision block, the vision tower, each decoder layer, the
    root. Gradient checkpointing (non-reentrant) is switched on before sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute with fp32 master weights and reductions on GPU; fp32 on CPU (bf16 there is
    # ~10x slower, FINDINGS.md)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    kw = dict(mesh=mesh, mp_policy=mp)
    visual, text = model.model.visual, model.model.language_model
    for block in visual.blocks:
        fully_shard(block, **kw)
    fully_shard(visual, **kw)
    for layer in text.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def make_optimizer(model, cfg: Config, total_steps: int):
    """AdamW with linear warm-up then constant lr (PAPER.md §7: 10 warm-up steps)."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas
    )
    warmup = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
    )
    return opt, sched


# =============================================================================================
# Batches: prompt + response -> model inputs; micro-batches by token budget
# =============================================================================================


def encode_prompt(processor, prompt: dict) -> dict:
    """The processor's tensors for one rendered prompt (ids, image patches, grid, token types)."""
    images = prompt["images"] or None
    enc = processor(text=[prompt["prompt"]], images=images, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}


def collate(encoded: list[dict], responses: list[list[int]], pad_id: int) -> dict:
    """Left-pad prompts and right-pad responses so every response starts at the same position:
    one slice of the logits then holds every response token.
    Returns model inputs plus `labels` (B, R) and `response_mask` (B, R)."""
    P = max(e["input_ids"].shape[1] for e in encoded)  # longest prompt
    R = max(len(r) for r in responses)  # longest response
    B = len(encoded)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)  # (B, P + R)
    attention = torch.zeros((B, P + R), dtype=torch.long)  # (B, P + R)
    types = torch.zeros((B, P + R), dtype=torch.long)  # (B, P + R)
    labels = torch.full((B, R), pad_id, dtype=torch.long)  # (B, R)
    response_mask = torch.zeros((B, R))  # (B, R)
    for b, (e, r) in enumerate(zip(encoded, responses, strict=True)):
        n = e["input_ids"].shape[1]
        input_ids[b, P - n : P] = e["input_ids"][0]
        types[b, P - n : P] = e["mm_token_type_ids"][0]
        input_ids[b, P : P + len(r)] = torch.tensor(r)
        attention[b, P - n : P + len(r)] = 1
        labels[b, : len(r)] = torch.tensor(r)
        response_mask[b, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": types}
    with_images = [e for e in encoded if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return {"inputs": batch, "labels": labels, "response_mask": response_mask, "R": R}


def response_logprobs(
    model, batch: dict, device: torch.device, temperature: float = 1.0
) -> torch.Tensor:
    """log p of each response token (B, R), from one forward that keeps only the logits of the
    response positions (the last R + 1; the final one predicts past the end)."""
    inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
    logits = model(**inputs, logits_to_keep=batch["R"] + 1).logits[:, :-1]  # (B, R, V)
    return token_logprobs(logits, batch["labels"].to(device), temperature)  # (B, R)


def pack_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches whose padded size (count x longest) stays within
    `budget` tokens; sorted by length so that padding is small. A longer-than-budget item
    gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_for_ranks(lengths: list[int], budget: int) -> list[list[int]]:
    """`pack_by_tokens`, padded with empty micro-batches to the largest count of any rank.
    FSDP runs its collectives once per forward and backward, so every rank must run the same
    number of passes (an empty micro-batch becomes a zero-weight pass); otherwise ranks hang."""
    batches = pack_by_tokens(lengths, budget)
    n = torch.tensor([len(batches)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return batches + [[] for _ in range(int(n) - len(batches))]


# =============================================================================================
# Data
# =============================================================================================


def load_split(spec: str, cfg: Config, *, seed: int, sft: bool = False) -> tuple[list[dict], int]:
    """Examples of `spec` ("synthetic:N" for the demo's dot counting, else a path for
    data.py), and the number of bad rows skipped (reported, never silently dropped)."""
    suffix = OCTOPUS_SUFFIX if cfg.prompt_suffix == "octopus" else BASELINE_SUFFIX
    if spec.startswith("synthetic:"):
        examples = synthetic_task(int(spec.split(":")[1]), seed=seed, suffix=suffix)
        if sft:
            rng = random.Random(seed)
            for e in examples:
                e["response"] = synthetic_coldstart(e, rng)
        return examples, 0
    examples, report = load_examples(
        spec, suffix=suffix, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    if report.skipped:
        log0(f"[data] {spec}: {report.summary()}")
    if sft:
        missing = [e["id"] for e in examples if not e.get("response")]
        if missing:
            log0(
                f"[data] {spec}: {len(missing)} rows without a 'response' skipped (e.g. {missing[:3]})"
            )
        examples = [e for e in examples if e.get("response")]
    return examples, len(report.skipped)


def prompts_of_step(n_examples: int, step: int, per_step: int, seed: int) -> list[int]:
    """Example indices of global step `step`: epochs are seeded permutations read in order, so
    a resumed run continues exactly where it stopped and never repeats a prompt of an epoch."""
    out = []
    start = step * per_step
    for pos in range(start, start + per_step):
        epoch, k = divmod(pos, n_examples)
        perm = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[k])
    return out


# =============================================================================================
# Checkpoints: sharded DCP, written to a temporary name and renamed when complete
# =============================================================================================


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    final = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=tmp)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    torch.save(rng, os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(
                {"step": step, "scheduler": scheduler.state_dict(), "world": dist.get_world_size()},
                f,
            )
        os.rename(tmp, final)  # complete: only now can a resume see it
    dist.barrier()
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """Newest complete checkpoint: half-written ones (`*.tmp`, or no trainer.json) are ignored."""
    done = [
        p
        for p in glob.glob(os.path.join(out_dir, "checkpoints", "step_*"))
        if not p.endswith(".tmp") and os.path.exists(os.path.join(p, "trainer.json"))
    ]
    return max(done, default=None)


def load_checkpoint(path: str, model, optimizer, scheduler) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
    return meta["step"]


def export_hf(model, processor, path: str) -> None:
    """Full model + processor in the Hugging Face layout (`save_pretrained`), from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=full)
        processor.save_pretrained(path)
    dist.barrier()


def sync_engine(t) -> None:
    """Trainer weights -> engine: wake the weights, load, then wake the KV cache (GPU)."""
    t.engine.wake(["weights"])
    t.engine.sync_weights(full_weights(t.model))
    t.engine.wake(["kv_cache"])


def full_weights(model):
    """(name, full tensor) pairs, one all-gather at a time, on every rank: each rank's engine
    needs the whole model (gathering to rank 0 only leaves the other engines stale)."""
    for name, value in model.state_dict().items():
        yield name, value.full_tensor() if hasattr(value, "full_tensor") else value


# =============================================================================================
# Metrics
# =============================================================================================


class Metrics:
    """Sums and counts per name on this rank, reduced across ranks once per step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        """A value to average (over everything added under `name`, on all ranks)."""
        self.sums[name] += value * count
        self.counts[name] += count

    def add_total(self, name: str, value: float) -> None:
        """A count to sum over ranks (reported as the total, not a mean)."""
        self.sums[name] += value

    def reduce(self) -> dict[str, float]:
        names = sorted(self.sums)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        names = sorted({n for ns in gathered for n in ns})
        t = torch.tensor(
            [[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names], dtype=torch.float64
        )
        dist.all_reduce(t)
        return {n: (s / c if c else s) for n, (s, c) in zip(names, t.tolist(), strict=True)}


def log_row(out_dir: str, row: dict) -> None:
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


# =============================================================================================
# The RL step
# =============================================================================================


@dataclasses.dataclass
class Trainer:
    """Everything a step touches, built once per stage."""

    cfg: Config
    model: object
    ref_model: object | None
    optimizer: object
    scheduler: object
    engine: VLLMEngine
    processor: object
    device: torch.device
    train: list[dict]
    val: list[dict]
    skipped_rows: int = 0


def rl_step(t: Trainer, step: int) -> dict:
    """One RL step of Octopus (PAPER.md §3-5) or a baseline, on this rank's prompts."""
    cfg, tok = t.cfg, t.processor.tokenizer
    rank, world = dist.get_rank(), dist.get_world_size()
    metrics, times = Metrics(), {}
    per_rank = cfg.prompts_per_step // world
    idx = prompts_of_step(len(t.train), step, cfg.prompts_per_step, cfg.seed)[
        rank * per_rank : (rank + 1) * per_rank
    ]
    examples = [t.train[i] for i in idx]
    prompts = [render_prompt(t.processor, e["messages"]) for e in examples]

    # -- 1. generate n rollouts per prompt ------------------------------------------------------
    clock = time.perf_counter()
    torch.manual_seed(cfg.seed * 7919 + step * world + rank)  # the engine samples from torch's RNG
    t.engine.wake()
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_len
    )
    groups = t.engine.generate(prompts, cfg.n_rollouts, sampling)
    t.engine.sleep()  # GPU: free the KV cache and weights for the update
    times["generate"] = time.perf_counter() - clock

    # -- 2. score ----------------------------------------------------------------------------
    clock = time.perf_counter()
    flat = [(p, g) for p, group in enumerate(groups) for g in group]
    truths = [examples[p]["answer"] for p, _ in flat]
    scores = score_batch(
        [tok.decode(g.ids, skip_special_tokens=True) for _, g in flat], truths, kind=cfg.reward_kind
    )
    times["score"] = time.perf_counter() - clock

    # -- 3. augment: split, splice, mask (Algorithm 1, §4) -------------------------------------
    clock = time.perf_counter()
    sc_ids = tok.encode(SC, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(cfg.seed * 7919 + step * world + rank)
    samples, sample_prompt, rollouts_all, originals = [], [], [], []
    for p in range(len(prompts)):
        members = [k for k, (q, _) in enumerate(flat) if q == p]
        rollouts = [make_rollout(flat[k][1].ids, tok, truths[k], graded=scores[k]) for k in members]
        rollouts_all += rollouts
        originals += range(len(samples), len(samples) + len(rollouts))  # groups start with them
        group = splice_group(rollouts, cfg.n_train, sc_ids, eos, mode=cfg.augment, rng=rng)
        samples += group
        sample_prompt += [p] * len(group)
    masks = [loss_masks(s, cfg.stage) for s in samples]
    times["augment"] = time.perf_counter() - clock

    # -- 4. group advantages (over the trained group of each prompt, §5) ------------------------
    rewards = torch.tensor([s.reward for s in samples])  # (S,)
    advantages = group_advantages(rewards, torch.tensor(sample_prompt), eps=1e-6)  # (S,)

    # -- 5. old log-probs (policy) and, in Stage I, reference log-probs -------------------------
    clock = time.perf_counter()
    encoded = [encode_prompt(t.processor, p) for p in prompts]
    items = [
        Item(
            encoded[sample_prompt[k]],
            s.ids,
            torch.tensor(masks[k][0], dtype=torch.float32),
            torch.tensor(masks[k][1], dtype=torch.float32),
            float(advantages[k]),
        )
        for k, s in enumerate(samples)
    ]
    with torch.no_grad():  # spliced samples are new sequences: their old log-probs come from here
        for mb in pack_for_ranks([it.length for it in items], cfg.logprob_token_budget):
            ks = mb or [0]  # an empty micro-batch still runs a pass (FSDP collectives)
            batch = collate(
                [items[k].prompt for k in ks], [items[k].ids for k in ks], tok.pad_token_id
            )
            lp = response_logprobs(t.model, batch, t.device, cfg.temperature).cpu()  # (B, R)
            rp = (
                response_logprobs(t.ref_model, batch, t.device, cfg.temperature).cpu()
                if t.ref_model is not None
                else None
            )
            for row, k in enumerate(mb):  # nothing is kept from an empty micro-batch's pass
                items[k].old_logp = lp[row, : len(items[k].ids)]
                items[k].ref_logp = rp[row, : len(items[k].ids)] if rp is not None else None
    times["logprobs"] = time.perf_counter() - clock
    # engine vs trainer log-probs of the same sampled tokens: a large gap means a stale engine
    gap = [
        (items[k].old_logp - torch.tensor(flat[j][1].logprobs)).abs().mean().item()
        for j, k in enumerate(originals)
        if flat[j][1].ids
    ]

    # -- 6. mini-batch updates of the masked objective ------------------------------------------
    clock = time.perf_counter()
    n_mini = max(cfg.prompts_per_step // cfg.mini_batch_prompts, 1)
    grad_norms = []
    for mini in range(n_mini):
        lo, hi = mini * len(prompts) // n_mini, (mini + 1) * len(prompts) // n_mini
        stats = update_minibatch(
            t, [it for k, it in enumerate(items) if lo <= sample_prompt[k] < hi]
        )
        grad_norms.append(stats.pop("grad_norm"))
        for name, value in stats.items():
            metrics.add(name, value)
    t.scheduler.step()
    times["update"] = time.perf_counter() - clock

    # -- 7. sync the new weights into the engine -----------------------------------------------
    clock = time.perf_counter()
    sync_engine(t)
    times["sync"] = time.perf_counter() - clock

    # -- 8. metrics -------------------------------------------------------------------------
    for s in scores:
        metrics.add("reward", s.reward)
        metrics.add("acc_o1", s.acc_o1)
        metrics.add("acc_final", s.acc_final)
        metrics.add("format", float(s.has_correction and s.format == 1.0))
        metrics.add("corrects_itself", float(s.has_correction))
    for g in groups:
        for gen in g:
            metrics.add("response_len", len(gen.ids))
    for name, value in transition_counts(rollouts_all).items():
        metrics.add_total(f"gen_{name}", value)  # w->c etc. among generated rollouts
    for name, value in transition_counts(samples).items():
        metrics.add_total(f"train_{name}", value)  # ... and among trained samples
    metrics.add("samples_per_prompt", len(samples) / max(len(prompts), 1))
    metrics.add("logprob_gap", sum(gap) / max(len(gap), 1))
    for name, value in times.items():
        metrics.add(f"time_{name}", value)
    row = metrics.reduce()
    row["grad_norm"] = sum(grad_norms) / len(grad_norms)
    row["lr"] = t.scheduler.get_last_lr()[0]
    row["data_skipped"] = t.skipped_rows
    return row


def pad_stack(rows: list[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros to `length` and stack them: (B, length)."""
    return torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in rows]).to(device)


@dataclasses.dataclass
class Item:
    """One training sample as the update sees it; masks and log-probs are over `ids`."""

    prompt: dict  # encode_prompt's tensors
    ids: list[int]
    policy_mask: torch.Tensor  # (len(ids),)
    kl_mask: torch.Tensor  # (len(ids),)
    advantage: float
    old_logp: torch.Tensor | None = None  # (len(ids),)
    ref_logp: torch.Tensor | None = None  # (len(ids),)

    @property
    def length(self) -> int:
        return self.prompt["input_ids"].shape[1] + len(self.ids)


def accumulate_gradients(t: Trainer, items: list[Item]) -> dict:
    """Backward of the masked objective over this rank's share of one mini-batch, micro-batch
    by micro-batch. The normalizers count the whole mini-batch on all ranks (loss.py), so the
    summed gradient does not depend on how the samples are split over micro-batches or ranks."""
    cfg, world = t.cfg, dist.get_world_size()
    stage1 = cfg.stage == "1" and t.ref_model is not None and cfg.kl_coef > 0
    counts = torch.tensor(
        [
            sum(count_for(it.policy_mask[None], cfg.agg) for it in items),
            sum(count_for(it.kl_mask[None], cfg.agg) for it in items),
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(counts)
    kw = dict(
        ratio=cfg.ratio,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        clip_dual=cfg.clip_dual,
        agg=cfg.agg,
    )
    stats: dict[str, float] = defaultdict(float)
    batches = pack_for_ranks([it.length for it in items], cfg.update_token_budget)
    for mb in batches:
        chunk = [items[i] for i in mb or [0]]  # an empty micro-batch: a zero-weight pass
        batch = collate(
            [it.prompt for it in chunk],
            [it.ids for it in chunk],
            t.processor.tokenizer.pad_token_id,
        )
        R = batch["R"]
        policy_mask = pad_stack([it.policy_mask for it in chunk], R, t.device)  # (B, R)
        old = pad_stack([it.old_logp for it in chunk], R, t.device)  # (B, R)
        adv = torch.tensor([it.advantage for it in chunk], device=t.device)  # (B,)
        logp = response_logprobs(t.model, batch, t.device, cfg.temperature)  # (B, R)
        if stage1:
            kl_mask = pad_stack([it.kl_mask for it in chunk], R, t.device)  # (B, R)
            ref = pad_stack([it.ref_logp for it in chunk], R, t.device)  # (B, R)
            loss, m = stage1_loss(
                logp,
                old,
                ref,
                adv,
                policy_mask,
                kl_mask,
                kl_coef=cfg.kl_coef,
                policy_normalizer=counts[0],
                kl_normalizer=counts[1],
                **kw,
            )
        else:
            loss, m = policy_loss(logp, old, adv, policy_mask, normalizer=counts[0], **kw)
        # FSDP averages gradients over ranks; the normalizers already span all ranks, so undo
        # the average: the summed gradient is the mini-batch gradient.
        (loss * world * bool(mb)).backward()
        for name, value in m.items():
            if name != "tokens" and mb:
                stats[name] += value / sum(map(bool, batches))
    return dict(stats)


def update_minibatch(t: Trainer, items: list[Item]) -> dict:
    """One optimizer step: gradients of one mini-batch, clipped (PAPER.md §7: 1.0), AdamW."""
    t.optimizer.zero_grad(set_to_none=True)
    stats = accumulate_gradients(t, items)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
    stats["grad_norm"] = float(
        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    )
    t.optimizer.step()
    return stats


def validate(t: Trainer, step: int) -> dict:
    """Validation (PAPER.md §7): temperature 0.6, top-p 0.95, the baseline reward."""
    cfg, tok = t.cfg, t.processor.tokenizer
    rank, world = dist.get_rank(), dist.get_world_size()
    val = t.val[: cfg.val_max_prompts] if cfg.val_max_prompts else t.val
    mine = val[rank::world]
    metrics = Metrics()
    if mine:
        prompts = [render_prompt(t.processor, e["messages"]) for e in mine]
        torch.manual_seed(cfg.seed + 104_729 * (step + 1) + rank)
        groups = t.engine.generate(
            prompts,
            cfg.val_n,
            Sampling(
                temperature=cfg.val_temperature,
                top_p=cfg.val_top_p,
                max_tokens=cfg.max_response_len,
            ),
        )
        texts = [tok.decode(g.ids, skip_special_tokens=True) for group in groups for g in group]
        truths = [e["answer"] for e in mine for _ in range(cfg.val_n)]
        for s in score_batch(texts, truths, kind="baseline"):
            metrics.add("val_reward", s.reward)
            metrics.add("val_acc_final", s.acc_final)
            metrics.add("val_acc_o1", s.acc_o1)
            metrics.add("val_format", float(s.has_correction and s.format == 1.0))
    return metrics.reduce()


# =============================================================================================
# SFT (cold start, §4.1)
# =============================================================================================


def sft_step(t: Trainer, step: int) -> dict:
    """One optimizer step of the cold start: NLL of `o1 + SC + o2` responses, response tokens only."""
    cfg, tok = t.cfg, t.processor.tokenizer
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = time.perf_counter()
    per_rank = cfg.sft_batch // world
    idx = prompts_of_step(len(t.train), step, cfg.sft_batch, cfg.seed)[
        rank * per_rank : (rank + 1) * per_rank
    ]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    examples = [t.train[i] for i in idx]
    encoded = [
        encode_prompt(t.processor, render_prompt(t.processor, e["messages"])) for e in examples
    ]
    responses = [
        tok.encode(e["response"], add_special_tokens=False)[: cfg.sft_max_len] + [eos]
        for e in examples
    ]
    lengths = [e["input_ids"].shape[1] + len(r) for e, r in zip(encoded, responses, strict=True)]
    total = torch.tensor([float(sum(map(len, responses)))], dtype=torch.float64)
    dist.all_reduce(total)
    t.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for mb in pack_for_ranks(lengths, cfg.update_token_budget):
        ks = mb or [0]  # an empty micro-batch: a zero-weight pass (FSDP collectives)
        batch = collate([encoded[k] for k in ks], [responses[k] for k in ks], tok.pad_token_id)
        inputs = {k: v.to(t.device) for k, v in batch["inputs"].items()}
        logits = t.model(**inputs, logits_to_keep=batch["R"] + 1).logits[:, :-1]  # (B, R, V)
        loss = sft_loss(
            logits,
            batch["labels"].to(t.device),
            batch["response_mask"].to(t.device),
            normalizer=total,
        )
        (loss * world * bool(mb)).backward()
        loss_sum += loss.item() * bool(mb)  # this rank's share of the global mean
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    t.optimizer.step()
    t.scheduler.step()
    m = Metrics()
    m.add_total("sft_loss", loss_sum)  # the shares of all ranks add up to the global mean
    m.add("time_update", time.perf_counter() - clock)
    row = m.reduce()
    row.update(
        grad_norm=float(grad_norm), lr=t.scheduler.get_last_lr()[0], data_skipped=t.skipped_rows
    )
    return row


# =============================================================================================
# One stage, top to bottom
# =============================================================================================


def build_trainer(cfg: Config, engine: VLLMEngine | None = None) -> tuple[Trainer, int, int]:
    """Data, policy (and Stage I reference), optimizer, engine; resumed from the newest
    complete checkpoint of `cfg.out_dir` when there is one. Returns the trainer, the step to
    start from and the step to stop at."""
    from transformers import AutoProcessor

    rank, world, device = setup_distributed()
    random.seed(cfg.seed + rank)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    processor = AutoProcessor.from_pretrained(cfg.model)
    sft = cfg.stage == "sft"
    train, skipped = load_split(
        cfg.sft_data if sft else cfg.train_data, cfg, seed=cfg.seed, sft=sft
    )
    val = load_split(cfg.val_data, cfg, seed=cfg.seed + 1)[0] if cfg.val_data else []
    per_step = cfg.sft_batch if sft else cfg.prompts_per_step
    if per_step % world or (not sft and cfg.mini_batch_prompts % world):
        raise ValueError(
            f"batch sizes ({per_step} per step, {cfg.mini_batch_prompts} per mini-batch) must divide by the {world} ranks"
        )
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train) / per_step)

    # the policy, and in Stage I a frozen reference: the stage's starting weights
    model = load_model(cfg.model, cfg, device)
    ref_model = (
        load_model(cfg.model, cfg, device, trainable=False)
        if cfg.stage == "1" and cfg.kl_coef > 0
        else None
    )
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    start = 0
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
        log0(f"[{cfg.stage}] resumed from {ckpt} (step {start})")
    if engine is None:
        engine = VLLMEngine(
            cfg.model,
            max_model_len=cfg.max_prompt_len + cfg.max_response_len,
            seed=cfg.seed + rank,
            tensor_parallel=cfg.tensor_parallel,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_gb=cfg.kv_cache_gb,
            enforce_eager=cfg.enforce_eager or None,
        )
    t = Trainer(
        cfg, model, ref_model, optimizer, scheduler, engine, processor, device, train, val, skipped
    )
    sync_engine(t)  # a reused engine or a resumed run: the engine must serve these weights
    log0(
        f"[{cfg.stage}] {len(train)} examples ({skipped} bad rows skipped), steps {start}..{total_steps}, {world} ranks, {device}"
    )
    return t, start, total_steps


def run_stage(cfg: Config, engine: VLLMEngine | None = None) -> tuple[str, VLLMEngine]:
    """Train one stage ("sft", "1" or "2") from `cfg.model`. Returns the exported checkpoint and
    the engine, which a following stage reuses (its weights are replaced by a sync)."""
    t, start, total_steps = build_trainer(cfg, engine)
    rank, sft = dist.get_rank(), cfg.stage == "sft"
    wandb = _wandb(cfg) if rank == 0 and cfg.wandb_project else None

    # -- the loop ---------------------------------------------------------------------------
    bar = tqdm(
        range(start, total_steps),
        disable=rank != 0,
        desc=f"stage {cfg.stage}",
        initial=start,
        total=total_steps,
    )
    for step in bar:
        row = sft_step(t, step) if sft else rl_step(t, step)
        if cfg.val_every and t.val and (step + 1) % cfg.val_every == 0:
            if sft:
                sync_engine(t)  # RL steps sync every step; SFT only when it samples
            row.update(validate(t, step))
        row = {"stage": cfg.stage, "step": step + 1, **row}
        log_row(cfg.out_dir, row)
        if wandb:
            wandb.log(row, step=step + 1)
        shown = ("reward", "acc_final", "format", "sft_loss", "val_acc_final")
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in shown})
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(cfg.out_dir, step + 1, t.model, t.optimizer, t.scheduler)
        if sft and (cfg.sft_stop_acc or cfg.sft_stop_format) and "val_acc_final" in row:
            acc, fmt = row["val_acc_final"], row["val_format"]
            if acc >= cfg.sft_stop_acc and fmt >= cfg.sft_stop_format:
                log0(f"[sft] sampled accuracy {acc:.2f}, well-formed {fmt:.2f}: cold start done")
                break
    export = os.path.join(cfg.out_dir, "export")
    if cfg.export:
        export_hf(t.model, t.processor, export)
        log0(f"[{cfg.stage}] exported {export}")
    return export, t.engine


def _wandb(cfg: Config):
    import wandb

    wandb.init(
        project=cfg.wandb_project,
        config=dataclasses.asdict(cfg),
        name=os.path.basename(cfg.out_dir),
    )
    return wandb


# =============================================================================================
# Command line
# =============================================================================================


def parse_args(argv: list[str]) -> tuple[Config, bool]:
    """`--preset NAME` then any `--field value` of Config; `--export` exports and stops."""
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="octopus-8b-stage1", choices=sorted(PRESETS))
    parser.add_argument(
        "--export_only",
        action="store_true",
        help="export the newest checkpoint of --out_dir to HF format and stop",
    )
    for f in dataclasses.fields(Config):
        if f.name in ("extra", "stage_overrides"):
            continue
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(
                f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None
            )
        elif kind is tuple:
            parser.add_argument(f"--{f.name}", type=float, nargs=2, default=None)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    args = vars(parser.parse_args(argv))
    name, export_only = args.pop("preset"), args.pop("export_only")
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None
    }
    return preset(name, **overrides), export_only


def main(argv: list[str] | None = None) -> None:
    cfg, export_only = parse_args(sys.argv[1:] if argv is None else argv)
    if export_only:
        _export_only(cfg)
        engine = None
    elif cfg.stages:  # the demo: cold start, then Stage I, then Stage II, each from the last
        engine = run_stages(cfg)
    else:
        engine = run_stage(cfg)[1]
    if engine is not None:
        engine.close()  # last: under torchrun its teardown takes the default process group along
    if dist.is_initialized():
        dist.destroy_process_group()


def run_stages(cfg: Config) -> VLLMEngine:
    """Several stages in one launch (the CPU demo): each of `cfg.stages` starts from the
    previous stage's export, in `out_dir/stage-<name>`; "tiny" builds the tiny model first."""
    from tiny import build_tiny

    model = cfg.model
    if model == "tiny":
        path = os.path.join(cfg.out_dir, "tiny-init")
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny(path)
        setup_distributed()
        dist.barrier()
        model = path
    engine = None
    for stage in cfg.stages.split(","):
        overrides = dict(cfg.stage_overrides.get(stage, {}))
        stage_cfg = cfg.replace(
            stage=stage,
            model=model,
            stages="",
            stage_overrides={},
            out_dir=os.path.join(cfg.out_dir, f"stage-{stage}"),
        )
        model, engine = run_stage(stage_cfg.replace(**overrides), engine)
    log0(f"[demo] done: metrics in {cfg.out_dir}/stage-*/metrics.jsonl, final model in {model}")
    return engine


def _export_only(cfg: Config) -> None:
    from transformers import AutoProcessor

    rank, world, device = setup_distributed()
    model = load_model(cfg.model, cfg, device)
    optimizer, scheduler = make_optimizer(model, cfg, 1)
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        raise SystemExit(f"no complete checkpoint under {cfg.out_dir}/checkpoints")
    load_checkpoint(ckpt, model, optimizer, scheduler)
    export_hf(model, AutoProcessor.from_pretrained(cfg.model), os.path.join(cfg.out_dir, "export"))


if __name__ == "__main__":
    main()

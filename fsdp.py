"""Distributed plumbing for train.py, with nothing Octopus-specific in it.

The process group; Qwen3-VL loaded once and sharded with FSDP2; micro-batches that keep every
rank in step; metrics summed over ranks; sharded DCP checkpoints (written atomically, pruned);
a stage's completion mark; a scheduler's stop signal, agreed on by every rank; the Hugging Face
export; the full weights the colocated vLLM engine is synced with.

Everything here runs the same on CPU (gloo, float32) and on GPUs (NCCL, bf16 compute), so the
tests exercise the code path an 8-GPU run takes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import glob
import json
import os
import random
import shutil
import signal
import time
from collections import defaultdict

import torch
import torch.distributed as dist

# =============================================================================================
# Process group
# =============================================================================================


def setup_distributed(timeout_minutes: int = 60) -> tuple[int, int, torch.device]:
    """(rank, world size, device); works without torchrun as a world of one.

    On GPUs the group is device-aware, "cpu:gloo,cuda:nccl" after `set_device` (as in verl):
    tensors on the GPU go through NCCL, the small CPU-side
    counts and metrics through gloo (NCCL alone fails on a CPU tensor: "No backend type
    associated with device type cpu"). The timeout covers the longest gap between two
    collectives, an HF export of the 8B model on rank 0.
    """
    if not dist.is_initialized():
        rendezvous: dict = {}
        if "MASTER_PORT" not in os.environ:
            # not under torchrun: a world of one that meets in an in-memory store, so two such
            # processes at once (two pytest-xdist workers, two bench scripts) never race for a port
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            # bf16 matmuls accumulate in fp32: reduced-precision reductions add noise of the
            # size of GSPO's clip range (3e-4) to the log-probs (verl and EasyR1 turn it off too)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
            dist.init_process_group(
                "cpu:gloo,cuda:nccl", device_id=device, timeout=timeout, **rendezvous
            )
        else:
            dist.init_process_group("gloo", timeout=timeout, **rendezvous)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def log0(*args) -> None:
    """Print on rank 0 only (before the process group exists: torchrun's RANK)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, flush=True)


def free_cache() -> None:
    """Hand cached GPU memory back before the engine wakes: after the update PyTorch's caching
    allocator still holds tens of GiB that vLLM's weights and KV cache need (EasyR1, TRL and verl
    all empty the cache there)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """`values` reduced over ranks (float64, on the CPU side of the group)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


# =============================================================================================
# The model: loaded once, sharded with FSDP2
# =============================================================================================


def load_model(
    path: str,
    device: torch.device,
    *,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    freeze_vision: bool = False,
    bf16: bool | None = None,
):
    """Qwen3-VL sharded with FSDP2: each vision block, the vision tower, each decoder layer, the
    root. Only rank 0 reads the checkpoint; the other ranks build the model on the meta device
    and receive their shards by broadcast (`set_model_state_dict(..., broadcast_from_rank0=True)`,
    as verl's FSDP2 loader does), so a node reads the weights once instead of once per GPU.

    The policy (`trainable`) keeps float32 master weights and computes in bf16 on GPUs; the
    frozen reference of Stage I is stored in bf16 there (float32 on CPU, where bf16 is slow).
    Gradient checkpointing (non-reentrant) is switched on before sharding; it only acts in
    train mode (`model.train()`), which train.py sets for the update alone. `bf16=False` keeps
    float32 compute on GPUs too (for checks); None: bf16 on GPUs.
    """
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from packing import use_packed_attention

    on_gpu = device.type == "cuda"
    bf16 = on_gpu if bf16 is None else bf16
    dtype = torch.bfloat16 if bf16 and not trainable else torch.float32
    full_state, buffers = _read_on_rank0(path, dtype)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.config.use_cache = False
    use_packed_attention(model)
    if trainable and gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
    elif freeze_vision:  # the release's cold start trains the language model only
        model.model.visual.requires_grad_(False)

    _shard(model, device, bf16=bf16 and trainable)
    model.to_empty(device=device)
    _broadcast_weights(model, full_state, buffers)
    model.model.language_model.register_forward_pre_hook(
        _vision_on_every_rank(model), with_kwargs=True
    )
    # what the run computes in: the export is written in it (export_dtype)
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32
    return model.train() if trainable else model.eval()


def _read_on_rank0(path: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """The checkpoint's state dict and buffers on rank 0; empty on the other ranks."""
    from transformers import Qwen3VLForConditionalGeneration

    if dist.get_rank() != 0:
        return {}, {}
    source = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return source.state_dict(), {name: b.clone() for name, b in source.named_buffers()}


def _broadcast_weights(model, full_state: dict, buffers: dict) -> None:
    """Every rank's shards of rank 0's `full_state`, by broadcast, and the buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    # Rotary frequencies are buffers outside the state dict: rank 0 computed them, all copy them.
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)


def _shard(model, device: torch.device, *, bf16: bool) -> None:
    """FSDP2 over all ranks: each vision block, the vision tower, each decoder layer, the root;
    `bf16`: bf16 compute with float32 master weights and gradient reductions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    visual, text = model.model.visual, model.model.language_model
    for block in visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(visual, mesh=mesh, mp_policy=mp)
    for layer in text.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _vision_on_every_rank(model):
    """A pre-hook on the language model that runs the vision tower on a dummy 2x2-patch image
    (adding 0 x its output) when this forward has no image, like verl's Qwen-VL patches.

    FSDP2 all-gathers each vision block in the forward and reduce-scatters its gradient in the
    backward: if one rank's micro-batch has images and another's has none, the ranks issue
    different collectives and gloo aborts ("Received data size doesn't match") or NCCL hangs.
    The dummy pass sits where the real vision pass would (after the embeddings, before the
    decoder layers), so every rank issues the same collectives in the same order.
    """

    def hook(module, args, kwargs):
        if kwargs.get("visual_pos_masks") is not None:
            return None  # this forward has images: the vision tower already ran
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        embeds = kwargs["inputs_embeds"]  # (B, L, hidden)
        cfg = model.model.visual.config
        merge = cfg.spatial_merge_size
        patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        pixels = torch.zeros(merge * merge, patch, device=embeds.device)  # one merged token
        grid = torch.tensor([[1, merge, merge]], device=embeds.device)
        out = model.model.get_image_features(pixels, grid, return_dict=True)
        touched = _sum_tensors([out.pooler_output, out.deepstack_features])
        kwargs["inputs_embeds"] = embeds + 0.0 * touched.to(embeds.dtype)
        return args, kwargs

    return hook


def _sum_tensors(nested) -> torch.Tensor:
    if torch.is_tensor(nested):
        return nested.sum()
    return sum((_sum_tensors(x) for x in nested), torch.zeros(()))


# =============================================================================================
# Micro-batches that keep every rank in step (the batching words: packing.py)
# =============================================================================================


def first_fit(costs: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `budget` tokens in all (first-fit, longest
    first). An item over the budget gets a micro-batch of its own, never dropped."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        for b, load in enumerate(loads):
            if load + costs[i] <= budget:
                bins[b].append(i)
                loads[b] += costs[i]
                break
        else:
            bins.append([i])
            loads.append(costs[i])
    return bins


def micro_batches(costs: list[int], budget: int) -> list[tuple[list[int], bool]]:
    """Micro-batches of this rank's items as `(indices, real)`, the same number on every rank.

    FSDP2 all-gathers parameters in each forward and reduce-scatters gradients in each
    backward, so a rank that stopped early would leave the others waiting forever; a rank with
    fewer micro-batches instead gets `([], False)` for each one it lacks: the caller runs a
    tiny dummy pass there (no item of its own, so it costs a few tokens, not a real segment),
    and its loss must be multiplied by 0 (`train.backward`) so that nothing reaches the gradient.
    """
    if not costs:
        raise ValueError("micro_batches: this rank has no items (each rank needs at least one)")
    batches = first_fit(costs, budget)
    n = int(all_reduce([len(batches)], op=dist.ReduceOp.MAX)[0])
    return [(b, True) for b in batches] + [([], False)] * (n - len(batches))


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
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(self.sums))
        names = sorted({n for ns in names for n in ns})
        flat = all_reduce([x for n in names for x in (self.sums.get(n, 0.0), self.counts[n])])
        sums, counts = flat[0::2], flat[1::2]
        return {n: (s / c if c else s) for n, s, c in zip(names, sums, counts, strict=True)}


class Clock:
    """`with clock("phase"):` adds the phase's wall-clock seconds to `clock.seconds`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def log_row(out_dir: str, row: dict) -> None:
    """Append one metrics row to `out_dir/metrics.jsonl` (rank 0)."""
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


# =============================================================================================
# Checkpoints: sharded DCP, written to a temporary name and renamed when complete
# =============================================================================================


def save_checkpoint(
    out_dir: str, step: int, model, optimizer, scheduler, keep: int = 0, final: bool = False
) -> str:
    """Model, optimizer, scheduler and RNG states at `step`; only complete checkpoints are ever
    seen by a resume. With `keep` > 0, older checkpoints beyond the newest `keep` are deleted
    (one is ~105 GB for the 8B model with its optimizer). `final`: the stage ends at this step
    (`checkpoint_info`), so a resume from it only exports."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    path = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    tmp = path + ".tmp"
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
        meta = {"step": step, "scheduler": scheduler.state_dict(), "world": dist.get_world_size()}
        _write_json(os.path.join(tmp, "trainer.json"), {**meta, "final": final})
        shutil.rmtree(path, ignore_errors=True)  # a run with --resume false redid this step
        os.rename(tmp, path)  # complete: only now can a resume see it
        if keep > 0:
            for old in complete_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def complete_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first: half-written ones (`*.tmp`, or no trainer.json) are
    not listed."""
    return sorted(
        p
        for p in glob.glob(os.path.join(out_dir, "checkpoints", "step_*"))
        if not p.endswith(".tmp") and os.path.exists(os.path.join(p, "trainer.json"))
    )


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def checkpoint_info(path: str) -> dict:
    """What `save_checkpoint` wrote beside the shards: step, scheduler, world, final."""
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def mark_final(path: str) -> None:
    """Mark a complete checkpoint as its stage's last (rank 0; atomic)."""
    if dist.get_rank() == 0:
        _write_json(os.path.join(path, "trainer.json"), {**checkpoint_info(path), "final": True})
    dist.barrier()


def remove_checkpoints(out_dir: str) -> int:
    """Delete every checkpoint of `out_dir` (rank 0); returns the bytes freed."""
    root = os.path.join(out_dir, "checkpoints")
    freed = 0
    if dist.get_rank() == 0 and os.path.isdir(root):
        for folder, _, files in os.walk(root):
            freed += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        shutil.rmtree(root)
    dist.barrier()
    return freed


# =============================================================================================
# A finished stage's mark, and a scheduler's stop signal
# =============================================================================================

DONE = "DONE.json"


def mark_done(out_dir: str, record: dict) -> None:
    """Write `out_dir/DONE.json` (rank 0, atomically): the stage is finished and a relaunch
    skips it. Written after the export, so a crash before it only costs the export again."""
    if dist.get_rank() == 0:
        _write_json(os.path.join(out_dir, DONE), record)
    dist.barrier()


def read_done(out_dir: str) -> dict | None:
    """The completion mark of `out_dir`, or None while the stage is not finished."""
    path = os.path.join(out_dir, DONE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


# A scheduler asks a job to stop with SIGTERM (SLURM, then SIGKILL after KillWait, 30 s by
# default: slurm.conf(5) KillWait) or ahead of time with the signal of `--signal` (sbatch(1)).
# torchrun's agent forwards SIGTERM and SIGKILLs its workers 30 s later
# (torch/distributed/elastic/multiprocessing/api.py, `_close`); SIGUSR1 it does not handle.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_caught = {"signal": 0}


def catch_stop_signals(signals: tuple = STOP_SIGNALS) -> None:
    """Turn `signals` into a request to stop at the next step boundary (`stop_requested`)
    instead of death mid-step. The handler only records the signal: it runs between two Python
    bytecodes, possibly inside a collective's caller, where nothing else is safe to do."""

    def note(signum, frame):
        _caught["signal"] = signum

    for s in signals:
        signal.signal(s, note)


def stop_requested() -> int:
    """The stop signal any rank caught (0: none), the same on every rank: a collective, so
    every rank calls it at the same step boundary. A signal that reached one rank only (one
    node, one process) stops them all at the same step."""
    return int(all_reduce([float(_caught["signal"])], op=dist.ReduceOp.MAX)[0])


def load_checkpoint(path: str, model, optimizer, scheduler) -> int:
    """Restore what `save_checkpoint` wrote; returns its step."""
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


def export_dtype(model) -> torch.dtype:
    """The dtype the export is written in: the one the run computed in (`load_model` records
    it), so bf16 for a GPU run, whose float32 master weights would double the checkpoint (35 GB
    for the 8B model) for precision no bf16 forward used; float32 on CPU (verl's exports are
    bf16 too)."""
    return getattr(model, "compute_dtype", torch.float32)


def export_hf(model, processor, path: str) -> None:
    """Full model + processor in the Hugging Face layout (`save_pretrained`), from rank 0, in
    `export_dtype(model)` and with `use_cache=True` in config.json: training switches the KV
    cache off (`load_model`), but a user's `generate` on the export needs it on (HF's default,
    and what the released checkpoints have)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        dtype = export_dtype(model)
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        # `save_pretrained` writes the dtype of the model's (float32 master) parameters into
        # the config it saves and that config is the one training reads: save, then write the
        # export's own config over it
        config = copy.deepcopy(model.config)
        model.save_pretrained(path, state_dict=full)
        model.config.dtype = config.dtype
        config.use_cache = True
        for sub in [config, *(getattr(config, k) for k in getattr(config, "sub_configs", {}))]:
            sub.dtype = dtype
        config.save_pretrained(path)
        processor.save_pretrained(path)
    dist.barrier()


def full_weights(model, dtype: torch.dtype | None = None):
    """(name, full tensor) pairs, one all-gather at a time, on every rank: each rank's engine
    needs the whole model (gathering to rank 0 only leaves the other engines stale).

    With `dtype`, each floating-point shard is cast before its all-gather, so a bf16 engine
    gets bf16 over the wire: half the traffic and the temporary memory of gathering the float32
    master weights (as verl and EasyR1 do). The
    engine receives the same values: vLLM's loader rounds a float32 tensor to its bf16
    parameter on `copy_` exactly as `.to(torch.bfloat16)` does (round to nearest even)."""
    for name, value in model.state_dict().items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)  # a DTensor casts its local shard: no communication
        yield name, value.full_tensor() if hasattr(value, "full_tensor") else value

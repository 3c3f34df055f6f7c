"""Octopus training: cold-start SFT, RL Stage I / II and the baselines, torchrun + FSDP2.

    # the CPU demo (tiny model, synthetic task: cold start -> Stage I -> Stage II, 2 cores)
    .venv/bin/torchrun --nproc_per_node=2 train.py --preset demo
    # one 8-GPU node: Octopus-8B, the cold start, Stage I and Stage II in one launch, from the
    # data README "Getting the data" fetches (== --preset octopus-8b; --dry_run prints them)
    .venv/bin/torchrun --nproc_per_node=8 train.py
    # one stage (arXiv 2602.08503's runs are presets; every Config field is a flag: --help)
    .venv/bin/torchrun --nproc_per_node=8 train.py --preset octopus-8b-stage2 \\
        --model runs/octopus-8b/stage-1/export --out_dir runs/octopus-8b/stage-2
    # 1 GPU: --nproc_per_node=1 and a smaller --prompts_per_step; several nodes (one agent per
    # node, out_dir on a file system they share; README "On a cluster"):
    .venv/bin/torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=RUN train.py ...

Reading order: `rl_step` (one RL step, the whole method on one screen) -> `make_group`
(Algorithm 1 and the Sec. 4.3 masks for one prompt) -> `update` and `accumulate_gradients`
(the masked GSPO loss) -> `validate` -> `sft_step` (the cold start) -> `run_stage` (the loop)
-> `main`. Distributed plumbing lives in fsdp.py, the packed forward (each prompt once per
group) in packing.py, the pure parts in reward.py, augment.py and loss.py.

Each rank owns its prompts, its colocated vLLM engine and whole groups; ranks meet only in
FSDP's collectives and in the counts that normalise the loss over the whole mini-batch.

What this simplifies relative to the paper's EasyR1 runs:
- one PPO epoch per step, as the paper; no dynamic sampling, no overlong reward shaping;
- the learning-rate schedule counts RL steps, not optimizer steps (warm-up, then constant or
  cosine);
- micro-batches are packed rows of whole prompt groups up to a token budget, not a fixed count
  of padded sequences (the gradient is the same: the normalizers count the whole mini-batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from augment import (
    Sample,
    SplitRollout,
    count_overlong,
    loss_masks,
    splice_group,
    split_rollout,
    transition_counts,
)
from config import Config, check_config, fit_lengths, parse_args, stage_configs
from data import (
    decode_examples,
    examples_of_step,
    images_per_prompt,
    load_stage_data,
    max_images_of,
    missing_data,
    missing_data_message,
    report_bad,
)
from fsdp import (
    DONE,
    Clock,
    Metrics,
    all_reduce,
    catch_stop_signals,
    checkpoint_info,
    export_hf,
    free_cache,
    full_weights,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    log0,
    log_row,
    mark_done,
    mark_final,
    micro_batches,
    read_done,
    remove_checkpoints,
    save_checkpoint,
    setup_distributed,
    stop_requested,
)
from loss import count_for, group_advantages, policy_loss, policy_loss_with_kl, sft_loss
from octopus import SC, split_response
from packing import encode_prompt, pack, response_logprobs, segment_cost, segment_groups
from reward import Score, format_reward, score_batch, well_formed
from rollout import (
    Rollout,
    Sampling,
    VLLMEngine,
    engine_for,
    image_size,
    model_max_len,
    render_prompt,
)

# =============================================================================================
# The RL step (arXiv 2602.08503, Sec. 3-4)
# =============================================================================================


def rl_step(trainer: Trainer, step: int) -> dict:
    """One RL step of Octopus or a baseline on this rank's prompts; returns the metrics row."""
    cfg, clock = trainer.cfg, Clock()
    # images are decoded here, not at load; a prompt whose image does not decode is left out
    examples, bad = step_examples(trainer, step, cfg.prompts_per_step)
    prompts = [render_prompt(trainer.processor, e["messages"]) for e in examples]
    rng = random.Random(step_seed(cfg, step))

    with clock("generate"):  # n rollouts per prompt from the engine, which then sleeps
        rollouts = generate(trainer, prompts, step)
    with clock("score"):  # Eq. 3 / Eq. 6 (or the baseline reward) for every rollout
        scores = score_rollouts(trainer, examples, rollouts)
    with clock("augment"):  # Algorithm 1: split, splice, select N; Sec. 4.3 masks; advantages
        groups = [
            make_group(trainer, e, p, r, s, rng)
            for e, p, r, s in zip(examples, prompts, rollouts, scores, strict=True)
        ]
    minis = mini_batches_of(groups, cfg)
    with clock("logprobs"):  # old (policy) and, with a KL, reference log-probs
        later = [g for mini in minis[1:] for g in mini]  # the first mini-batch needs none
        for group, old in zip(later, logprobs(trainer, later), strict=True):
            group.old_logps = old
        if trainer.ref_model is not None:
            for group, ref in zip(
                groups, logprobs(trainer, groups, trainer.ref_model), strict=True
            ):
                group.ref_logps = ref
    with clock("update"):  # one optimizer step per mini-batch of the masked objective
        stats = [update(trainer, mini, on_policy=k == 0) for k, mini in enumerate(minis)]
        trainer.scheduler.step()
    with clock("sync"):  # the engine wakes and takes the new weights
        sync_engine(trainer)
    if cfg.dump_every and (step + 1) % cfg.dump_every == 0:
        dump_groups(trainer, step, groups)
    return step_metrics(trainer, groups, stats, clock, bad_images=len(bad))


# =============================================================================================
# What a step works on: the trainer, and one prompt's group
# =============================================================================================


@dataclasses.dataclass
class Trainer:
    """Everything a step touches, built once per stage (`build_trainer`)."""

    cfg: Config
    model: torch.nn.Module  # the policy, FSDP2-sharded
    ref_model: torch.nn.Module | None  # the frozen reference, when `cfg.uses_reference`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: VLLMEngine  # this rank's colocated sampler
    processor: object  # the Qwen3-VL processor (tokenizer + image processor)
    device: torch.device
    train: list[dict]  # examples (data.py)
    val: list[dict]
    image_size: dict | None = None  # this stage's image range, as the processor's `size`
    skipped_rows: int = 0  # bad or over-long rows left out at load, reported in every row
    nonfinite_in_a_row: int = 0  # optimizer steps skipped in a row for a NaN/inf gradient


@dataclasses.dataclass
class Group:
    """One prompt and its training group D (Algorithm 1): the unit of the RL step. The lists
    from `samples` on run in step: entry k of each belongs to `samples[k]`, and masks and
    log-probs run over `samples[k].ids` (the response tokens)."""

    example: dict
    prompt: dict  # the processor's tensors of the prompt, shared by every sample
    rollouts: list[Rollout]  # the n generated, as sampled (with the engine's log-probs)
    split: list[SplitRollout]  # the same n, split at SC and graded
    samples: list[Sample]  # the N trained: originals first, then splices
    advantages: list[float] = dataclasses.field(default_factory=list)
    policy_masks: list[torch.Tensor] = dataclasses.field(default_factory=list)  # 1 = trained
    kl_masks: list[torch.Tensor] = dataclasses.field(default_factory=list)  # 1 = in the KL
    old_logps: list[torch.Tensor] | None = None  # the policy at the step's weights
    ref_logps: list[torch.Tensor] | None = None  # the reference, when there is one
    too_long: int = 0  # splice candidates left out for exceeding max_response_len


def generate(trainer: Trainer, prompts: list[dict], step: int) -> list[list[Rollout]]:
    """n rollouts per prompt (training sampling: temperature 1.0, top-p 1.0), then the engine
    sleeps so the update has the GPU memory."""
    cfg = trainer.cfg
    # the engine samples from torch's RNG: seeded per step and rank, a run is reproducible
    torch.manual_seed(step_seed(cfg, step))
    trainer.engine.wake()
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_len
    )
    rollouts = trainer.engine.generate(prompts, cfg.n_rollouts, sampling,
                                       image_size=trainer.image_size)  # fmt: skip
    trainer.engine.sleep()
    return rollouts


def step_seed(cfg: Config, step: int) -> int:
    """The seed of this rank's step: the engine's sampling and the splicing draw from it, so a
    run (and a resumed run) is reproducible and no two ranks or steps share a stream."""
    return cfg.seed * 7919 + step * dist.get_world_size() + dist.get_rank()


def score_rollouts(
    trainer: Trainer, examples: list[dict], rollouts: list[list[Rollout]]
) -> list[list[Score]]:
    """reward.score for every rollout, one batch for the whole step (grouped like `rollouts`)."""
    tok = trainer.processor.tokenizer
    texts = [tok.decode(r.ids, skip_special_tokens=True) for group in rollouts for r in group]
    truths = [e["answer"] for e, group in zip(examples, rollouts, strict=True) for _ in group]
    flat = score_batch(texts, truths, kind=trainer.cfg.reward_kind)
    n = trainer.cfg.n_rollouts
    return [flat[k * n : (k + 1) * n] for k in range(len(examples))]


def make_group(
    trainer: Trainer,
    example: dict,
    prompt: dict,
    rollouts: list[Rollout],
    scores: list[Score],
    rng: random.Random,
) -> Group:
    """One prompt's training group: Algorithm 1's splicing and selection, the masks of
    Sec. 4.3, and the group advantages `(r - mean) / (std + 1e-6)` over the N samples."""
    cfg, tok = trainer.cfg, trainer.processor.tokenizer
    split = [split_rollout(r.ids, tok, s) for r, s in zip(rollouts, scores, strict=True)]
    sc_ids = tok.encode(SC, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    samples = splice_group(
        split, cfg.n_train, sc_ids, eos, tokenizer=tok, rng=rng,
        concat_ids=not cfg.canonical_splices, mode=cfg.augment, max_len=cfg.max_response_len,
    )  # fmt: skip
    too_long = count_overlong(split, sc_ids, cfg.max_response_len, mode=cfg.augment)
    advantages = group_advantages(torch.tensor([s.reward for s in samples]))  # (N,)
    group = Group(example, encode_prompt(trainer.processor, prompt), rollouts, split, samples)
    group.advantages, group.too_long = advantages.tolist(), too_long
    for sample in samples:
        policy, kl = loss_masks(sample, cfg.stage)
        if cfg.kl_tokens == "response":
            kl = [1] * len(sample.ids)
        group.policy_masks.append(torch.tensor(policy, dtype=torch.float32))
        group.kl_masks.append(torch.tensor(kl, dtype=torch.float32))
    return group


def step_examples(trainer: Trainer, step: int, per_step: int) -> tuple[list[dict], list[str]]:
    """This rank's examples of `step`, images decoded (data.examples_of_step); an RL rank needs
    one per mini-batch to stay in step with the others' collectives."""
    cfg, rank, world = trainer.cfg, dist.get_rank(), dist.get_world_size()
    need = 1 if cfg.stage == "sft" else max(cfg.prompts_per_step // cfg.mini_batch_prompts, 1)
    where = f"[{cfg.stage}] step {step + 1}"
    return examples_of_step(trainer.train, step, per_step, cfg.seed, rank, world, need, where)


def mini_batches_of(groups: list[Group], cfg: Config) -> list[list[Group]]:
    """This rank's groups split into the step's mini-batches (one optimizer step each), as
    evenly as they go: a rank that left out a prompt (an image that did not decode) has fewer
    groups, never an empty mini-batch (`step_examples` makes sure there is one per mini-batch),
    so every rank runs the same optimizer steps and the same collectives."""
    n = max(cfg.prompts_per_step // cfg.mini_batch_prompts, 1)
    bounds = [k * len(groups) // n for k in range(n + 1)]
    return [groups[bounds[k] : bounds[k + 1]] for k in range(n)]


# =============================================================================================
# The update: the masked objective, micro-batch by micro-batch
# =============================================================================================


def update(trainer: Trainer, groups: list[Group], *, on_policy: bool = False) -> dict:
    """One optimizer step on one mini-batch: gradients, clipping (1.0), AdamW; the gradients
    are freed right after, before generation needs the memory."""
    trainer.model.train()  # gradient checkpointing only acts in train mode
    stats = accumulate_gradients(trainer, groups, on_policy=on_policy)
    grad_norm, skipped = optimizer_step(trainer)
    return {**stats, "grad_norm": grad_norm, "skipped_steps": float(skipped)}


def optimizer_step(trainer: Trainer) -> tuple[float, bool]:
    """Clip the gradients to `grad_clip`, then AdamW, then free the gradients; returns the
    global gradient norm (before clipping) and whether the step was skipped.

    A NaN or inf norm (a bf16 overflow, a corrupt sample) would reach AdamW and poison every
    weight and both moments for good: that step is skipped instead, on every rank together, and
    its gradients are dropped; the learning-rate schedule still advances (as verl and EasyR1
    do). After `max_nonfinite_steps` skipped steps in a row the run stops: the weights or the
    data are broken, and skipping forever would only hide it.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.grad_clip)
    # the norm of sharded (DTensor) gradients is reduced over all ranks: every rank sees it
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    grad_norm = float(grad_norm)
    # the norm is global, but the decision is made explicit: one rank stepping alone would
    # leave the ranks with different shards of different models
    skipped = all_reduce([float(not math.isfinite(grad_norm))], op=dist.ReduceOp.MAX)[0] > 0
    if not skipped:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.nonfinite_in_a_row = trainer.nonfinite_in_a_row + 1 if skipped else 0
    limit = trainer.cfg.max_nonfinite_steps
    if limit and trainer.nonfinite_in_a_row >= limit:
        raise FloatingPointError(
            f"{trainer.nonfinite_in_a_row} optimizer steps in a row had a non-finite gradient norm "
            f"({grad_norm}) and were skipped (--max_nonfinite_steps {limit}): the weights or "
            "the data are broken. Resume from the last checkpoint with a lower --lr, or find "
            "the rows of these steps (samples.jsonl, --dump_every 1)."
        )
    return grad_norm, skipped


def accumulate_gradients(trainer: Trainer, groups: list[Group], *, on_policy: bool = False) -> dict:
    """Backward of the masked objective over this rank's share of one mini-batch.

    Policy loss on the policy mask (Eq. 2 / Eq. 5 with the Sec. 4.3 masks) plus, with a
    reference model, `kl_coef` x k3 KL on the KL mask. The normalizers count the whole
    mini-batch on all ranks (loss.py), so the summed gradient does not depend on how samples
    are split over micro-batches or ranks. `on_policy`: the first mini-batch of a step runs at
    the very weights the old log-probs would come from, so its own log-probs, detached, are
    the old ones (ratio exactly 1, no separate pass, no noise from another micro-batch shape).
    """
    cfg, dev = trainer.cfg, trainer.device
    if on_policy:
        for g in groups:
            g.old_logps = [None] * len(g.samples)
    policy_count, kl_count = all_reduce(
        [
            sum(float(count_for(m[None], cfg.agg)) for g in groups for m in g.policy_masks),
            sum(float(count_for(m[None], cfg.agg)) for g in groups for m in g.kl_masks),
        ]
    )
    stats, real_passes = {}, 0
    sequences = [(g.prompt, [s.ids for s in g.samples]) for g in groups]
    budget = cfg.update_token_budget
    for segments, logps, real in forward_micro_batches(trainer, trainer.model, sequences, budget):
        if not real:  # a dummy pass: its collectives, none of its loss (its logps are no sample's)
            backward(sum(lp.sum() for lp in logps), real)
            continue
        batch = [(groups[g], k) for g, ks in segments for k in ks]
        if on_policy and real:
            for (g, k), lp in zip(batch, logps, strict=True):
                g.old_logps[k] = lp.detach().cpu()
        logp = pad_sequence(logps, batch_first=True)  # (B, R)
        old = [lp.detach() for lp in logps] if on_policy else [g.old_logps[k] for g, k in batch]
        old = pad(old, dev)  # (B, R)
        policy_mask = pad([g.policy_masks[k] for g, k in batch], dev)  # (B, R)
        advantages = torch.tensor([g.advantages[k] for g, k in batch], device=dev)  # (B,)
        clip = dict(ratio=cfg.ratio, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    clip_dual=cfg.clip_dual, agg=cfg.agg)  # fmt: skip
        if trainer.ref_model is not None:
            ref = pad([g.ref_logps[k] for g, k in batch], dev)  # (B, R)
            kl_mask = pad([g.kl_masks[k] for g, k in batch], dev)  # (B, R)
            loss, m = policy_loss_with_kl(logp, old, ref, advantages, policy_mask, kl_mask,
                                          **clip, kl_coef=cfg.kl_coef,
                                          policy_normalizer=policy_count,
                                          kl_normalizer=kl_count)  # fmt: skip
        else:
            loss, m = policy_loss(logp, old, advantages, policy_mask, **clip,
                                  normalizer=policy_count)  # fmt: skip
        backward(loss, real)
        if real:
            real_passes += 1
            for name, value in m.items():
                stats[name] = stats.get(name, 0.0) + value
    return {k: v / max(real_passes, 1) for k, v in stats.items() if k != "tokens"}


def backward(loss: torch.Tensor, real: bool) -> None:
    """`loss.backward()`, scaled for FSDP: FSDP averages gradients over ranks, but the losses
    are already divided by counts summed over all ranks (loss.py's normalizers), so the world
    size undoes the average and the summed gradient is the whole mini-batch's, however it is
    split. A pass that is not `real` (fsdp.micro_batches) only keeps the ranks' collectives in
    step: its loss is multiplied by 0."""
    (loss * (dist.get_world_size() if real else 0.0)).backward()


def forward_micro_batches(
    trainer: Trainer, model, sequences: list[tuple[dict, list[list[int]]]], budget: int
):
    """Yield `(segments, logps, real)` per micro-batch of `sequences` (each a prompt's tensors
    and its responses' ids): `segments` lists the micro-batch's `(group, response indices)`,
    `logps` the log-probs of those responses' tokens (one (n,) tensor each, in segment order),
    `real` False for a pass that only keeps the ranks in step (fsdp.micro_batches).

    The batching words (mini-batch -> micro-batch -> segment) are packing.py's. With
    `packing="tree"` each segment runs every prefix its samples share once (the prompt, and a
    splice's o1 + SC that its original also holds), not once per sample: with 16 samples per
    prompt that removes most of the prompt tokens of the update and of both log-prob passes.
    """
    packing = trainer.cfg.packing
    prompt_lens = [prompt["input_ids"].shape[1] for prompt, _ in sequences]
    responses = [rs for _, rs in sequences]
    cut = segment_groups(prompt_lens, responses, budget, packing=packing)
    costs = [segment_cost(prompt_lens[g], [responses[g][k] for k in ks], packing) for g, ks in cut]
    rope_index = model.model.get_rope_index
    for indices, real in micro_batches(costs, budget):
        segments = [cut[i] for i in indices]
        rows = [(sequences[g][0], [responses[g][k] for k in ks]) for g, ks in segments]
        rows = rows if real else [dummy_segment(sequences)]
        packed = pack(rows, rope_index, packing)  # the micro-batch in one row (packing.py)
        temperature = trainer.cfg.temperature
        yield segments, response_logprobs(model, packed, trainer.device, temperature), real


def dummy_segment(sequences: list[tuple[dict, list[list[int]]]]) -> tuple[dict, list[list[int]]]:
    """The smallest segment there is, for a pass that only keeps a rank in step with the others
    (fsdp.micro_batches): the first token of this rank's first prompt, one response token, no
    image (the vision tower still runs: fsdp's dummy image). Two tokens, where repeating a real
    segment would cost up to a whole micro-batch's budget forward and backward."""
    prompt, responses = sequences[0]
    text = {k: prompt[k][:, :1] for k in ("input_ids", "mm_token_type_ids")}  # <|im_start|>
    return text, [responses[0][:1]]


@torch.no_grad()
def logprobs(trainer: Trainer, groups: list[Group], model=None) -> list[list[torch.Tensor]]:
    """log-probs of every sample of `groups` under `model` (default: the policy), per group and
    sample, on the CPU. Eval mode: nothing to checkpoint without gradients."""
    if not groups:  # every rank has the same mini-batch structure: all skip together
        return []
    model = model if model is not None else trainer.model
    model.eval()
    out = [[None] * len(g.samples) for g in groups]
    sequences = [(g.prompt, [s.ids for s in g.samples]) for g in groups]
    budget = trainer.cfg.logprob_token_budget
    for segments, logps, real in forward_micro_batches(trainer, model, sequences, budget):
        if real:
            at = iter(logps)
            for g, ks in segments:
                for k in ks:
                    out[g][k] = next(at).cpu()
    # FSDP2 keeps the root (embeddings, LM head: 2.3 GiB at 8B in bf16) gathered after a forward
    # until its backward, which a no-grad pass never runs: give it back now
    model.reshard()
    return out


def pad(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros and stack them on `device`: (B, longest)."""
    return pad_sequence([r.to(device) for r in rows], batch_first=True)


def sync_engine(trainer: Trainer) -> None:
    """Trainer weights -> engine: free the cache, wake the weights, load them (gathered in the
    engine's dtype: bf16 on GPUs, half the traffic of float32), free the cache again, wake the
    KV cache, which is so allocated after the weights are in and after the sync's temporaries
    are handed back (the order of EasyR1, verl and TRL)."""
    free_cache()
    trainer.engine.wake(["weights"])
    trainer.engine.sync_weights(full_weights(trainer.model, dtype=trainer.engine.dtype))
    free_cache()
    trainer.engine.wake(["kv_cache"])


# =============================================================================================
# Metrics and the samples dump
# =============================================================================================


def step_metrics(
    trainer: Trainer, groups: list[Group], stats: list[dict], clock: Clock, bad_images: int = 0
) -> dict:
    """The step's row: rewards and accuracies of the generated rollouts, w->c and the other
    transitions before and after splicing, the loss statistics, the engine/trainer log-prob gap,
    seconds per phase, prompts left out for an image that did not decode; averaged or summed
    over ranks."""
    m = Metrics()
    m.add_total("bad_images", bad_images)
    for g in groups:
        # the originals come first among the samples: old_logps[k] is rollout k's
        for r, gen, old in zip(g.split, g.rollouts, g.old_logps, strict=False):
            m.add("reward", r.reward)
            m.add("acc_o1", float(r.o1_correct))
            m.add("acc_final", float(r.final_correct))
            corrected = r.o1_sc_len is not None
            fmt = well_formed(r.o1_format, r.o2_format if corrected else None)
            m.add("format", fmt)  # o1, and o2 when the model corrected itself
            m.add("sc_format", float(corrected and fmt == 1.0))  # o1 + SC + o2, well-formed
            m.add("corrects_itself", float(corrected))
            m.add("format_o1", r.o1_format)  # what breaks the format, when it breaks
            if corrected:
                m.add("format_o2", r.o2_format)
            m.add("response_len", len(gen.ids))
            m.add("truncated", float(gen.finish_reason == "length"))
            if gen.ids:  # a large gap between engine and trainer means a stale engine
                gap = (old - torch.tensor(gen.logprobs)).abs().mean()
                m.add("logprob_gap", float(gap))
        for name, value in transition_counts(g.split).items():
            m.add_total(f"gen_{name}", value)  # w->c etc. among generated rollouts
        for name, value in transition_counts(g.samples).items():
            m.add_total(f"train_{name}", value)  # ... and among trained samples
        m.add("samples_per_prompt", len(g.samples))
        m.add("prompt_tokens", g.prompt["input_ids"].shape[1])  # images' visual tokens included
        m.add_total("splice_too_long", g.too_long)
    for s in stats:  # the loss statistics and grad_norm of each mini-batch
        for name, value in s.items():
            if name != "skipped_steps":
                m.add(name, value)
    row_skipped = sum(s["skipped_steps"] for s in stats)  # the same on every rank: not summed
    for phase, seconds in clock.seconds.items():
        m.add(f"time_{phase}", seconds)
    row = m.reduce()
    row["skipped_steps"] = row_skipped  # optimizer steps of this RL step skipped (NaN/inf norm)
    row["lr"] = trainer.scheduler.get_last_lr()[0]
    row["data_skipped"] = trainer.skipped_rows
    return row


def dump_groups(trainer: Trainer, step: int, groups: list[Group]) -> None:
    """A few trained groups as readable JSON lines in `out_dir/samples.jsonl` (rank 0): the
    original and spliced texts, kind, reward, advantage, and which part the policy loss trains."""
    if dist.get_rank() != 0:
        return
    tok = trainer.processor.tokenizer
    with open(os.path.join(trainer.cfg.out_dir, "samples.jsonl"), "a") as f:
        for g in groups[: trainer.cfg.dump_groups]:
            rows = []
            for s, advantage, policy, kl in zip(
                g.samples, g.advantages, g.policy_masks, g.kl_masks, strict=True
            ):
                trained = int(policy.sum())
                cut = len(s.ids) - trained if 0 < trained < len(s.ids) else 0
                trains = "all" if cut == 0 and trained else ("none" if not trained else "o2")
                rows.append(dict(kind=s.kind, source=list(s.source), reward=round(s.reward, 4),
                                 advantage=round(advantage, 4), trains=trains,
                                 kl_tokens=int(kl.sum()),
                                 masked_text=tok.decode(s.ids[:cut]) if cut else "",
                                 trained_text=tok.decode(s.ids[cut:])))  # fmt: skip
            content = g.example["messages"][0]["content"]
            question = " ".join(c["text"] for c in content if c["type"] == "text")[:300]
            head = dict(step=step + 1, id=g.example["id"], answer=g.example["answer"])
            f.write(json.dumps({**head, "question": question, "samples": rows}) + "\n")


# =============================================================================================
# Validation (the paper's setup: temperature 0.6, top-p 0.95, the baseline reward)
# =============================================================================================


def validate(trainer: Trainer, step: int) -> dict:
    """Sampled accuracy of o1 (acc@1) and of the final answer (acc@2), the w->c and c->w rates,
    how often the model corrects itself, reward and format on the validation prompts, spread
    over the ranks."""
    cfg, tok = trainer.cfg, trainer.processor.tokenizer
    rank, world = dist.get_rank(), dist.get_world_size()
    val = trainer.val[: cfg.val_max_prompts] if cfg.val_max_prompts else trainer.val
    mine, bad = decode_examples(val[rank::world])
    report_bad(f"[val] step {step + 1}", rank, bad)
    metrics = Metrics()
    metrics.add_total("val_bad_images", len(bad))
    if mine:
        prompts = [render_prompt(trainer.processor, e["messages"]) for e in mine]
        torch.manual_seed(cfg.seed + 104_729 * (step + 1) + rank)
        top_p, max_len = cfg.val_top_p, cfg.max_response_len
        sampling = Sampling(temperature=cfg.val_temperature, top_p=top_p, max_tokens=max_len)
        groups = trainer.engine.generate(prompts, cfg.val_n, sampling,
                                         image_size=trainer.image_size)  # fmt: skip
        texts = [tok.decode(g.ids, skip_special_tokens=True) for group in groups for g in group]
        truths = [e["answer"] for e in mine for _ in range(cfg.val_n)]
        for text, s in zip(texts, score_batch(texts, truths, kind="baseline"), strict=True):
            metrics.add("val_reward", s.reward)
            metrics.add("val_acc_final", s.acc_final)  # acc@2: the final answer
            metrics.add("val_acc_o1", s.acc_o1)  # acc@1: the first answer
            o1, o2 = split_response(text)
            fmt = well_formed(format_reward(o1), None if o2 is None else format_reward(o2))
            metrics.add("val_format", fmt)  # o1, and o2 when there is one, well-formed
            metrics.add("val_sc_format", float(s.has_correction and fmt == 1.0))  # o1 + SC + o2
            metrics.add("val_corrects_itself", float(s.has_correction))
            metrics.add("val_wc", float(s.has_correction and s.acc_o1 < s.acc_final))
            metrics.add("val_cw", float(s.has_correction and s.acc_o1 > s.acc_final))
    return metrics.reduce()


# =============================================================================================
# The cold start (Sec. 4.1): SFT on o1 + SC + o2 chats
# =============================================================================================


def sft_step(trainer: Trainer, step: int) -> dict:
    """One optimizer step of the cold start: mean NLL over the response tokens of the batch."""
    cfg, tok = trainer.cfg, trainer.processor.tokenizer
    clock = Clock()
    with clock("update"):
        examples, bad = step_examples(trainer, step, cfg.sft_batch)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        sequences = [  # (prompt, [response]): the chat's response is the one sample of its prompt
            (
                encode_prompt(trainer.processor, render_prompt(trainer.processor, e["messages"])),
                [tok.encode(e["response"], add_special_tokens=False)[: cfg.sft_max_len] + [eos]],
            )
            for e in examples
        ]
        total = all_reduce([sum(len(ids[0]) for _, ids in sequences)])[0]
        budget = cfg.update_token_budget
        trainer.model.train()
        loss_sum = 0.0
        model = trainer.model
        for _, logps, real in forward_micro_batches(trainer, model, sequences, budget):
            logp = pad_sequence(logps, batch_first=True)  # (B, R)
            mask = pad([torch.ones(len(lp)) for lp in logps], trainer.device)  # (B, R)
            loss = sft_loss(logp, mask, normalizer=total)  # mean NLL over the whole batch
            backward(loss, real)
            loss_sum += loss.item() * real  # this rank's share of the global mean
        grad_norm, skipped = optimizer_step(trainer)
        trainer.scheduler.step()
    m = Metrics()
    m.add_total("sft_loss", loss_sum)  # the shares of all ranks add up to the global mean
    for prompt, _ in sequences:
        m.add("prompt_tokens", prompt["input_ids"].shape[1])  # images' visual tokens included
    m.add_total("bad_images", len(bad))
    m.add("time_update", clock.seconds["update"])
    row = m.reduce()
    row.update(
        grad_norm=grad_norm, skipped_steps=float(skipped), lr=trainer.scheduler.get_last_lr()[0]
    )
    row.update(data_skipped=trainer.skipped_rows, engine_asleep=float(trainer.engine.asleep))
    return row


# =============================================================================================
# One stage, top to bottom; the launch
# =============================================================================================


class Stopped(Exception):
    """Every rank stopped at a step boundary on a scheduler's signal, its checkpoint saved."""


def run_stage(
    cfg: Config, engine: VLLMEngine | None = None, engine_pixels: tuple[int, int] | None = None
) -> tuple[str, VLLMEngine | None]:
    """Train one stage ("sft", "1" or "2") from `cfg.model`. Returns the exported checkpoint and
    the engine, which a following stage reuses (a sync replaces its weights); `engine_pixels`:
    the image range a new engine is sized for (all stages of a sequence). A stage that had
    finished before (its `DONE.json`) is skipped and hands on the engine it was given.

    The end of a stage, in an order a crash at any point resumes from: checkpoint the last step,
    export, write `DONE.json`, remove the checkpoints (`keep_finished_checkpoints`). A SIGTERM
    or SIGUSR1 (`fsdp.catch_stop_signals`) stops every rank at the next step boundary with a
    checkpoint of the steps done: `Stopped`."""
    from transformers import AutoProcessor

    finished = read_done(cfg.out_dir) if cfg.resume else None
    if finished is not None:  # nothing loaded, nothing written: a finished launch ends in seconds
        log0(f"[{cfg.stage}] finished before ({finished['steps']} steps, {cfg.out_dir}/{DONE}): "
             f"skipped; delete {DONE} to train it again")  # fmt: skip
        return finished["export"], engine
    trainer, start, total_steps = build_trainer(cfg, engine, engine_pixels)
    rank, sft = dist.get_rank(), cfg.stage == "sft"
    wandb = None
    if rank == 0 and cfg.wandb_project:
        import wandb

        name = os.path.basename(cfg.out_dir)
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), name=name)

    def save(step: int, final: bool = False) -> str:
        return save_checkpoint(cfg.out_dir, step, trainer.model, trainer.optimizer,
                               trainer.scheduler, keep=cfg.keep_checkpoints, final=final)  # fmt: skip

    saved = done = start  # the newest checkpoint's step; the steps done
    stopped_early = False
    steps = range(start, total_steps)
    bar = tqdm(steps, desc=f"stage {cfg.stage}", initial=start, total=total_steps, disable=rank > 0)
    for step in bar:
        if sig := stop_requested():  # every rank agrees at the boundary, then all stop here
            path = save(done) if saved != done else latest_checkpoint(cfg.out_dir)
            raise Stopped(f"[{cfg.stage}] {signal.Signals(sig).name}: every rank stopped after "
                          f"step {done} (checkpoint {path}); relaunch the same command to "
                          "continue")  # fmt: skip
        row = sft_step(trainer, step) if sft else rl_step(trainer, step)
        if cfg.val_every and trainer.val and (step + 1) % cfg.val_every == 0:
            if sft:  # RL steps end with a sync; SFT wakes the engine only to validate
                sync_engine(trainer)
            row.update(validate(trainer, step))
            if sft:
                trainer.engine.sleep()
        done = step + 1
        row = {"stage": cfg.stage, "step": done, **row}
        log_row(cfg.out_dir, row)
        if wandb:
            wandb.log(row, step=done)
        shown = ("reward", "acc_final", "format", "sft_loss", "val_acc_final")
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in shown})
        if cfg.save_every and done % cfg.save_every == 0:
            saved = done
            save(saved)
        if sft and (cfg.sft_stop_acc or cfg.sft_stop_format) and "val_acc_final" in row:
            acc, fmt = row["val_acc_final"], row["val_sc_format"]
            if acc >= cfg.sft_stop_acc and fmt >= cfg.sft_stop_format:
                log0(f"[sft] sampled accuracy {acc:.2f}, well-formed {fmt:.2f}: cold start done")
                stopped_early = True
                break
    # the last step is checkpointed before the export: a crash from here on redoes no step
    if saved != done:
        path = save(done, final=True)
    elif (path := latest_checkpoint(cfg.out_dir)) is not None and stopped_early:
        mark_final(path)  # the stop rule ended the stage here: a resume only exports
    export = os.path.join(cfg.out_dir, "export")
    if cfg.export:
        # the base model's processor settings, not this stage's image range: a later stage or
        # an evaluation sets its own
        export_hf(trainer.model, AutoProcessor.from_pretrained(cfg.model), export)
        log0(f"[{cfg.stage}] exported {export}")
    keep = cfg.keep_finished_checkpoints or not cfg.export  # without an export they are the result
    mark_done(cfg.out_dir, {"stage": cfg.stage, "steps": done,
                            "export": export if cfg.export else None,
                            "checkpoint": path if keep else None})  # fmt: skip
    if not keep:
        freed = remove_checkpoints(cfg.out_dir)
        log0(f"[{cfg.stage}] removed its checkpoints ({freed / 1e9:.2f} GB), kept the export")
    return export, trainer.engine


def build_trainer(
    cfg: Config, engine: VLLMEngine | None = None, engine_pixels: tuple[int, int] | None = None
) -> tuple[Trainer, int, int]:
    """Data, policy (and Stage I reference), optimizer, engine; resumed from the newest complete
    checkpoint of `cfg.out_dir` when there is one. Returns the trainer, the step to start from
    and the step to stop at."""
    from transformers import AutoProcessor

    rank, world, device = setup_distributed()
    check_config(cfg, world)
    cfg = fit_lengths(cfg, model_max_len(cfg.model), log=log0)
    random.seed(cfg.seed + rank)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    processor = AutoProcessor.from_pretrained(cfg.model)
    sft = cfg.stage == "sft"
    train, val, skipped = load_stage_data(cfg, processor, log=log0)
    per_step = cfg.sft_batch if sft else cfg.prompts_per_step
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train) / per_step)

    kw = dict(gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision)
    model = load_model(cfg.model, device, **kw)
    ref_model = load_model(cfg.model, device, trainable=False) if cfg.uses_reference else None
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    start = 0
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
        log0(f"[{cfg.stage}] resumed from {ckpt} (step {start})")
        if checkpoint_info(ckpt).get("final"):  # the stage ended there: only the export is left
            total_steps = start
    free_cache()  # vLLM's start-up check counts memory PyTorch's cache holds as taken
    max_images = cfg.max_images or max_images_of(train + val)
    engine = engine or engine_for(cfg, max_images, rank, engine_pixels)
    # this stage's image range: the trainer's processor and every request to the engine (which
    # may be sized for other stages too) tokenize an image alike
    size = image_size(cfg.model, cfg.min_pixels, cfg.max_pixels)
    if size is not None:
        processor.image_processor.size = dict(size)
    parts = (model, ref_model, optimizer, scheduler, engine, processor, device, train, val)
    trainer = Trainer(cfg, *parts, image_size=size, skipped_rows=skipped)
    if sft:
        trainer.engine.sleep()  # the cold start samples only to validate: the engine sleeps till then
    else:
        sync_engine(trainer)  # a new, reused or resumed engine must serve these weights
    log0(
        f"[{cfg.stage}] {len(train)} examples ({skipped} rows skipped), steps {start}.."
        f"{total_steps}, {world} ranks, {device}"
    )
    return trainer, start, total_steps


def make_optimizer(model, cfg: Config, total_steps: int):
    """AdamW with a linear warm-up, then a constant or cosine learning rate (the paper: lr 1e-6,
    weight decay 0.1, 10 warm-up steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    warmup = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps
    warmup = max(warmup, 0)

    def factor(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / (warmup + 1)
        if cfg.lr_schedule == "cosine":
            progress = (s - warmup) / max(total_steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def run_sequence(stages: list[Config]) -> VLLMEngine | None:
    """Run stages one after the other in one launch, each from the previous stage's export;
    `model="tiny"` builds the tiny Qwen3-VL first. A stage finished before (its `DONE.json`) is
    skipped, so a relaunch continues where the last launch stopped. Returns the engine (close
    it last), None when every stage had finished before."""
    from tiny import build_tiny

    catch_stop_signals()  # SIGTERM / SIGUSR1 stop at a step boundary with a checkpoint
    model, engine = stages[0].model, None
    if model == "tiny":
        model = os.path.join(os.path.dirname(stages[0].out_dir), "tiny-init")
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny(model)  # returns at once when built before
        setup_distributed()
        dist.barrier()
    if len(stages) > 1 and not stages[0].max_images:  # one engine for all: every stage's images
        limit = images_per_prompt(stages)
        stages = [c.replace(max_images=limit) for c in stages]
    # ... and every stage's image range (each request then names its stage's own)
    pixels = min(c.min_pixels for c in stages), max(c.max_pixels for c in stages)
    for before, cfg in zip([None, *stages], stages, strict=False):
        if model is None:  # the stage before finished with --export false
            raise SystemExit(f"{before.out_dir} has no export for {cfg.out_dir} to start from")
        if dist.is_initialized() and (sig := stop_requested()):  # signalled in a last step
            raise Stopped(f"{signal.Signals(sig).name}: stopped before {cfg.out_dir}; relaunch "
                          "the same command to continue")  # fmt: skip
        model, engine = run_stage(cfg.replace(model=model), engine, pixels)
    where = (
        stages[0].out_dir if len(stages) == 1 else f"{os.path.dirname(stages[-1].out_dir)}/stage-*"
    )
    log0(f"[done] metrics in {where}/metrics.jsonl, final model in {model}")
    return engine


def export_only(cfg: Config) -> None:
    """Turn the newest checkpoint of `cfg.out_dir` into a Hugging Face folder."""
    from transformers import AutoProcessor

    _, _, device = setup_distributed()
    model = load_model(cfg.model, device)
    optimizer, scheduler = make_optimizer(model, cfg, 1)
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        finished = read_done(cfg.out_dir) or {}
        raise SystemExit(f"no complete checkpoint under {cfg.out_dir}/checkpoints" + (
            f" (the stage finished and removed them: its export is {finished['export']})"
            if finished.get("export") else ""))  # fmt: skip
    load_checkpoint(ckpt, model, optimizer, scheduler)
    export_hf(model, AutoProcessor.from_pretrained(cfg.model), os.path.join(cfg.out_dir, "export"))


def plan_launch(argv: list[str], doc: str = "") -> tuple[list[Config], bool] | None:
    """What a launch of train.py runs: the stages' configs and whether it only exports. None
    for `--dry_run`, which prints each stage's config (rank 0) and what data is missing. Missing
    data stops the launch here, before any model loads: one message, no traceback."""
    name, overrides, flags = parse_args(argv, doc)
    stages = stage_configs(name, overrides)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank runs this
    missing = missing_data(stages)
    if flags["dry_run"]:
        for cfg in stages:
            check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            if rank0:
                print(json.dumps(dataclasses.asdict(cfg)))
        if missing and rank0:
            print(missing_data_message(missing), file=sys.stderr)
        return None
    if missing and not flags["export_only"]:
        if rank0:
            print(missing_data_message(missing), file=sys.stderr, flush=True)
        # exit status 1 alone; under torchrun 0, since a failed child makes the launcher print
        # its own traceback (ChildFailedError) under the message and bury it
        sys.exit(0 if "TORCHELASTIC_RUN_ID" in os.environ else 1)
    return stages, flags["export_only"]


def main(argv: list[str] | None = None) -> None:
    launch = plan_launch(sys.argv[1:] if argv is None else argv, __doc__)
    if launch is None:  # --dry_run
        return
    stages, export = launch
    if export:
        export_only(stages[-1])
    else:
        try:
            engine = run_sequence(stages)
        except Stopped as stop:
            log0(stop)
            sys.stdout.flush()
            sys.stderr.flush()
            # the checkpoint is complete; a scheduler's grace period is short (SLURM: 30 s), and
            # the engine's and the process group's teardown are not needed to resume
            os._exit(0)
        if engine is not None:  # last: under torchrun its teardown takes the process group along
            engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

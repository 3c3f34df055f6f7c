"""Per-GPU peak memory of each phase of one RL step (arXiv 2602.08503, Algorithm 1 as train.py
runs it: generate, log-prob passes, update, weight sync), computed from the model's shapes and a
`Config`; `--check` measures the activation and logits terms on the CPU.

    .venv/bin/python bench/memory_plan.py                        # Octopus-8B, 8 x H100-80GB
    .venv/bin/python bench/memory_plan.py --gpu_gb 40 --update_token_budget 4096 \\
        --logprob_token_budget 8192 --gpu_memory_utilization 0.5 --enforce_eager true  # A100-40GB
    OMP_NUM_THREADS=2 .venv/bin/python bench/memory_plan.py --check  # 7 CPU-min, 13 GB RAM

What train.py holds, and so what the plan counts (bytes per GPU):
- FSDP2 over all ranks, units = each vision block, the vision tower, each decoder layer, the
  root (embeddings, final norm, LM head). The policy keeps float32 master weights, AdamW's two
  float32 states and (during the update) float32 gradients, all sharded: 12 or 16 bytes per
  parameter / world. Compute is bf16: a unit's full bf16 weights are all-gathered while it runs
  (two units at once with prefetching); the root stays gathered from its forward until its
  backward (FSDP2 does not reshard the root after forward: torch/distributed/fsdp/_fully_shard/
  _fsdp_state.py, `_lazy_init`), so train.logprobs reshards a model after a pass without one.
  Stage I's frozen reference: bf16 shards (2 bytes / parameter / world).
- One packed row per micro-batch (packing.py): L tokens, T of them response tokens. Logits only
  at the T predicting positions, in bf16; log-probs in float32 chunks of 2048 rows (loss.py).
- The update checkpoints every decoder layer and vision block (non-reentrant): their inputs are
  kept, one layer at a time is recomputed in the backward. The log-prob passes run no_grad.
- vLLM 0.32 colocated: awake it takes `gpu_memory_utilization` x the card (weights, CUDA
  graphs, activations, KV cache: vllm/v1/worker/gpu_worker.py, `determine_available_memory`);
  asleep (level 1) its weights sit in CPU memory and the KV cache is gone, CUDA graphs and
  buffers stay. The sync gathers one float32 full tensor at a time; vLLM's layerwise reload
  (vllm/model_executor/model_loader/reload/layerwise.py) buffers it and builds a bf16 copy of
  the layer before copying in. vLLM's wake-up empties PyTorch's cache first
  (vllm/device_allocator/cumem.py, `wake_up`), so the sync's freed blocks do not stay reserved.

Every term is linear in the micro-batch's tokens (the attention kernels never build an L x L
matrix); `--check` measures them on a CPU at 1k-4k tokens, not at the paper's budgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from octopus import PRESETS, Config, preset  # noqa: E402

GIB = 1024**3
LOGPROB_CHUNK = 2048  # loss.LOGPROB_CHUNK (not imported: the plan needs no torch)

# Qwen/Qwen3-VL-8B-Instruct's config.json (the values that size memory). Checked against the copy
# in NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen3vl.py
# (QWEN3_VL_8B_CONFIG; it runs 4 text layers and notes 36 for the full model).
QWEN3_VL_8B = {
    "text_config": {
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 4096,
        "deepstack_visual_indexes": [8, 16, 24],
        "num_position_embeddings": 2304,
        "in_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

# Memory outside what the plan derives, per GPU: estimates, not measured here (no GPU).
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, NCCL communicator buffers, cuBLAS workspaces
ENGINE_GRAPHS_GIB = 1.0  # vLLM's CUDA graph pool: stays while asleep (none with enforce_eager)
ENGINE_BUFFERS_GIB = 0.5  # vLLM's persistent runner buffers, which stay while asleep
ENGINE_ACTIVATIONS_GIB = 2.0  # (inside the awake budget) vLLM's profiled activation peak
# What CUDA reports for a card sold as N GB (out-of-memory messages: "39.39 GiB total capacity"
# on an A100-40GB, 79.1 GiB on an H100-80GB); other sizes: 0.985 x N.
CARD_GIB = {40: 39.39, 80: 79.1}


# =============================================================================================
# Model shapes and parameter counts
# =============================================================================================


@dataclass(frozen=True)
class Shape:
    """What sizes Qwen3-VL's memory (text model, vision tower)."""

    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_inter: int
    v_heads: int
    patch: int
    temporal_patch: int
    merge: int
    out_hidden: int
    deepstack: int
    v_positions: int
    in_channels: int


def shape_of(config: dict, layers: int | None = None) -> Shape:
    """`Shape` of a Qwen3-VL config dict (as QWEN3_VL_8B); `layers` overrides the text depth."""
    t, v = config["text_config"], config["vision_config"]
    return Shape(
        hidden=t["hidden_size"],
        layers=layers if layers is not None else t["num_hidden_layers"],
        inter=t["intermediate_size"],
        heads=t["num_attention_heads"],
        kv_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        vocab=t["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        v_depth=v["depth"],
        v_hidden=v["hidden_size"],
        v_inter=v["intermediate_size"],
        v_heads=v["num_heads"],
        patch=v["patch_size"],
        temporal_patch=v["temporal_patch_size"],
        merge=v["spatial_merge_size"],
        out_hidden=v["out_hidden_size"],
        deepstack=len(v["deepstack_visual_indexes"]),
        v_positions=v["num_position_embeddings"],
        in_channels=v.get("in_channels", 3),
    )


def param_counts(s: Shape) -> dict[str, int]:
    """Parameters per FSDP unit of fsdp.load_model: one decoder layer, one vision block, the
    vision tower's own (patch and position embeddings, mergers), the root; and the total."""
    H, d = s.hidden, s.head_dim
    q, kv = s.heads * d, s.kv_heads * d
    layer = H * q + 2 * H * kv + q * H + 2 * d + 3 * H * s.inter + 2 * H  # no biases, 4 norms
    C, Iv = s.v_hidden, s.v_inter
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * Iv + Iv) + (Iv * C + C) + 2 * 2 * C
    wide = C * s.merge**2  # a merger works on 2 x 2 patches at once
    merger_fc = (wide * wide + wide) + (wide * s.out_hidden + s.out_hidden)
    patch_in = s.in_channels * s.temporal_patch * s.patch**2
    vision_root = (
        (patch_in * C + C)  # patch embedding (Conv3d with bias)
        + s.v_positions * C  # learned position grid
        + (2 * C + merger_fc)  # merger: LayerNorm before the shuffle
        + s.deepstack * (2 * wide + merger_fc)  # DeepStack mergers: LayerNorm after it
    )
    root = s.vocab * H * (1 if s.tied else 2) + H  # embeddings, LM head, final norm
    total = s.layers * layer + s.v_depth * block + vision_root + root
    return {
        "decoder_layer": layer,
        "vision_block": block,
        "vision_root": vision_root,
        "root": root,
        "total": total,
    }


# =============================================================================================
# One micro-batch: the packed row
# =============================================================================================


@dataclass(frozen=True)
class MicroBatch:
    """One packed row (packing.py): `tokens` L in all, `responses` T of them response tokens
    (each one's logits are computed), `kv_rows` = sum over responses of (its prompt + its own
    length): the keys and values packed_attention concatenates per response; `patches`: vision
    patches (4 per visual token)."""

    tokens: int
    responses: int
    kv_rows: int
    patches: int


def packed_micro_batch(
    budget: int, prompt_len: int, image_tokens: int, response_len: int, n_train: int
) -> MicroBatch:
    """The fullest micro-batch train.py forms: chunks of one prompt and up to `n_train`
    responses of up to `response_len` tokens, packed until `budget` tokens."""
    if prompt_len >= budget:
        raise ValueError(f"prompt_len {prompt_len} leaves no room in a budget of {budget}")
    tokens = responses = kv_rows = visual = 0
    while budget - tokens > prompt_len:
        tokens += prompt_len
        visual += image_tokens
        for _ in range(n_train):
            n = min(response_len, budget - tokens)
            if n <= 0:
                break
            tokens += n
            responses += n
            kv_rows += prompt_len + n
    return MicroBatch(tokens, responses, kv_rows, visual * 4)


# =============================================================================================
# Activations (bytes) of one micro-batch, from the code path of transformers 5.19's Qwen3-VL
# =============================================================================================


def _up(b: int) -> int:
    """Bytes of the float32 copy `.float()` / `.to(float32)` makes: none when already float32."""
    return 4 if b != 4 else 0


def decoder_layer_saved(s: Shape, mb: MicroBatch, b: int) -> int:
    """What one decoder layer saves for its backward (held while it is recomputed): RMSNorms
    keep a float32 input and the normalised value, q / k the same for their norms (rotary
    saves only cos / sin, which need no gradient), GQA's repeated keys and values, one
    [prompt; response] copy of them per response (packing.py), the attention output, the MLP's
    gate, activation, up projection and product."""
    H, Q, K, Iv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.inter
    per_token = (
        (_up(b) * H + 2 * b * H)  # input RMSNorm (its float32 input is the layer input itself)
        + (4 * Q + 2 * b * Q)  # q_norm's float32 input and normed value; q with rotary
        + (4 * K + b * K)  # k_norm's (the rotary output goes on to repeat_interleave)
        + 2 * b * Q  # keys and values repeated to every query head
        + b * Q
        + 4 * s.heads  # attention output and its log-sum-exp
        + b * Q  # o_proj's input
        + (4 * H + 2 * b * H)  # post-attention RMSNorm
        + 4 * b * Iv  # gate, SiLU(gate), up, product
    )
    return mb.tokens * per_token + 2 * b * Q * mb.kv_rows


def decoder_layer_backward(s: Shape, mb: MicroBatch, b: int, weight_grad: int = 0) -> int:
    """A layer's backward on top of the layers' checkpoints: the recomputed saved tensors, the
    gradient flowing in (L x H), then either down_proj's input gradient next to its weight
    gradient (`weight_grad` bytes, where one is materialised whole) or the two gradients of the
    MLP's product."""
    L, Iv = mb.tokens, s.inter
    extra = max(2 * L * Iv * b, L * Iv * b + weight_grad)
    return decoder_layer_saved(s, mb, b) + L * s.hidden * b + extra


def decoder_layer_forward(s: Shape, mb: MicroBatch, b: int) -> int:
    """Peak inside a layer's forward without saving (log-prob passes, and the update's forward
    under checkpointing), its input included: the MLP's activation, up and product next to the
    input, the residual and the normalised input; or attention's GQA copies and outputs."""
    H, Q, K, Iv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.inter
    mlp = 3 * b * Iv + 3 * b * H
    attention = 2 * b * H + b * Q + 2 * b * K + 2 * b * Q + 3 * b * Q
    return mb.tokens * max(mlp, attention)


def vision_saved(s: Shape, mb: MicroBatch, b: int) -> int:
    """The vision tower under checkpointing: each block's input, the pixels in the compute
    dtype (the patch embedding's input), the four mergers (LayerNorm, fc1, GELU), their
    outputs."""
    C = s.v_hidden
    patch_in = s.in_channels * s.temporal_patch * s.patch**2
    per_patch = (
        b * s.v_depth * C  # every block's input
        + 2 * b * (C // s.v_heads)  # rotary cos / sin
        + b * C
        + (1 + s.deepstack) * 3 * b * C  # merger inputs and their LN / fc1 / GELU
        + (1 + s.deepstack) * b * s.out_hidden // s.merge**2  # merged outputs
        + (b if b != 4 else 0) * patch_in  # pixels cast to the compute dtype
    )
    return mb.patches * per_patch


def vision_block_backward(s: Shape, mb: MicroBatch, b: int) -> int:
    """One vision block recomputed in the backward, plus its gradients: norm1's output, the
    qkv projection (kept by the attention's saved values), q and k after rotary, the attention
    output, proj's input, norm2's input and output, fc1's output and GELU's."""
    C, Iv = s.v_hidden, s.v_inter
    saved = b * (10 * C + 2 * Iv)
    return mb.patches * (saved + b * (C + 2 * Iv))


def logits_bytes(s: Shape, mb: MicroBatch, b: int) -> int:
    """(T, V) logits in the compute dtype."""
    return mb.responses * s.vocab * b


def logprob_logits_terms(V: int, T: int, b: int, temperature: float = 1.0) -> int:
    """No-grad log-probs of T positions (loss.token_logprobs): the logits, a float32 copy of one
    2048-row chunk and logsumexp's temporary of the same size (and a scaled copy at T != 1)."""
    n = min(LOGPROB_CHUNK, T)
    return T * V * b + n * V * (_up(b) + 4 + (4 if temperature != 1.0 else 0))


def update_logits_terms(V: int, H: int, T: int, b: int) -> dict[str, int]:
    """The logits' share of the update at each candidate peak (loss.token_logprobs with
    activation checkpointing per chunk, then the LM head's backward)."""
    n = min(LOGPROB_CHUNK, T)
    logits = T * V * b
    return {
        "forward, log-prob chunk": logits + n * V * (_up(b) + 4),
        # a chunk recomputed: its float32 rows, the gather's float32 gradient next to
        # logsumexp's backward (`grad * (x - lse).exp()`: two float32 temporaries), beside the
        # gradients of the chunks already done (held until split's backward)
        "backward, log-prob chunk": logits + (T - n) * V * b + n * V * (_up(b) + 12),
        # split's backward concatenates the chunks' gradients, select's copies them once more
        "backward, logits gradient": 2 * logits,
        "backward, LM head": logits + T * H * b,  # d logits and d (kept hidden states)
    }


def logprob_moments(s: Shape, mb: MicroBatch, b: int, temperature: float = 1.0) -> dict[str, int]:
    """Live activation bytes of a no_grad log-prob micro-batch at each candidate peak: inside
    the last decoder layer, at the LM head, in a log-prob chunk."""
    rope = 2 * mb.tokens * s.head_dim * b
    visual_out = (1 + s.deepstack) * mb.patches // s.merge**2 * s.out_hidden * b
    return {
        "layer": rope + visual_out + decoder_layer_forward(s, mb, b),
        "LM head": mb.tokens * s.hidden * b + mb.responses * s.hidden * b + logits_bytes(s, mb, b),
        "log-prob chunk": logprob_logits_terms(s.vocab, mb.responses, b, temperature),
    }


def update_moments(s: Shape, mb: MicroBatch, b: int, *, cpu_grads: bool) -> dict[str, int]:
    """Live activation bytes of one update micro-batch (forward and backward) at each candidate
    peak. `cpu_grads`: parameter gradients are dropped as they arrive (the `--check` run keeps
    none, as FSDP keeps only a shard), so a weight's gradient is a transient; on GPUs they are in
    the FSDP terms of `plan` instead."""
    H, V, T, L = s.hidden, s.vocab, mb.responses, mb.tokens
    # kept through the backward: every checkpointed layer's input, rotary cos / sin, the vision
    # tower's checkpoints; until the final norm's backward: its float32 input and normed value,
    # and the kept positions (the LM head's input)
    ckpt = s.layers * L * H * b + 2 * L * s.head_dim * b + vision_saved(s, mb, b)
    head = ckpt + L * H * (4 + b) + T * H * b
    vocab_grad = V * H * b if cpu_grads else 0  # the LM head's / embeddings' weight gradient
    moments = {
        "forward, last layer": ckpt - L * H * b + decoder_layer_forward(s, mb, b),
        "forward, LM head": head + L * H * b + logits_bytes(s, mb, b),
    }
    for name, value in update_logits_terms(V, H, T, b).items():
        moments[name] = head + value + (vocab_grad if name == "backward, LM head" else 0)
    weight_grad = s.inter * H * b if cpu_grads else 0  # down_proj's, whole on the CPU
    moments["backward, decoder layer"] = ckpt + decoder_layer_backward(s, mb, b, weight_grad)
    moments["backward, vision block"] = vision_saved(s, mb, b) + vision_block_backward(s, mb, b)
    moments["backward, embeddings"] = vocab_grad + L * H * b
    return moments


def peak(moments: dict[str, int]) -> tuple[str, int]:
    """The largest moment: (name, bytes)."""
    name = max(moments, key=moments.get)
    return name, moments[name]


# =============================================================================================
# The plan: each phase of one RL step on one GPU
# =============================================================================================


@dataclass
class Phase:
    name: str
    parts: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB)

    @property
    def total(self) -> float:
        return sum(g for _, g in self.parts)


@dataclass
class PlanInputs:
    """The shapes the plan is taken at (the fullest micro-batches `Config` allows)."""

    prompt_len: int
    image_tokens: int
    gpus: int
    gpu_gb: float


def capacity_gib(gpu_gb: float) -> float:
    """GiB that CUDA reports for a card sold as `gpu_gb` GB."""
    return CARD_GIB.get(gpu_gb, 0.985 * gpu_gb)


def worst_micro_batch(cfg: Config, budget: int, inputs: PlanInputs, s: Shape, b: int, fn):
    """The layout with the larger peak, `(micro-batch, moment, parts)`: one image prompt of
    `prompt_len` tokens, or short (128-token) text prompts that leave more of the budget to
    responses (more logits)."""
    layouts = [
        packed_micro_batch(
            budget, inputs.prompt_len, inputs.image_tokens, cfg.max_response_len, cfg.n_train
        ),
        packed_micro_batch(
            budget, min(128, inputs.prompt_len), 0, cfg.max_response_len, cfg.n_train
        ),
    ]
    best = [(mb, *worst_moment(fn(mb), s)) for mb in layouts]
    return max(best, key=lambda x: sum(v for _, v in x[2]))


def fsdp_transients(s: Shape, moment: str) -> list[tuple[str, int]]:
    """FSDP2's buffers (bytes) beyond the shards at a moment of `logprob_moments` /
    `update_moments`: gathered bf16 units (the running one and the prefetched next), unsharded
    bf16 gradients until their reduce-scatter, its float32 input. The root's gathered weights
    are resident in every such phase and counted there."""
    p = param_counts(s)
    layer, vocab = p["decoder_layer"], s.vocab * s.hidden
    gathered = ("2 decoder layers gathered (bf16)", 2 * 2 * layer)
    head_grad = ("LM head gradient, unsharded bf16", 2 * vocab)
    if moment in ("layer", "forward, last layer"):
        return [gathered]
    if moment == "backward, LM head":  # the last layer is prefetched for its backward
        return [head_grad, ("1 decoder layer gathered (bf16)", 2 * layer)]
    if moment in ("backward, decoder layer", "backward, vision block"):
        return [head_grad, gathered, ("its gradients bf16 + reduce-scatter fp32", 6 * layer)]
    if moment == "backward, embeddings":  # the root's gradients, cast for its reduce-scatter
        return [("root gradients bf16 + reduce-scatter fp32", 6 * p["root"])]
    return []


def worst_moment(moments: dict[str, int], s: Shape) -> tuple[str, list[tuple[str, int]]]:
    """The moment with the most activations + FSDP buffers, and what makes it up (bytes)."""
    parts = {
        name: [*fsdp_transients(s, name), (f"activations + logits ({name})", value)]
        for name, value in moments.items()
    }
    name = max(parts, key=lambda k: sum(v for _, v in parts[k]))
    return name, parts[name]


def plan(cfg: Config, inputs: PlanInputs, config: dict = QWEN3_VL_8B) -> tuple[list, dict]:
    """The phases of one RL step on one GPU, with what is resident in each (GiB), and notes
    (parameter counts, the micro-batches, the engine's KV cache) for the assumptions."""
    s = shape_of(config)
    p = param_counts(s)
    w, b = inputs.gpus, 2  # bf16 compute on GPUs
    g = 1 / GIB
    P, P_root = p["total"], p["root"]
    kl = cfg.kl_coef > 0 and (cfg.stage == "1" or cfg.kl_tokens == "response")
    cap = capacity_gib(inputs.gpu_gb)

    master, adam, grads = 4 * P / w * g, 8 * P / w * g, 4 * P / w * g
    # train.logprobs reshards a model after its pass: a root stays gathered only while it runs
    ref = [("reference bf16 shards", 2 * P / w * g)] if kl else []
    cuda = [("CUDA context, NCCL, cuBLAS (est.)", CUDA_OVERHEAD_GIB)]
    graphs = 0.0 if cfg.enforce_eager else ENGINE_GRAPHS_GIB
    asleep = [("vLLM asleep: CUDA graphs, buffers (est.)", graphs + ENGINE_BUFFERS_GIB)]
    root_gathered = ("policy root gathered (bf16)", 2 * P_root * g)

    phases = []
    engine = cfg.gpu_memory_utilization * cap
    phases.append(
        Phase(
            "generate (engine awake)",
            [
                ("policy fp32 shards", master),
                ("AdamW states", adam),
                *ref,
                *cuda,
                (f"vLLM: {cfg.gpu_memory_utilization:g} x {cap:.1f} GiB", engine),
            ],
        )
    )

    lp_mb, _, lp_parts = worst_micro_batch(
        cfg,
        cfg.logprob_token_budget,
        inputs,
        s,
        b,
        lambda mb: logprob_moments(s, mb, b, cfg.temperature),
    )
    for who in ["policy", "reference"] if kl else ["policy"]:
        phases.append(
            Phase(
                f"log-probs, {who} micro-batch",
                [
                    ("policy fp32 shards", master),
                    ("AdamW states", adam),
                    *ref,
                    *cuda,
                    *asleep,
                    (f"{who} root gathered (bf16)", 2 * P_root * g),
                    *[(what, n * g) for what, n in lp_parts],
                ],
            )
        )

    up_mb, _, up_parts = worst_micro_batch(
        cfg,
        cfg.update_token_budget,
        inputs,
        s,
        b,
        lambda mb: update_moments(s, mb, b, cpu_grads=False),
    )
    phases.append(
        Phase(
            "update, micro-batch fwd+bwd",
            [
                ("policy fp32 shards", master),
                ("AdamW states", adam),
                ("gradient shards fp32", grads),
                *ref,
                *cuda,
                *asleep,
                root_gathered,
                *[(what, n * g) for what, n in up_parts],
            ],
        )
    )
    phases.append(
        Phase(
            "update, optimizer step",
            [
                ("policy fp32 shards", master),
                ("AdamW states", adam),
                ("gradient shards fp32", grads),
                ("AdamW's sqrt(v) temporary (foreach)", 4 * P / w * g),
                *ref,
                *cuda,
                *asleep,
            ],
        )
    )

    largest = s.vocab * s.hidden  # embeddings (= LM head): the largest tensor
    phases.append(
        Phase(
            "weight sync (engine weights awake)",
            [
                ("policy fp32 shards", master),
                ("AdamW states", adam),
                *ref,
                *cuda,
                *asleep,
                ("vLLM weights bf16", 2 * P * g),
                ("largest full tensor fp32 + vLLM's bf16 copy", 6 * largest * g),
            ],
        )
    )

    weights = 2 * P * g
    kv = engine - weights - graphs - ENGINE_ACTIVATIONS_GIB
    kv_per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2  # K and V, bf16
    notes = {
        "params": p,
        "logprob_mb": lp_mb,
        "update_mb": up_mb,
        "capacity": cap,
        "kv_gib": kv,
        "kv_tokens": int(max(kv, 0) * GIB / kv_per_token),
        "kv_per_token": kv_per_token,
        "graphs": graphs,
        "reference": kl,
    }
    return phases, notes


def print_plan(cfg: Config, name: str, inputs: PlanInputs) -> list[Phase]:
    phases, notes = plan(cfg, inputs)
    cap = notes["capacity"]
    p = notes["params"]
    print(
        f"Per-GPU memory plan: {name}, Qwen3-VL-8B ({p['total'] / 1e9:.2f}B parameters), "
        f"{inputs.gpus} GPUs of {inputs.gpu_gb:g} GB (~{cap:.1f} GiB usable)\n"
    )
    print("| phase | what is resident | GiB per GPU |\n| --- | --- | ---: |")
    for ph in phases:
        parts = ", ".join(f"{what} {gib:.1f}" for what, gib in ph.parts)
        flag = "" if ph.total <= cap else " **over**"
        print(f"| {ph.name} | {parts} | {ph.total:.1f}{flag} |")
    worst = max(phases, key=lambda ph: ph.total)
    print(
        f"\npeak: {worst.name}, {worst.total:.1f} of {cap:.1f} GiB "
        f"(headroom {cap - worst.total:.1f} GiB)"
    )
    lp, up = notes["logprob_mb"], notes["update_mb"]
    seq = cfg.max_prompt_len + cfg.max_response_len
    print("\nAssumptions:")
    for line in [
        f"parameters: total {p['total']:,}; per decoder layer {p['decoder_layer']:,}, vision "
        f"block {p['vision_block']:,}, vision tower's own {p['vision_root']:,}, root "
        f"(embeddings + LM head + norm) {p['root']:,}",
        "policy: float32 master weights and AdamW states (12 B/param / world), float32 gradient "
        "shards during the update (+4), freed by zero_grad(set_to_none) before generation",
        f"reference (Stage I, kl_coef > 0): {'yes' if notes['reference'] else 'no'}; bf16 "
        "shards; a root (embeddings + LM head) is gathered only while its model runs: FSDP2 "
        "reshards a root in its backward, so train.logprobs reshards after a no-grad pass",
        f"log-prob micro-batch: {lp.tokens} tokens, {lp.responses} response positions "
        f"(logits), {lp.patches // 4} visual tokens (budget {cfg.logprob_token_budget})",
        f"update micro-batch: {up.tokens} tokens, {up.responses} response positions, "
        f"{up.patches // 4} visual tokens (budget {cfg.update_token_budget}); a micro-batch of "
        "short text prompts (more responses) and one with a "
        f"{inputs.prompt_len}-token image prompt are both planned, the larger is shown",
        "activations are linear in tokens: no L x L attention matrix (SDPA flash / efficient "
        "kernels, a causal_lower_right bias per response); logits only at response positions",
        f"vLLM awake: gpu_memory_utilization x card = weights {2 * p['total'] / GIB:.1f} + CUDA "
        f"graphs ~{notes['graphs']:g} + activations ~{ENGINE_ACTIVATIONS_GIB:g} + KV cache "
        f"~{notes['kv_gib']:.1f} GiB (~{notes['kv_tokens']:,} tokens at "
        f"{notes['kv_per_token'] // 1024} KiB; a full {seq}-token sequence takes "
        f"{notes['kv_per_token'] * seq / GIB:.2f} GiB)",
        f"vLLM asleep (level 1): CUDA graphs (~{ENGINE_GRAPHS_GIB:g} GiB, none with "
        f"--enforce_eager true) and runner buffers (~{ENGINE_BUFFERS_GIB:g} GiB) stay (estimates); "
        f"CUDA context + NCCL + cuBLAS ~{CUDA_OVERHEAD_GIB:g} GiB (estimate)",
        "not counted: the caching allocator's fragmentation (PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True keeps it small; vLLM 0.32 accepts it)",
    ]:
        print(f"- {line}")
    return phases


# =============================================================================================
# --check: the activation and logits terms measured on the CPU (float32)
# =============================================================================================

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors go back to the OS at once


def _rss() -> tuple[int, int]:
    """(current, peak since the last reset) resident bytes of this process."""
    with open("/proc/self/status") as f:
        status = f.read()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    return now, hwm


def measure(fn) -> int:
    """Peak resident bytes while `fn()` runs, above what was resident before it (Linux: the
    peak counter VmHWM is reset through /proc/self/clear_refs)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, _ = _rss()
    fn()
    gc.collect()
    return _rss()[1] - base


def _drop_grads(model) -> None:
    """Parameter gradients are freed as they arrive (FSDP keeps only a 1/world shard)."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def _check_logits(tokens: list[int]) -> list[dict]:
    """The logits terms alone: a 64-wide LM head over the vocabulary (the vocabulary terms do
    not depend on the width), loss.token_logprobs in no_grad and forward + backward."""
    import torch
    import torch.nn.functional as F

    from loss import token_logprobs

    s = dataclasses.replace(shape_of(QWEN3_VL_8B, layers=0), hidden=64)
    weight = torch.randn(s.vocab, s.hidden) * 0.02
    rows = []
    for T in tokens:
        hidden = torch.randn(1, T, s.hidden)
        labels = torch.randint(0, s.vocab, (T,))

        def logprob(hidden=hidden, labels=labels):
            with torch.no_grad():
                token_logprobs(F.linear(hidden, weight)[0], labels)

        def update(hidden=hidden, labels=labels):
            h = hidden.clone().requires_grad_()
            token_logprobs(F.linear(h, weight)[0], labels).sum().backward()

        # resident before: the 64-wide input and the weight; the update's input copy is not
        lp_plan = max(T * s.vocab * 4, logprob_logits_terms(s.vocab, T, 4))
        up_plan = T * s.hidden * 4 + max(update_logits_terms(s.vocab, s.hidden, T, 4).values())
        rows.append(
            {
                "term": f"logits, log-prob pass, T={T}",
                "measured": measure(logprob),
                "planned": lp_plan,
            }
        )
        rows.append(
            {
                "term": f"logits, update fwd+bwd, T={T}",
                "measured": measure(update),
                "planned": up_plan,
            }
        )
    return rows


def _config_8b():
    """Qwen3-VL-8B's transformers config, without a KV cache (as fsdp.load_model sets)."""
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(**QWEN3_VL_8B)
    config.text_config.use_cache = False
    return config


def _layout(prompt: int, responses: list[int]) -> tuple[list, MicroBatch]:
    """packed_attention's layout for one prompt and its responses, and the MicroBatch."""
    spans, at = [], prompt
    for n in responses:
        spans.append((at, at + n))
        at += n
    T = sum(responses)
    return [(0, prompt, spans)], MicroBatch(prompt + T, T, len(responses) * prompt + T, 0)


def _check_layer(lengths: list[int]) -> list[dict]:
    """One 8B decoder layer (float32, packed attention): no_grad forward, and forward under
    non-reentrant checkpointing + backward (its weight gradients dropped as they arrive)."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextDecoderLayer,
        Qwen3VLTextRotaryEmbedding,
    )

    import packing  # importing it registers the packed attention

    config = _config_8b().text_config
    config._attn_implementation = packing.ATTENTION
    s = shape_of(QWEN3_VL_8B, layers=1)
    torch.manual_seed(0)
    layer = Qwen3VLTextDecoderLayer(config, 0)
    _drop_grads(layer)
    rotary = Qwen3VLTextRotaryEmbedding(config)
    rows = []
    for L in lengths:
        prompt = L // 4
        layout, mb = _layout(
            prompt, [(L - prompt) // 3] * 2 + [L - prompt - 2 * ((L - prompt) // 3)]
        )
        x = torch.randn(1, L, s.hidden)
        pos = torch.arange(L).expand(3, 1, L)
        cos, sin = rotary(x, pos)
        grad = torch.randn(1, L, s.hidden)
        call = functools.partial(layer, position_embeddings=(cos, sin), packed_layout=layout)

        def forward(call=call, x=x):
            with torch.no_grad():
                layer.eval()
                call(x)

        def backward(call=call, x=x, grad=grad):
            layer.train()
            h = x.clone().requires_grad_()  # the checkpoint's input, as the layer before gives
            out = checkpoint(call, h, use_reentrant=False)
            out.backward(grad)

        fwd_plan = decoder_layer_forward(s, mb, 4) - L * s.hidden * 4  # the input is resident
        bwd_plan = (
            decoder_layer_backward(s, mb, 4, weight_grad=s.inter * s.hidden * 4)
            - L * s.hidden * 4  # the incoming gradient is resident before
            + 2 * L * s.hidden * 4  # the layer's input copy and its output (the caller's)
        )
        rows.append(
            {
                "term": f"decoder layer, no_grad forward, L={L}",
                "measured": measure(forward),
                "planned": fwd_plan,
            }
        )
        rows.append(
            {
                "term": f"decoder layer, checkpointed fwd+bwd, L={L}",
                "measured": measure(backward),
                "planned": bwd_plan,
            }
        )
    return rows


def _check_model(prompt_len: int, image_tokens: int, responses: list[int]) -> list[dict]:
    """The 8B-shaped Qwen3-VL with 2 decoder layers (float32, random weights, ~2.2B parameters):
    one packed micro-batch through packing.pack + packing.response_logprobs, no_grad (a log-prob
    pass) and, with gradient checkpointing, forward + loss.policy_loss + backward (an update)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from loss import policy_loss
    from packing import pack, response_logprobs, use_packed_attention

    config = _config_8b()
    config.text_config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    use_packed_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _drop_grads(model)
    s = shape_of(QWEN3_VL_8B, layers=2)

    side = int(round((image_tokens * s.merge**2) ** 0.5))  # patches per side of a square image
    grid = torch.tensor([[1, side, side]])
    patches = side * side
    text = prompt_len - patches // s.merge**2 - 2
    ids = torch.cat(
        [
            torch.tensor([QWEN3_VL_8B["vision_start_token_id"]]),
            torch.full((patches // s.merge**2,), QWEN3_VL_8B["image_token_id"]),
            torch.tensor([QWEN3_VL_8B["vision_end_token_id"]]),
            torch.randint(0, 151000, (text,)),
        ]
    )[None]
    types = (ids == QWEN3_VL_8B["image_token_id"]).long()
    patch_in = s.in_channels * s.temporal_patch * s.patch**2
    prompt = {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "image_grid_thw": grid,
        "pixel_values": torch.randn(patches, patch_in),
    }
    answers = [torch.randint(0, 151000, (n,)).tolist() for n in responses]
    packed = pack([(prompt, answers)], model.model.get_rope_index)
    T = sum(responses)
    mb = MicroBatch(prompt_len + T, T, len(responses) * prompt_len + T, patches)
    device = torch.device("cpu")

    def logprob():
        model.eval()
        with torch.no_grad():
            response_logprobs(model, packed, device)

    old = [torch.randn(n) - 2 for n in responses]
    adv = torch.randn(len(responses))

    def update():
        model.train()
        logps = response_logprobs(model, packed, device)
        logp = torch.nn.utils.rnn.pad_sequence(logps, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n) for n in responses], True)
        old_logp = torch.nn.utils.rnn.pad_sequence(old, batch_first=True)
        loss, _ = policy_loss(
            logp,
            old_logp,
            adv,
            mask,
            ratio="sequence_token",
            clip_low=3e-4,
            clip_high=4e-4,
            agg="seq",
            normalizer=8.0,
        )
        loss.backward()

    lp = logprob_moments(s, mb, 4)
    up = update_moments(s, mb, 4, cpu_grads=True)
    label = f"L={mb.tokens}, T={T}, {patches // 4} visual tokens"
    return [
        {
            "term": f"2-layer model, log-prob micro-batch ({label}), peak at {peak(lp)[0]}",
            "measured": measure(logprob),
            "planned": peak(lp)[1],
        },
        {
            "term": f"2-layer model, update micro-batch ({label}), peak at {peak(up)[0]}",
            "measured": measure(update),
            "planned": peak(up)[1],
        },
    ]


def run_check() -> int:
    """Each measurement group in a fresh process (malloc returning freed tensors to the OS);
    prints measured vs planned and returns 1 if any term is off by more than 20%."""
    env = {**os.environ, **MALLOC_ENV}
    jobs = [
        ["logits", "1024,2048,4096"],
        ["layer", "1024,2048"],
        ["model", "512,256,512,512,512"],  # prompt 512 (256 visual tokens), 3 responses
    ]
    rows, start = [], time.perf_counter()
    for what, arg in jobs:
        print(f"[check] measuring: {what} {arg}", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_measure", what, arg],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    print("| term (float32, CPU) | measured GiB | planned GiB | planned / measured |")
    print("| --- | ---: | ---: | ---: |")
    bad = 0
    for r in rows:
        ratio = r["planned"] / r["measured"]
        bad += not 0.8 <= ratio <= 1.2
        print(
            f"| {r['term']} | {r['measured'] / GIB:.2f} | {r['planned'] / GIB:.2f} | {ratio:.2f} |"
        )
    print(
        "\nmeasured: peak resident memory (VmHWM, reset via /proc/self/clear_refs) minus the "
        "resident memory before the call, in a fresh process per group, MALLOC_MMAP_THRESHOLD_"
        "=131072; weights and inputs are resident before, so not part of either column"
    )
    print(f"{len(rows) - bad}/{len(rows)} within 20%; {time.perf_counter() - start:.0f} s")
    return 1 if bad else 0


def _measure(what: str, arg: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    nums = [int(x) for x in arg.split(",")]
    if what == "logits":
        rows = _check_logits(nums)
    elif what == "layer":
        rows = _check_layer(nums)
    else:
        rows = _check_model(nums[0], nums[1], nums[2:])
    print(json.dumps(rows))


# =============================================================================================
# Command line
# =============================================================================================


KNOBS = (  # the Config fields that move the plan
    "update_token_budget",
    "logprob_token_budget",
    "gpu_memory_utilization",
    "enforce_eager",
    "max_response_len",
    "n_train",
    "kl_coef",
    "temperature",
)


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rl_8b = sorted(k for k, v in PRESETS.items() if v.get("stage") != "sft" and "demo" not in k)
    ap.add_argument(
        "--preset",
        default="octopus-8b-stage1",
        choices=rl_8b,
        help="an RL run of the paper (the plan is for Qwen3-VL-8B)",
    )
    ap.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over (the world)")
    ap.add_argument("--gpu_gb", type=float, default=80.0, help="memory of one GPU, GB as sold")
    ap.add_argument(
        "--prompt_len",
        type=int,
        default=None,
        help="longest prompt in tokens (default: the preset's max_prompt_len)",
    )
    ap.add_argument(
        "--image_tokens",
        type=int,
        default=1280,
        help="visual tokens of that prompt (max_pixels / 28^2 = 1280)",
    )
    for name in KNOBS:
        kind = type(getattr(Config(), name))
        if kind is bool:
            ap.add_argument(
                f"--{name}",
                type=_boolean,
                default=None,
                metavar="{true,false}",
                help=f"Config.{name}",
            )
        else:
            ap.add_argument(f"--{name}", type=kind, default=None, help=f"Config.{name}")
    ap.add_argument(
        "--check",
        action="store_true",
        help="measure the activation and logits terms on this CPU (7 CPU-minutes, 13 GB)",
    )
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        _measure(*args._measure)
        return 0
    if args.check:
        return run_check()
    overrides = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    cfg = preset(args.preset, **overrides)
    inputs = PlanInputs(
        prompt_len=args.prompt_len or cfg.max_prompt_len,
        image_tokens=min(args.image_tokens, args.prompt_len or cfg.max_prompt_len),
        gpus=args.gpus,
        gpu_gb=args.gpu_gb,
    )
    print_plan(cfg, args.preset, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

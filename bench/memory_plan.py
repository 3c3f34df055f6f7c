"""Per-GPU peak memory of each phase of one RL step (arXiv 2602.08503, Algorithm 1 as train.py
runs it: generate, log-prob passes, update, weight sync), computed from the model's shapes and a
`Config`; `--check` (bench/memory_check.py) measures the activation and logits terms on the CPU.

    .venv/bin/python bench/memory_plan.py                        # Octopus-8B, 8 x H100-80GB
    .venv/bin/python bench/memory_plan.py --gpu_gb 40 --update_token_budget 4096 \\
        --logprob_token_budget 8192 --gpu_memory_utilization 0.45 --enforce_eager true  # A100-40GB
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
  asleep (level 2, rollout.SLEEP_LEVEL) its weights and KV cache are discarded (the next sync
  rewrites every weight; level 1 would keep a host copy), CUDA graphs and buffers stay. The
  sync gathers one full tensor at a time in the engine's dtype, bf16 (train.sync_engine);
  vLLM's layerwise reload (vllm/model_executor/model_loader/reload/layerwise.py) buffers it
  and builds a bf16 copy of the layer before copying in. vLLM's wake-up empties PyTorch's cache first
  (vllm/device_allocator/cumem.py, `wake_up`), so the sync's freed blocks do not stay reserved.

Every term is linear in the micro-batch's tokens (the attention kernels never build an L x L
matrix); `--check` measures them on a CPU at 1k-4k tokens, not at the paper's budgets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import PRESETS, Config, preset  # noqa: E402

GIB = 1024**3
LOGPROB_CHUNK = 2048  # loss.LOGPROB_CHUNK (not imported: the plan needs no torch)

# Qwen/Qwen3-VL-8B-Instruct's config.json (the values that size memory). Checked against the copy
# in NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen3vl.py
# (QWEN3_VL_8B_CONFIG; it runs 4 text layers and notes 36 for the full model).
QWEN3_VL_8B = json.loads("""{
  "text_config": {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_parameters": {
      "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
      "mrope_interleaved": true},
    "tie_word_embeddings": false, "hidden_act": "silu", "attention_bias": false},
  "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
    "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 4096,
    "deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304, "in_channels": 3,
    "hidden_act": "gelu_pytorch_tanh"},
  "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
  "vision_end_token_id": 151653, "tie_word_embeddings": false}""")

# Memory outside what the plan derives, per GPU: estimates, not measured here (no GPU).
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, NCCL communicator buffers, cuBLAS workspaces
ENGINE_GRAPHS_GIB = 1.0  # vLLM's CUDA graph pool: stays while asleep (none with enforce_eager)
ENGINE_BUFFERS_GIB = 0.5  # vLLM's persistent runner buffers, which stay while asleep
ENGINE_ACTIVATIONS_GIB = 2.0  # (inside the awake budget) vLLM's profiled activation peak
SLEEP_LEVEL = 2  # rollout.SLEEP_LEVEL: the weights are discarded, not kept on the host
SYNC_BYTES = 2  # train.sync_engine gathers each full tensor in the engine's dtype, bf16
# What the utilization default leaves free while the engine is awake: the caching allocator's
# fragmentation and the estimates above (Config.gpu_memory_utilization is `max_utilization`)
HEADROOM = 0.10
# What CUDA reports for a card sold as N GB (out-of-memory messages: "39.39 GiB total capacity"
# on an A100-40GB, 79.1 GiB on an H100-80GB); other sizes: 0.985 x N.
CARD_GIB = {40: 39.39, 80: 79.1}

# =============================================================================================
# Model shapes, parameter counts, the packed micro-batch
# =============================================================================================


# What sizes Qwen3-VL's memory: the text model's widths, then the vision tower's (v_, patches).
Shape = namedtuple(
    "Shape",
    "hidden layers inter heads kv_heads head_dim vocab tied v_depth v_hidden v_inter v_heads patch "
    "temporal_patch merge out_hidden deepstack v_positions in_channels",
)


def _patch_in(s: Shape) -> int:
    """Values per vision patch: channels x frames x patch x patch."""
    return s.in_channels * s.temporal_patch * s.patch**2


def shape_of(config: dict, layers: int | None = None) -> Shape:
    """`Shape` of a Qwen3-VL config dict (as QWEN3_VL_8B); `layers` overrides the text depth."""
    t, v = config["text_config"], config["vision_config"]
    text = [t[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")]
    text += [t[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")]
    vision = [v[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads")]
    vision += [v[k] for k in ("patch_size", "temporal_patch_size", "spatial_merge_size")]
    if layers is not None:
        text[1] = layers
    vision += [v["out_hidden_size"], len(v["deepstack_visual_indexes"])]
    vision += [v["num_position_embeddings"], v.get("in_channels", 3)]
    return Shape(*text, bool(config.get("tie_word_embeddings", False)), *vision)


def param_counts(s: Shape) -> dict[str, int]:
    """Parameters per FSDP unit of fsdp.load_model: one decoder layer, one vision block, the
    vision tower's own (patch and position embeddings, mergers), the root; and the total."""
    H, d, C, Iv = s.hidden, s.head_dim, s.v_hidden, s.v_inter
    q, kv = s.heads * d, s.kv_heads * d
    layer = H * q + 2 * H * kv + q * H + 2 * d + 3 * H * s.inter + 2 * H  # no biases, 4 norms
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * Iv + Iv) + (Iv * C + C) + 2 * 2 * C
    wide = C * s.merge**2  # a merger works on 2 x 2 patches at once
    merger_fc = (wide * wide + wide) + (wide * s.out_hidden + s.out_hidden)
    vision_root = (
        (_patch_in(s) * C + C)  # patch embedding (Conv3d with bias)
        + s.v_positions * C  # learned position grid
        + (2 * C + merger_fc)  # merger: LayerNorm before the shuffle
        + s.deepstack * (2 * wide + merger_fc)  # DeepStack mergers: LayerNorm after it
    )
    root = s.vocab * H * (1 if s.tied else 2) + H  # embeddings, LM head, final norm
    total = s.layers * layer + s.v_depth * block + vision_root + root
    names = ("decoder_layer", "vision_block", "vision_root", "root", "total")
    return dict(zip(names, (layer, block, vision_root, root, total), strict=True))


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's packed row (packing.py): `tokens` L in all, `responses` T of them
    response tokens (each one's logits are computed), `kv_rows` = sum over responses of (its
    prompt + its own length): the keys and values packed_attention concatenates per response;
    `patches`: vision patches (4 per visual token)."""

    tokens: int
    responses: int
    kv_rows: int
    patches: int


def packed_micro_batch(
    budget: int, prompt_len: int, image_tokens: int, response_len: int, n_train: int
) -> MicroBatch:
    """The fullest micro-batch train.py forms: segments of one prompt and up to `n_train`
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
# Activations (bytes) of one micro-batch, from the code path of transformers 5.19's Qwen3-VL;
# b: bytes per value of the compute dtype
# =============================================================================================


def _up(b: int) -> int:
    """Bytes of the float32 copy `.float()` / `.to(float32)` makes: none when already float32."""
    return 4 if b != 4 else 0


def decoder_layer_saved(s: Shape, mb: MicroBatch, b: int) -> int:
    """What one decoder layer saves for its backward (held while it is recomputed): RMSNorms
    keep a float32 input and the normalised value, q / k the same for their norms (rotary
    saves only cos / sin), GQA's repeated keys and values, one [prompt; response] copy of them
    per response (packing.py), the attention output, the MLP's gate, activation, up, product."""
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
    per_patch = (
        b * s.v_depth * C  # every block's input
        + 2 * b * (C // s.v_heads)  # rotary cos / sin
        + b * C
        + (1 + s.deepstack) * 3 * b * C  # merger inputs and their LN / fc1 / GELU
        + (1 + s.deepstack) * b * s.out_hidden // s.merge**2  # merged outputs
        + (b if b != 4 else 0) * _patch_in(s)  # pixels cast to the compute dtype
    )
    return mb.patches * per_patch


def vision_block_backward(s: Shape, mb: MicroBatch, b: int) -> int:
    """One vision block recomputed in the backward, plus its gradients: norm1's output, the
    qkv projection (kept by the attention's saved values), q and k after rotary, the attention
    output, proj's input, norm2's input and output, fc1's output and GELU's."""
    C, Iv = s.v_hidden, s.v_inter
    saved = b * (10 * C + 2 * Iv)
    return mb.patches * (saved + b * (C + 2 * Iv))  # and the gradients flowing through it


def logprob_logits_terms(V: int, T: int, b: int, temperature: float = 1.0) -> int:
    """No-grad log-probs of T positions (loss.token_logprobs): the logits, a float32 copy of one
    2048-row chunk and logsumexp's temporary of the same size (and a scaled copy at T != 1)."""
    n = min(LOGPROB_CHUNK, T)
    return T * V * b + n * V * (_up(b) + 4 + (4 if temperature != 1.0 else 0))


def update_logits_terms(V: int, H: int, T: int, b: int) -> dict[str, int]:
    """The logits' share of the update at each candidate peak (loss.token_logprobs with
    activation checkpointing per chunk, then the LM head's backward)."""
    n, logits = min(LOGPROB_CHUNK, T), T * V * b
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
    logits = mb.responses * s.vocab * b
    return {
        "layer": rope + visual_out + decoder_layer_forward(s, mb, b),
        "LM head": mb.tokens * s.hidden * b + mb.responses * s.hidden * b + logits,
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
        "forward, LM head": head + L * H * b + T * V * b,
    }
    for name, value in update_logits_terms(V, H, T, b).items():
        moments[name] = head + value + (vocab_grad if name == "backward, LM head" else 0)
    weight_grad = s.inter * H * b if cpu_grads else 0  # down_proj's, whole on the CPU
    moments["backward, decoder layer"] = ckpt + decoder_layer_backward(s, mb, b, weight_grad)
    moments["backward, vision block"] = vision_saved(s, mb, b) + vision_block_backward(s, mb, b)
    moments["backward, embeddings"] = vocab_grad + L * H * b
    return moments


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


def worst_micro_batch(cfg: Config, budget: int, inputs: PlanInputs, s: Shape, moments_of):
    """`(micro-batch, parts)` of the layout and moment with the most activations + FSDP buffers
    (bytes): one image prompt of `prompt_len` tokens, or short (128-token) text prompts that
    leave more of the budget to responses (more logits)."""
    worst = []
    short = min(128, inputs.prompt_len)
    for prompt, image in [(inputs.prompt_len, inputs.image_tokens), (short, 0)]:
        mb = packed_micro_batch(budget, prompt, image, cfg.max_response_len, cfg.n_train)
        parts = [
            [*fsdp_transients(s, name), (f"activations + logits ({name})", value)]
            for name, value in moments_of(mb).items()
        ]
        worst.append((mb, max(parts, key=lambda ps: sum(v for _, v in ps))))
    return max(worst, key=lambda x: sum(v for _, v in x[1]))


def plan(cfg: Config, inputs: PlanInputs, config: dict = QWEN3_VL_8B) -> tuple[list, dict]:
    """The phases of one RL step on one GPU, with what is resident in each (GiB), and notes
    (parameter counts, the micro-batches, the engine's KV cache) for the assumptions."""
    s, w, b, g = shape_of(config), inputs.gpus, 2, 1 / GIB  # bf16 compute on GPUs
    p = param_counts(s)
    P = p["total"]
    kl = cfg.kl_coef > 0 and (cfg.stage == "1" or cfg.kl_tokens == "response")
    cap = CARD_GIB.get(inputs.gpu_gb, 0.985 * inputs.gpu_gb)  # GiB that CUDA reports
    engine = cfg.gpu_memory_utilization * cap
    graphs = 0.0 if cfg.enforce_eager else ENGINE_GRAPHS_GIB
    grads = ("gradient shards fp32", 4 * P / w * g)
    # train.logprobs reshards a model after its pass: a root stays gathered only while it runs
    ref = [("reference bf16 shards", 2 * P / w * g)] if kl else []
    cuda = [("CUDA context, NCCL, cuBLAS (est.)", CUDA_OVERHEAD_GIB)]
    asleep = [("vLLM asleep: CUDA graphs, buffers (est.)", graphs + ENGINE_BUFFERS_GIB)]

    def phase(name: str, tail: list, update: tuple = (), engine_awake: bool = False) -> Phase:
        held = [("policy fp32 shards", 4 * P / w * g), ("AdamW states", 8 * P / w * g), *update]
        return Phase(name, [*held, *ref, *cuda, *([] if engine_awake else asleep), *tail])

    def micro_batch(who: str, parts: list) -> list:
        return [(f"{who} root gathered (bf16)", 2 * p["root"] * g), *[(x, n * g) for x, n in parts]]

    logprob_at = partial(logprob_moments, s, b=b, temperature=cfg.temperature)
    update_at = partial(update_moments, s, b=b, cpu_grads=False)
    lp_mb, lp_parts = worst_micro_batch(cfg, cfg.logprob_token_budget, inputs, s, logprob_at)
    up_mb, up_parts = worst_micro_batch(cfg, cfg.update_token_budget, inputs, s, update_at)
    vllm = f"vLLM: {cfg.gpu_memory_utilization:g} x {cap:.1f} GiB"
    phases = [phase("generate (engine awake)", [(vllm, engine)], engine_awake=True)]
    for who in ["policy", "reference"] if kl else ["policy"]:
        phases.append(phase(f"log-probs, {who} micro-batch", micro_batch(who, lp_parts)))
    phases.append(phase("update, micro-batch fwd+bwd", micro_batch("policy", up_parts), (grads,)))
    sqrt_v = ("AdamW's sqrt(v) temporary (foreach)", 4 * P / w * g)
    phases.append(phase("update, optimizer step", [], (grads, sqrt_v)))
    largest = s.vocab * s.hidden  # embeddings (= LM head): the largest tensor
    sync = [("vLLM weights bf16", 2 * P * g)]
    sync.append(("largest full tensor bf16 + vLLM's bf16 copy", 2 * SYNC_BYTES * largest * g))
    phases.append(phase("weight sync (engine weights awake)", sync))

    kv = engine - 2 * P * g - graphs - ENGINE_ACTIVATIONS_GIB
    kv_per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2  # K and V, bf16
    kv_tokens = int(max(kv, 0) * GIB / kv_per_token)
    notes = dict(params=p, logprob_mb=lp_mb, update_mb=up_mb, capacity=cap, kv_gib=kv)
    notes.update(kv_tokens=kv_tokens, kv_per_token=kv_per_token, graphs=graphs, reference=kl)
    return phases, notes


def max_utilization(
    cfg: Config, inputs: PlanInputs, config: dict = QWEN3_VL_8B, headroom: float = HEADROOM
) -> float:
    """The largest `gpu_memory_utilization`, in steps of 0.05, that leaves `headroom` x the card
    free while the engine is awake (generation). The engine sleeps through every other phase,
    so only generation moves with it; at 0 that phase holds the trainer's share alone."""
    phases, notes = plan(cfg.replace(gpu_memory_utilization=0.0), inputs, config)
    trainer = next(p.total for p in phases if p.name.startswith("generate"))
    cap = notes["capacity"]
    return math.floor(round(((1 - headroom) * cap - trainer) / cap * 20, 6)) / 20


def print_plan(cfg: Config, name: str, inputs: PlanInputs) -> list[Phase]:
    phases, notes = plan(cfg, inputs)
    cap, p, lp, up = notes["capacity"], notes["params"], notes["logprob_mb"], notes["update_mb"]
    print(
        f"Per-GPU memory plan: {name}, Qwen3-VL-8B ({p['total'] / 1e9:.2f}B parameters), "
        f"{inputs.gpus} GPUs of {inputs.gpu_gb:g} GB (~{cap:.1f} GiB usable)\n"
    )
    print("| phase | what is resident | GiB per GPU |\n| --- | --- | ---: |")
    for ph in phases:
        parts = ", ".join(f"{what} {gib:.1f}" for what, gib in ph.parts)
        print(f"| {ph.name} | {parts} | {ph.total:.1f}{'' if ph.total <= cap else ' **over**'} |")
    worst = max(phases, key=lambda ph: ph.total)
    print(
        f"\npeak: {worst.name}, {worst.total:.1f} of {cap:.1f} GiB "
        f"(headroom {cap - worst.total:.1f} GiB)"
    )
    best = max_utilization(cfg, inputs)
    print(
        f"largest --gpu_memory_utilization leaving {HEADROOM:.0%} of the card free: {best:.2f} "
        f"(Config's default: {Config().gpu_memory_utilization:g})"
    )
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
        f"vLLM asleep (level {SLEEP_LEVEL}: weights and KV cache discarded): CUDA graphs (~{ENGINE_GRAPHS_GIB:g} GiB, none with "
        f"--enforce_eager true) and runner buffers (~{ENGINE_BUFFERS_GIB:g} GiB) stay (estimates); "
        f"CUDA context + NCCL + cuBLAS ~{CUDA_OVERHEAD_GIB:g} GiB (estimate)",
        "not counted: the caching allocator's fragmentation (PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True keeps it small; vLLM 0.32 accepts it)",
    ]:
        print(f"- {line}")
    return phases


# The Config fields that move the plan: flags of the command line.
KNOBS = "update_token_budget logprob_token_budget gpu_memory_utilization enforce_eager".split()
KNOBS += "max_response_len n_train kl_coef temperature".split()


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "0", "false", "no"):
        return text.lower() in ("1", "true", "yes")
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    head, epilog = __doc__.split("\n\n")[:2]
    ap = argparse.ArgumentParser(
        description=head, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    rl_8b = sorted(k for k, v in PRESETS.items() if v.get("stage") != "sft" and "demo" not in k)
    ap.add_argument(
        "--preset", default="octopus-8b-stage1", choices=rl_8b,
        help="an RL run of the paper (the plan is for Qwen3-VL-8B)",
    )  # fmt: skip
    for flag, kind, default, text in (
        ("--gpus", int, 8, "GPUs FSDP shards over (the world)"),
        ("--gpu_gb", float, 80.0, "memory of one GPU, GB as sold"),
        (
            "--prompt_len",
            int,
            None,
            "longest prompt, tokens (default: the preset's max_prompt_len)",
        ),
        ("--image_tokens", int, 1280, "visual tokens of that prompt (max_pixels / 28^2 = 1280)"),
    ):
        ap.add_argument(flag, type=kind, default=default, help=text)
    for name in KNOBS:
        kind = type(getattr(Config(), name))
        extra = {"type": _boolean, "metavar": "{true,false}"} if kind is bool else {"type": kind}
        ap.add_argument(f"--{name}", default=None, help=f"Config.{name}", **extra)
    ap.add_argument(
        "--check", action="store_true",
        help="measure the activation and logits terms on this CPU (7 CPU-minutes, 13 GB)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.check:
        check = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_check.py")
        return subprocess.call([sys.executable, check])
    overrides = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    cfg = preset(args.preset, **overrides)
    prompt_len = args.prompt_len or cfg.max_prompt_len
    inputs = PlanInputs(prompt_len, min(args.image_tokens, prompt_len), args.gpus, args.gpu_gb)
    print_plan(cfg, args.preset, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/memory_plan.py's activation and logits terms measured on this CPU (float32), against
the plan's own formulas: the logits terms behind a 64-wide LM head, one 8B decoder layer with the
packed attention, and an 8B-shaped Qwen3-VL with 2 decoder layers and the full vision tower
through the trainer's own packing and loss functions. Every term is linear in the micro-batch's
tokens (the attention kernels never build an L x L matrix), so 1k-4k tokens stand in for the
paper's budgets. Prints measured against planned; exits 1 if any term is off by more than 20%.

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory_check.py  # 7 CPU-minutes, 13 GB of RAM
    .venv/bin/python bench/memory_plan.py --check             # the same
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # memory_plan, beside this file

from memory_plan import (  # noqa: E402
    GIB,
    QWEN3_VL_8B,
    MicroBatch,
    Shape,
    _patch_in,
    decoder_layer_backward,
    decoder_layer_forward,
    logprob_logits_terms,
    logprob_moments,
    shape_of,
    update_logits_terms,
    update_moments,
)

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors go back to the OS at once


def _rss() -> tuple[int, int]:
    """(current, peak since the last reset) resident bytes of this process."""
    with open("/proc/self/status") as f:
        status = f.read()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
    return now, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024


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


def _row(term: str, fn, planned: int) -> dict:
    return {"term": term, "measured": measure(fn), "planned": planned}


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

    s = shape_of(QWEN3_VL_8B, layers=0)._replace(hidden=64)
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
        rows.append(_row(f"logits, log-prob pass, T={T}", logprob, lp_plan))
        rows.append(_row(f"logits, update fwd+bwd, T={T}", update, up_plan))
    return rows


def _config_8b():
    """Qwen3-VL-8B's transformers config, without a KV cache (as fsdp.load_model sets)."""
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(**QWEN3_VL_8B)
    config.text_config.use_cache = False
    return config


def _check_layer(lengths: list[int]) -> list[dict]:
    """One 8B decoder layer (float32, packed attention): no_grad forward, and forward under
    non-reentrant checkpointing + backward (its weight gradients dropped as they arrive)."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import AttentionInterface
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

    import packing

    config = _config_8b().text_config
    # what packing.use_packed_attention does for a whole model, for one layer
    AttentionInterface.register(packing.ATTENTION, packing.packed_attention)
    config._attn_implementation = packing.ATTENTION
    s = shape_of(QWEN3_VL_8B, layers=1)
    torch.manual_seed(0)
    layer = qwen3_vl.Qwen3VLTextDecoderLayer(config, 0)
    _drop_grads(layer)
    rotary = qwen3_vl.Qwen3VLTextRotaryEmbedding(config)
    rows = []
    for L in lengths:
        prompt, n = L // 4, (L - L // 4) // 3
        spans = [(prompt, prompt + n), (prompt + n, prompt + 2 * n), (prompt + 2 * n, L)]
        mb = MicroBatch(L, L - prompt, 3 * prompt + L - prompt, 0)
        x, grad = torch.randn(1, L, s.hidden), torch.randn(1, L, s.hidden)
        cos_sin = rotary(x, torch.arange(L).expand(3, 1, L))
        call = functools.partial(
            layer, position_embeddings=cos_sin, packed_layout=[(0, prompt, spans)]
        )

        def forward(call=call, x=x):
            with torch.no_grad():
                layer.eval()
                call(x)

        def backward(call=call, x=x, grad=grad):
            layer.train()
            h = x.clone().requires_grad_()  # the checkpoint's input, as the layer before gives
            checkpoint(call, h, use_reentrant=False).backward(grad)

        fwd_plan = decoder_layer_forward(s, mb, 4) - L * s.hidden * 4  # the input is resident
        bwd_plan = (
            decoder_layer_backward(s, mb, 4, weight_grad=s.inter * s.hidden * 4)
            - L * s.hidden * 4  # the incoming gradient is resident before
            + 2 * L * s.hidden * 4  # the layer's input copy and its output (the caller's)
        )
        rows.append(_row(f"decoder layer, no_grad forward, L={L}", forward, fwd_plan))
        rows.append(_row(f"decoder layer, checkpointed fwd+bwd, L={L}", backward, bwd_plan))
    return rows


def _image_prompt(s: Shape, prompt_len: int, image_tokens: int) -> dict:
    """A processor-like prompt: one square image of `image_tokens` visual tokens, then text."""
    import torch

    side = int(round((image_tokens * s.merge**2) ** 0.5))  # patches per side of a square image
    visual = side * side // s.merge**2
    ids = torch.cat(
        [
            torch.tensor([QWEN3_VL_8B["vision_start_token_id"]]),
            torch.full((visual,), QWEN3_VL_8B["image_token_id"]),
            torch.tensor([QWEN3_VL_8B["vision_end_token_id"]]),
            torch.randint(0, 151000, (prompt_len - visual - 2,)),
        ]
    )[None]
    types = (ids == QWEN3_VL_8B["image_token_id"]).long()
    pixels = torch.randn(side * side, _patch_in(s))
    grid = torch.tensor([[1, side, side]])
    return {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "image_grid_thw": grid,
        "pixel_values": pixels,
    }


def _check_model(prompt_len: int, image_tokens: int, responses: list[int]) -> list[dict]:
    """The 8B-shaped Qwen3-VL with 2 decoder layers (float32, random weights, ~2.2B parameters):
    one packed micro-batch through packing.pack + packing.response_logprobs, no_grad (a log-prob
    pass) and, with gradient checkpointing, forward + loss.policy_loss + backward (an update)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
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
    prompt = _image_prompt(s, prompt_len, image_tokens)
    answers = [torch.randint(0, 151000, (n,)).tolist() for n in responses]
    packed = pack([(prompt, answers)], model.model.get_rope_index)
    patches, T = len(prompt["pixel_values"]), sum(responses)
    mb = MicroBatch(prompt_len + T, T, len(responses) * prompt_len + T, patches)
    cpu = torch.device("cpu")

    def logprob():
        model.eval()
        with torch.no_grad():
            response_logprobs(model, packed, cpu)

    old = pad_sequence([torch.randn(n) - 2 for n in responses], batch_first=True)
    mask = pad_sequence([torch.ones(n) for n in responses], batch_first=True)
    adv = torch.randn(len(responses))
    kw = dict(ratio="sequence_token", clip_low=3e-4, clip_high=4e-4, agg="seq", normalizer=8.0)

    def update():
        model.train()
        logp = pad_sequence(response_logprobs(model, packed, cpu), batch_first=True)
        policy_loss(logp, old, adv, mask, **kw)[0].backward()

    label = f"L={mb.tokens}, T={T}, {patches // 4} visual tokens"
    lp, up = logprob_moments(s, mb, 4), update_moments(s, mb, 4, cpu_grads=True)
    (lp_at, lp_plan), (up_at, up_plan) = (max(m.items(), key=lambda kv: kv[1]) for m in (lp, up))
    return [
        _row(f"2-layer model, log-prob micro-batch ({label}), peak at {lp_at}", logprob, lp_plan),
        _row(f"2-layer model, update micro-batch ({label}), peak at {up_at}", update, up_plan),
    ]


def run_check() -> int:
    """Each measurement group in a fresh process (malloc returning freed tensors to the OS);
    prints measured vs planned and returns 1 if any term is off by more than 20%."""
    jobs = [
        ["logits", "1024,2048,4096"],
        ["layer", "1024,2048"],
        ["model", "512,256,512,512,512"],  # prompt 512 (256 visual tokens), 3 responses
    ]
    rows, start = [], time.perf_counter()
    for what, arg in jobs:
        print(f"[check] measuring: {what} {arg}", file=sys.stderr, flush=True)
        command = [sys.executable, os.path.abspath(__file__), "--_measure", what, arg]
        env = {**os.environ, **MALLOC_ENV}
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
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
    if what == "model":
        print(json.dumps(_check_model(nums[0], nums[1], nums[2:])))
    else:
        print(json.dumps({"logits": _check_logits, "layer": _check_layer}[what](nums)))


def main(argv: list[str] | None = None) -> int:
    head, epilog = __doc__.split("\n\n")[:2]
    ap = argparse.ArgumentParser(
        description=head, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)  # one group, run by run_check
    args = ap.parse_args(argv)
    if args._measure:
        _measure(*args._measure)
        return 0
    return run_check()


if __name__ == "__main__":
    sys.exit(main())

"""The training forward: each prompt once per micro-batch, its responses packed after it.

Batching has three words, used throughout (train.py, fsdp.py, loss.py):

- mini-batch: the groups of one optimizer step (`Config.mini_batch_prompts` prompts, each with
  its N samples); the loss normalizers count the whole mini-batch on all ranks (loss.py).
- micro-batch: what one forward (and backward) runs: at most a token budget
  (`Config.update_token_budget`, `Config.logprob_token_budget`) packed into ONE row, no padding:

      [prompt A][a1][a2][a3][prompt B][b1][b2] ...

- segment: one prompt and the responses that follow it in that row; a whole group, or a share
  of one that does not fit the budget (each share repeats the prompt).

The N trained samples of a group share one prompt (chat template, image tokens, question) and
differ only in the response. A padded batch of `prompt + response` rows runs the prompt N times
through every layer, the vision tower included; in the paper's setting (prompts up to 2048
tokens, 16 samples per prompt, arXiv 2602.08503 experimental setup) that is most of the
update's tokens. In the packed row a custom attention lets every response token see its own
prompt and the earlier tokens of its own response, nothing else. Each prompt's keys and values
are computed once and serve all of its responses; the gradient reaches the prompt (and the
vision tower) from every response. The result is exactly the per-sample computation
(tests/test_packing.py compares log-probs and gradients with plain per-sample forwards), at the
cost of one prompt per segment instead of one per sample.

Positions follow Qwen3-VL's multimodal rotary scheme: the prompt's (3, P) positions come from the
model's own `get_rope_index` (images included), and every response of the segment continues
from the same next position, as if it were the only one.

`--shared_prompt false` in train.py makes every segment one prompt and one response (the
per-sample computation, in the same packed layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from loss import token_logprobs

ATTENTION = "octopus_packed"


@dataclass
class Packed:
    """One micro-batch packed into one row: model inputs plus where each response sits in it."""

    inputs: dict  # input_ids (1, L), mm_token_type_ids (1, L), position_ids (3, 1, L), pixels
    layout: list[tuple[int, int, list[tuple[int, int]]]]  # per segment: prompt start, end, spans
    predictors: torch.Tensor  # (T,) row positions whose hidden state predicts each label
    labels: torch.Tensor  # (T,) every response token, in order
    lengths: list[int]  # tokens of each response, in order


def encode_prompt(processor, prompt: dict) -> dict:
    """The processor's tensors for one rendered prompt (rollout.render_prompt): ids, image
    patches, grid, token types; what `pack` takes as a segment's prompt."""
    enc = processor(text=[prompt["prompt"]], images=prompt["images"] or None, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}


def pack(segments: list[tuple[dict, list[list[int]]]], rope_index: Callable) -> Packed:
    """Pack one micro-batch's `(prompt, responses)` segments into one row.

    `prompt` is the processor's output for one rendered prompt (`input_ids` (1, P),
    `mm_token_type_ids` (1, P), and `pixel_values` / `image_grid_thw` when it has images);
    `responses` are token-id lists. `rope_index` is the model's `get_rope_index`.
    """
    ids, types, positions, pixels, grids = [], [], [], [], []
    layout, predictors, labels, lengths = [], [], [], []
    at = 0
    for prompt, responses in segments:
        p_ids, p_types = prompt["input_ids"], prompt["mm_token_type_ids"]
        grid = prompt.get("image_grid_thw")
        p_pos, _ = rope_index(p_ids, p_types, grid)  # (3, 1, P)
        n_prompt = p_ids.shape[1]
        ids.append(p_ids[0])
        types.append(p_types[0])
        positions.append(p_pos[:, 0])
        if grid is not None:
            pixels.append(prompt["pixel_values"])
            grids.append(grid)
        start, prompt_end = at, at + n_prompt
        at = prompt_end
        first_position = int(p_pos.max()) + 1  # every response continues the prompt from here
        spans = []
        for r in responses:
            n = len(r)
            ids.append(torch.tensor(r, dtype=torch.long))
            types.append(torch.zeros(n, dtype=torch.long))
            positions.append((torch.arange(n) + first_position).expand(3, n))
            spans.append((at, at + n))
            # token 0 is predicted by the prompt's last position, token k by response token k-1
            predictors += [prompt_end - 1, *range(at, at + n - 1)]
            labels += r
            lengths.append(n)
            at += n
        layout.append((start, prompt_end, spans))
    inputs = {
        "input_ids": torch.cat(ids)[None],  # (1, L)
        "mm_token_type_ids": torch.cat(types)[None],  # (1, L)
        "position_ids": torch.cat(positions, dim=1)[:, None],  # (3, 1, L)
    }
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)  # (patches, C * T * p * p)
        inputs["image_grid_thw"] = torch.cat(grids)  # (images, 3)
    return Packed(
        inputs,
        layout,
        torch.tensor(predictors, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        lengths,
    )


def segment_groups(
    prompt_lens: list[int], response_lens: list[list[int]], budget: int, *, shared: bool = True
) -> list[tuple[int, list[int]]]:
    """Groups (given by their prompt and response lengths) cut into segments of at most
    `budget` tokens, as `(group, response indices)`; a segment costs its prompt once plus its
    responses. A group that does not fit is split, each share paying for the prompt again; a
    prompt plus a single response over the budget still forms a segment (never dropped).
    `shared=False`: one segment per response (the per-sample computation).
    """
    segments = []
    for g, (prompt, lengths) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        current, cost = [], prompt
        for k, n in enumerate(lengths):
            if current and (not shared or cost + n > budget):
                segments.append((g, current))
                current, cost = [], prompt
            current.append(k)
            cost += n
        if current:
            segments.append((g, current))
    return segments


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: list | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a packed row (transformers' attention interface): a prompt attends to
    itself causally; a response attends to its whole prompt and causally to itself.

    query (1, H, L, D), key / value (1, H_kv, L, D) -> (1, L, H, D). The causal mask of a response
    is aligned to the bottom right (`causal_lower_right`), which SDPA's flash and memory-efficient
    kernels support, so no L x L mask is ever built. Without a layout (a plain forward) this is
    ordinary causal SDPA.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: every query head reads its key/value head
        key = key.repeat_interleave(groups, dim=1)  # (1, H, L, D)
        value = value.repeat_interleave(groups, dim=1)  # (1, H, L, D)
    if packed_layout is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    # The row is the prompts and responses back to back: one `split` into them (its backward is
    # a single concatenation; slicing each piece instead would give every piece a zero-filled
    # gradient of the whole row, quadratic in the number of responses).
    sizes = [
        n for start, end, spans in packed_layout for n in (end - start, *(b - a for a, b in spans))
    ]
    qs, ks, vs = (x.split(sizes, dim=2) for x in (query, key, value))  # each (1, H, n, D)
    pieces, at = [], 0
    for _, _, spans in packed_layout:
        q_prompt, k_prompt, v_prompt = qs[at], ks[at], vs[at]  # (1, H, P, D)
        pieces.append(  # (1, H, P, D)
            F.scaled_dot_product_attention(
                q_prompt, k_prompt, v_prompt, is_causal=True, scale=scaling
            )
        )
        for k in range(at + 1, at + 1 + len(spans)):
            keys = torch.cat([k_prompt, ks[k]], dim=2)  # (1, H, P + n, D)
            values = torch.cat([v_prompt, vs[k]], dim=2)  # (1, H, P + n, D)
            mask = causal_lower_right(qs[k].shape[2], keys.shape[2])  # the prompt, then causal
            pieces.append(  # (1, H, n, D)
                F.scaled_dot_product_attention(qs[k], keys, values, attn_mask=mask, scale=scaling)
            )
        at += 1 + len(spans)
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None  # (1, L, H, D)


def use_packed_attention(model) -> None:
    """Register `packed_attention` with transformers under `ATTENTION` and switch the language
    model's attention to it (the vision tower keeps its own). A custom name has no mask function
    in transformers, so no L x L mask is built either. The layout reaches the attention as the
    `packed_layout` keyword of the model's forward, which transformers hands on to it."""
    AttentionInterface.register(ATTENTION, packed_attention)
    model.config.get_text_config()._attn_implementation = ATTENTION


def response_logprobs(
    model, packed: Packed, device: torch.device, temperature: float = 1.0
) -> list[torch.Tensor]:
    """log p of every response token, one (n,) tensor per response in packing order.

    One forward over the micro-batch's packed row; only the positions that predict response tokens go through
    the LM head (`logits_to_keep` as an index tensor), so the prompt costs no logits at all.
    """
    inputs = {k: v.to(device) for k, v in packed.inputs.items()}
    logits = model(
        **inputs, logits_to_keep=packed.predictors.to(device), packed_layout=packed.layout
    ).logits  # (1, T, V)
    logp = token_logprobs(logits[0], packed.labels.to(device), temperature)  # (T,)
    return list(logp.split(packed.lengths))

"""The training forward: each group packed once per micro-batch as a token tree.

Batching has three words, used throughout (train.py, fsdp.py, loss.py):

- mini-batch: the groups of one optimizer step (`Config.mini_batch_prompts` prompts, each with
  its N samples); the loss normalizers count the whole mini-batch on all ranks (loss.py).
- micro-batch: what one forward (and backward) runs: at most a token budget
  (`Config.update_token_budget`, `Config.logprob_token_budget`) packed into ONE row, no padding:

      [prompt A][a-nodes ...][prompt B][b-nodes ...] ...

- segment: one prompt and the responses that follow it in that row; a whole group, or a share
  of one that does not fit the budget (each share repeats the prompt and whatever else its
  responses share: every path stays whole).

Under a causal model the log-probability of a token depends only on the tokens before it, so a
group's N trained samples form a tree: the prompt (chat template, image tokens, question) at
the root, then the longest common prefixes of the responses. An Octopus group (arXiv
2602.08503, Sec. 3.2, Algorithm 1) is mostly shared prefixes: a splice `o1_i + SC + o2_j`
repeats the `o1_i + SC` of rollout i and of every other splice of o1_i. `token_tree` builds the
tree from the token ids that are there (a splice re-encoded as text may differ from its source
near the boundary; then the two share what they share and branch there). Each node's tokens
are computed once, attending to all of their ancestors and causally to themselves; each
sample's log-probs are gathered along its path, so the loss, its masks, the KL and the
sequence-level ratios see exactly the per-sample values, and a shared token's gradient is the
sum of its uses (tests/test_packing.py compares log-probs and gradients with plain per-sample
forwards). A shared node too short to pay for its own attention call (`MIN_SAVED`) is copied
into its children instead.

`packing` (one of `PACKINGS`) says how a segment's responses are laid out:

- "tree": the token tree above (the default);
- "prompt": the prompt once, every response a child of it (only the prompt shared);
- "sample": every response after its own copy of the prompt (the per-sample computation).

Positions follow Qwen3-VL's multimodal rotary scheme: the prompt's (3, P) positions come from the
model's own `get_rope_index` (images included), and every path continues from the same next
position, as if its response were the only one: a node starts where its parent's path ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from loss import token_logprobs

ATTENTION = "octopus_packed"
PACKINGS = ("tree", "prompt", "sample")
# A shared node saving fewer tokens than this is copied into its children (`token_tree`). Each
# node costs a few kernel launches per layer (two concatenations, the attention, their
# backward); at 8B on an H100 a layer computes a token in a few microseconds, so a node pays
# for its launches once it saves a few dozen tokens.
MIN_SAVED = 32


@dataclass
class Packed:
    """One micro-batch packed into one row: model inputs plus where each response sits in it."""

    inputs: dict  # input_ids (1, L), mm_token_type_ids (1, L), position_ids (3, 1, L), pixels
    # per segment: prompt start, end, and its nodes in row order as (start, end, parent), the
    # parent an index into the same list, -1 for the prompt
    layout: list[tuple[int, int, list[tuple[int, int, int]]]]
    predictors: torch.Tensor  # (T,) row positions whose hidden state predicts each label
    labels: torch.Tensor  # (T,) every node token after a prompt, in row order
    lengths: list[int]  # tokens of each response, in order
    # (sum(lengths),) where each response's tokens sit in `labels`, response after response;
    # None where that is `labels` itself (nothing shared beyond the prompt)
    gather: torch.Tensor | None = None


def encode_prompt(processor, prompt: dict) -> dict:
    """The processor's tensors for one rendered prompt (rollout.render_prompt): ids, image
    patches, grid, token types; what `pack` takes as a segment's prompt."""
    enc = processor(text=[prompt["prompt"]], images=prompt["images"] or None, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}


# =============================================================================================
# The token tree of a group's responses
# =============================================================================================


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists. Binary search over slice
    comparisons (each in C): O(n) element comparisons, no Python loop per token."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo]; the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def token_tree(
    responses: Sequence[Sequence[int]], min_saved: int = 0
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """The responses of one segment as a compressed trie of their token ids, below the prompt.

    Returns `(nodes, ends)`: `nodes[v] = (parent, ids)` in depth-first pre-order (a parent
    before its children, -1 the root: the prompt), and `ends[k]` the node where response k's
    path ends (-1 for an empty response). Response k's ids are the concatenated ids of the
    nodes from the root to `ends[k]`. With `min_saved` 0, no two children of a node start with
    the same token, and a node with one child ends some response, so no tree over these paths
    has fewer tokens: `tree_tokens(responses)` of them.

    `min_saved`: a shared node that saves fewer tokens than this (its length times its
    children less one) and ends no response is copied into each of its children instead: the
    same paths, a few tokens more, one attention call per layer fewer (a `<think>` opening
    shared by every response is not worth a call of its own).

    Built from the responses in sorted order and the common prefixes of neighbours (the way a
    suffix tree is built from a suffix array): O(total tokens) besides the sort.
    """
    order = sorted(range(len(responses)), key=lambda k: responses[k])
    # node 0 is the root; node v holds response `source[v]`'s tokens [start[v], end[v])
    start, end, parent, source, children = [0], [0], [-1], [-1], [[]]

    def new(a: int, b: int, up: int, src: int) -> int:
        start.append(a), end.append(b), parent.append(up), source.append(src), children.append([])
        return len(start) - 1

    ends = [0] * len(responses)
    path, prev = [0], None  # the nodes along the previous response's path
    for k in order:
        r = responses[k]
        shared = 0 if prev is None else common_prefix(prev, r)
        last = None
        while end[path[-1]] > shared:
            last = path.pop()
        top = path[-1]
        if end[top] < shared:  # `last` runs past what the two share: split it there
            mid = new(end[top], shared, top, source[last])
            children[top][-1] = mid  # `last` is the newest child of `top`
            children[mid].append(last)
            parent[last], start[last] = mid, shared
            path.append(mid)
            top = mid
        if len(r) > shared:
            leaf = new(shared, len(r), top, k)
            children[top].append(leaf)
            path.append(leaf)
            top = leaf
        ends[k] = top
        prev = r
    # number the nodes depth-first, children in sorted order (root left out), parents first so
    # that a node copied into its children makes them longer before they are weighed
    number, nodes, stack, ending = {0: -1}, [], list(reversed(children[0])), set(ends)
    while stack:
        v = stack.pop()
        if v not in ending and (end[v] - start[v]) * (len(children[v]) - 1) < min_saved:
            for c in children[v]:  # each child's source runs through v: it starts where v did
                start[c], parent[c] = start[v], parent[v]
        else:
            number[v] = len(nodes)
            nodes.append((number[parent[v]], list(responses[source[v]][start[v] : end[v]])))
        stack.extend(reversed(children[v]))
    return nodes, [number[v] for v in ends]


def tree_tokens(responses: Sequence[Sequence[int]]) -> int:
    """Tokens of the smallest tree, `token_tree(responses)` (`min_saved` 0): every distinct
    prefix once, i.e. the total length less the common prefix of each response with its
    neighbour in sorted order."""
    ordered = sorted(responses)
    return sum(map(len, ordered)) - sum(
        common_prefix(a, b) for a, b in zip(ordered, ordered[1:], strict=False)
    )


def _check(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def segment_cost(
    prompt_len: int,
    responses: Sequence[Sequence[int]],
    packing: str = "tree",
    min_saved: int = MIN_SAVED,
) -> int:
    """Tokens of one segment's packed row under `packing`: its prompt once ("tree", "prompt")
    or once per response ("sample"), plus its responses' tokens ("tree": the tree's)."""
    _check(packing)
    if packing == "tree":
        return prompt_len + sum(len(ids) for _, ids in token_tree(responses, min_saved)[0])
    copies = len(responses) if packing == "sample" else min(len(responses), 1)
    return copies * prompt_len + sum(map(len, responses))


def segment_groups(
    prompt_lens: list[int],
    responses: list[list],
    budget: int,
    *,
    packing: str = "tree",
    min_saved: int = MIN_SAVED,
) -> list[tuple[int, list[int]]]:
    """Groups cut into segments of at most `budget` tokens, as `(group, response indices)`
    (indices ascending); a segment costs `segment_cost`.

    `responses[g]` holds group g's responses as token-id lists (their lengths suffice for
    "prompt" and "sample"). A group that does not fit is split, each share paying again for
    the prompt ("prompt") or for its paths' shared ancestors ("tree": the responses are cut in
    sorted order, so that a share is a run of neighbouring paths and repeats only the
    ancestors at its edges); a segment of one response over the budget is still formed (never
    dropped). "sample": one segment per response.
    """
    _check(packing)
    segments = []
    for g, (prompt, rs) in enumerate(zip(prompt_lens, responses, strict=True)):
        if packing == "tree" and any(isinstance(r, int) for r in rs):
            raise TypeError(f"segment_groups: group {g} gives lengths; the tree needs the ids")
        if packing == "sample":
            segments += [(g, [k]) for k in range(len(rs))]
            continue
        lengths = [r if isinstance(r, int) else len(r) for r in rs]

        def cost_of(ks: list[int], prompt=prompt, rs=rs, lengths=lengths) -> int:
            if packing == "tree":
                return segment_cost(prompt, [rs[k] for k in ks], "tree", min_saved)
            return prompt + sum(lengths[k] for k in ks)

        order = sorted(range(len(rs)), key=lambda k: rs[k]) if packing == "tree" else range(len(rs))
        current: list[int] = []
        for k in order:
            if current and cost_of([*current, k]) > budget:
                segments.append((g, sorted(current)))
                current = []
            current.append(k)
        if current:
            segments.append((g, sorted(current)))
    return segments


# =============================================================================================
# The packed row and its attention
# =============================================================================================


def pack(
    segments: list[tuple[dict, list[list[int]]]],
    rope_index: Callable,
    packing: str = "tree",
    min_saved: int = MIN_SAVED,
) -> Packed:
    """Pack one micro-batch's `(prompt, responses)` segments into one row, each segment's
    responses laid out by `packing` (`PACKINGS`; "tree": `token_tree(responses, min_saved)`).

    `prompt` is the processor's output for one rendered prompt (`input_ids` (1, P),
    `mm_token_type_ids` (1, P), and `pixel_values` / `image_grid_thw` when it has images);
    `responses` are token-id lists. `rope_index` is the model's `get_rope_index`.
    """
    _check(packing)
    if packing == "sample":
        segments = [(prompt, [r]) for prompt, responses in segments for r in responses]
    ids, types, positions, pixels, grids = [], [], [], [], []
    layout, predictors, labels, gather, lengths = [], [], [], [], []
    at = 0
    for prompt, responses in segments:
        p_ids, p_types = prompt["input_ids"], prompt["mm_token_type_ids"]
        grid = prompt.get("image_grid_thw")
        p_pos, _ = rope_index(p_ids, p_types, grid)  # (3, 1, P)
        ids.append(p_ids[0])
        types.append(p_types[0])
        positions.append(p_pos[:, 0])
        if grid is not None:
            pixels.append(prompt["pixel_values"])
            grids.append(grid)
        start, prompt_end = at, at + p_ids.shape[1]
        at = prompt_end
        first_position = int(p_pos.max()) + 1  # every path continues the prompt from here
        if packing == "tree":
            nodes, ends = token_tree(responses, min_saved)
        else:  # every response a child of the prompt
            nodes, ends = [], []
            for r in responses:
                ends.append(len(nodes) if len(r) else -1)
                nodes += [(-1, list(r))] if len(r) else []
        spans, depth, first_label = [], [], []
        for parent, node_ids in nodes:
            n = len(node_ids)
            # tokens of the path before this node, and the row position of its last one
            d = 0 if parent < 0 else depth[parent] + len(nodes[parent][1])
            before = prompt_end - 1 if parent < 0 else spans[parent][1] - 1
            ids.append(torch.tensor(node_ids, dtype=torch.long))
            types.append(torch.zeros(n, dtype=torch.long))
            positions.append((torch.arange(n) + first_position + d).expand(3, n))
            # token 0 is predicted by the last token before it on its path, token k by token k-1
            first_label.append(len(labels))
            predictors += [before, *range(at, at + n - 1)]
            labels += node_ids
            spans.append((at, at + n, parent))
            depth.append(d)
            at += n
        for k, r in enumerate(responses):
            path, v = [], ends[k]
            while v >= 0:
                path.append(v)
                v = nodes[v][0]
            for v in reversed(path):
                gather += range(first_label[v], first_label[v] + len(nodes[v][1]))
            lengths.append(len(r))
        layout.append((start, prompt_end, spans))
    inputs = {
        "input_ids": torch.cat(ids)[None],  # (1, L)
        "mm_token_type_ids": torch.cat(types)[None],  # (1, L)
        "position_ids": torch.cat(positions, dim=1)[:, None],  # (3, 1, L)
    }
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)  # (patches, C * T * p * p)
        inputs["image_grid_thw"] = torch.cat(grids)  # (images, 3)
    shared = gather != list(range(len(labels)))
    return Packed(
        inputs,
        layout,
        torch.tensor(predictors, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        lengths,
        torch.tensor(gather, dtype=torch.long) if shared else None,
    )


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
    itself causally; a node attends to its whole path (prompt and ancestors) and causally to
    itself.

    query (1, H, L, D), key / value (1, H_kv, L, D) -> (1, L, H, D). One SDPA call per prompt and
    per node, the node's causal mask aligned to the bottom right of its path's keys
    (`causal_lower_right`), which SDPA's flash and memory-efficient kernels take, so no L x L
    mask is ever built. (FlexAttention would run the row in one call with a block mask from the
    tree, but uncompiled it materializes the full score matrix: torch/nn/attention/
    flex_attention.py, `flex_attention`'s warning; compiled, every new row shape recompiles.)
    A node is `(start, end, parent)` (`Packed.layout`); `(start, end)` is a child of the
    prompt. Without a layout (a plain forward) this is ordinary causal SDPA.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: every query head reads its key/value head
        key = key.repeat_interleave(groups, dim=1)  # (1, H, L, D)
        value = value.repeat_interleave(groups, dim=1)  # (1, H, L, D)
    if packed_layout is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    # The row is the prompts and nodes back to back: one `split` into them (its backward is a
    # single concatenation; slicing each piece instead would give every piece a zero-filled
    # gradient of the whole row, quadratic in the number of nodes).
    sizes = [
        n
        for start, end, spans in packed_layout
        for n in (end - start, *(s[1] - s[0] for s in spans))
    ]
    qs, ks, vs = (x.split(sizes, dim=2) for x in (query, key, value))  # each (1, H, n, D)
    pieces, at = [], 0
    for _, _, spans in packed_layout:
        pieces.append(  # (1, H, P, D)
            F.scaled_dot_product_attention(qs[at], ks[at], vs[at], is_causal=True, scale=scaling)
        )
        # the keys and values of each parent's whole path, prompt first: a child appends its own
        paths = {-1: (ks[at], vs[at])}
        parents = {s[2] for s in spans if len(s) > 2}
        for i, span in enumerate(spans, start=at + 1):
            up_keys, up_values = paths[span[2] if len(span) > 2 else -1]  # (1, H, d, D)
            keys = torch.cat([up_keys, ks[i]], dim=2)  # (1, H, d + n, D)
            values = torch.cat([up_values, vs[i]], dim=2)  # (1, H, d + n, D)
            mask = causal_lower_right(qs[i].shape[2], keys.shape[2])  # the path, then causal
            pieces.append(  # (1, H, n, D)
                F.scaled_dot_product_attention(qs[i], keys, values, attn_mask=mask, scale=scaling)
            )
            if i - at - 1 in parents:
                paths[i - at - 1] = (keys, values)
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

    One forward over the micro-batch's packed row; only the positions that predict node tokens
    go through the LM head (`logits_to_keep` as an index tensor), so the prompt costs no logits
    at all and a shared token's log-prob is computed once; each response then reads its own
    tokens along its path (`Packed.gather`: the backward adds up a shared token's uses).
    """
    inputs = {k: v.to(device) for k, v in packed.inputs.items()}
    logits = model(
        **inputs, logits_to_keep=packed.predictors.to(device), packed_layout=packed.layout
    ).logits  # (1, T, V)
    logp = token_logprobs(logits[0], packed.labels.to(device), temperature)  # (T,)
    if packed.gather is not None:
        logp = logp[packed.gather.to(device)]  # (sum(lengths),)
    return list(logp.split(packed.lengths))

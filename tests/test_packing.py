"""The packed forward equals the plain per-sample forward under every packing (the token tree,
the shared prompt, a prompt per sample): log-probs and the gradients of every stage's loss,
with and without images, for several group sizes and for Octopus groups of splices; the tree
builder's invariants over random id lists."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface

import packing
from augment import Sample, loss_masks
from data import synthetic_task
from loss import policy_loss, policy_loss_with_kl
from octopus import SC
from packing import (
    PACKINGS,
    pack,
    response_logprobs,
    segment_cost,
    segment_groups,
    token_tree,
    tree_tokens,
)
from rollout import render_prompt

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import Qwen3VLForConditionalGeneration

    m = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32)
    packing.use_packed_attention(m)
    return m.train()


def encode(processor, example):
    p = render_prompt(processor, example["messages"])
    enc = processor(text=[p["prompt"]], images=p["images"] or None, return_tensors="pt")
    return {k: v for k, v in enc.items() if k != "attention_mask"}


def text_only(example):
    content = [c for c in example["messages"][0]["content"] if c["type"] == "text"]
    return {**example, "messages": [{"role": "user", "content": content}]}


def reference_logprobs(model, prompt, response):
    """One plain forward of prompt + response (no packing, the model's own causal attention)."""
    ids = torch.cat([prompt["input_ids"], torch.tensor([response])], dim=1)
    types = torch.cat(
        [prompt["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], 1
    )
    extra = {k: prompt[k] for k in ("pixel_values", "image_grid_thw") if k in prompt}
    logits = model(input_ids=ids, mm_token_type_ids=types, **extra).logits[0]  # (P + n, V)
    n_prompt = prompt["input_ids"].shape[1]
    logp = torch.log_softmax(logits[n_prompt - 1 : -1].double(), -1)  # (n, V)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0].float()  # (n,)


def groups_for(processor, with_images: bool, sizes: tuple[int, ...], seed: int = 0):
    """Prompts and random responses: `sizes[g]` responses for group g, of mixed lengths."""
    examples = synthetic_task(len(sizes), seed=seed)
    if not with_images:
        examples = [text_only(e) for e in examples]
    g = torch.Generator().manual_seed(seed)
    plain = min(processor.tokenizer.all_special_ids)
    out = []
    for e, size in zip(examples, sizes, strict=True):
        lengths = torch.randint(2, 14, (size,), generator=g).tolist()
        out.append(
            (
                encode(processor, e),
                [torch.randint(0, plain, (n,), generator=g).tolist() for n in lengths],
            )
        )
    return out


def grads_of(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 20
    scale = max(v.abs().max().item() for v in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert scale > 0 and worst < TOL * max(scale, 1.0), (worst, scale)


def fake_samples(responses, seed):
    """Samples with a correction at a random cut, a third of them w->c, for the Sec. 4.3 masks."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k, r in enumerate(responses):
        cut = int(torch.randint(1, len(r), (1,), generator=g)) if k % 3 else None
        samples.append(Sample(r, "wc" if k % 3 == 1 else "cc", cut, k % 3 != 1, True, (k, k),
                              max((cut or 1) - 1, 0)))  # fmt: skip
    return samples


@pytest.mark.parametrize("with_images", [True, False])
@pytest.mark.parametrize("sizes", [(1,), (3, 5), (16, 2, 4)])
def test_packed_logprobs_equal_per_sample(model, processor, with_images, sizes):
    groups = groups_for(processor, with_images, sizes)
    with torch.no_grad():
        ref = [reference_logprobs(model, p, r) for p, rs in groups for r in rs]
        # each group as one segment, and each response after its own copy of the prompt
        per_sample = [(p, [r]) for p, rs in groups for r in rs]
        runs = [(mode, groups) for mode in PACKINGS] + [("prompt", per_sample)]
        for mode, segments in runs:
            got = response_logprobs(model, pack(segments, model.model.get_rope_index, mode),
                                    torch.device("cpu"))  # fmt: skip
            assert [len(x) for x in got] == [len(x) for x in ref]
            worst = max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True))
            assert worst < TOL, (mode, worst)


@pytest.mark.parametrize("stage", ["1", "2"])
@pytest.mark.parametrize("with_images", [True, False])
def test_packed_gradients_equal_per_sample_for_each_stage(model, processor, stage, with_images):
    groups = groups_for(processor, with_images, (5, 3), seed=1)
    responses = [r for _, rs in groups for r in rs]
    samples = fake_samples(responses, seed=2)
    masks = [loss_masks(s, stage) for s in samples]
    width = max(map(len, responses))

    def padded(rows):
        return torch.stack([torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.float32), (0, width - len(r)))
                            for r in rows])  # fmt: skip

    policy_mask, kl_mask = padded([m[0] for m in masks]), padded([m[1] for m in masks])
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(len(responses), width, generator=g)
    ref = -torch.rand(len(responses), width, generator=g)
    adv = torch.randn(len(responses), generator=g)
    kw = dict(ratio="sequence_token", clip_low=0.2, clip_high=0.3, agg="seq")

    def loss_of(logps):
        logp = torch.nn.utils.rnn.pad_sequence(logps, batch_first=True)
        if stage == "1":
            return policy_loss_with_kl(
                logp, old, ref, adv, policy_mask, kl_mask, kl_coef=0.5, **kw
            )[0]
        return policy_loss(logp, old, adv, policy_mask, **kw)[0]

    expected = grads_of(
        model, lambda: loss_of([reference_logprobs(model, p, r) for p, rs in groups for r in rs])
    )
    packed = pack(groups, model.model.get_rope_index)
    got = grads_of(model, lambda: loss_of(response_logprobs(model, packed, torch.device("cpu"))))
    assert_same_grads(expected, got)
    if with_images:  # the vision tower learns through the shared prompt
        assert any("visual" in k and v.abs().max() > 0 for k, v in got.items())


@pytest.mark.parametrize("part", ["prompt", "shared nodes"])
def test_dropping_the_gradient_through_shared_keys_is_caught(model, processor, part):
    """If responses saw the keys and values of their prompt (or of the tree nodes they share
    with other samples: o1 + SC) without passing gradient back into them, the comparisons
    above would fail: shown here by detaching them."""
    ((prompt, _),) = groups_for(processor, True, (1,), seed=4)
    responses, _ = octopus_group(processor, seed=3)
    groups = [(prompt, responses)]
    weights = torch.linspace(-1, 1, sum(map(len, responses)))

    def loss():
        packed = pack(groups, model.model.get_rope_index, min_saved=0)
        return (torch.cat(response_logprobs(model, packed, torch.device("cpu"))) * weights).sum()

    right = grads_of(model, loss)

    def spans_of(packed_layout):
        if part == "prompt":
            return [(start, end) for start, end, _ in packed_layout]
        parents = [{up for _, _, up in nodes} for _, _, nodes in packed_layout]
        return [(a, b) for (_, _, nodes), ups in zip(packed_layout, parents, strict=True)
                for v, (a, b, _) in enumerate(nodes) if v in ups]  # fmt: skip

    def detached(module, query, key, value, mask, packed_layout=None, **kw):
        def cut(x):  # those spans of the row without their gradient
            pieces, at = [], 0
            for start, end in spans_of(packed_layout):
                pieces += [x[:, :, at:start], x[:, :, start:end].detach()]
                at = end
            return torch.cat([*pieces, x[:, :, at:]], dim=2)

        return packing.packed_attention(module, query, cut(key), cut(value), mask,
                                        packed_layout=packed_layout, **kw)  # fmt: skip

    AttentionInterface.register(packing.ATTENTION, detached)
    try:
        wrong = grads_of(model, loss)
    finally:
        AttentionInterface.register(packing.ATTENTION, packing.packed_attention)
    worst = max(
        (right[k] - wrong.get(k, torch.zeros_like(right[k]))).abs().max().item() for k in right
    )
    assert worst > 1e-3
    vision = [k for k in right if "visual" in k]
    assert vision and all(right[k].abs().max() > 0 for k in vision)


def test_segment_groups_splits_over_budget_and_never_drops():
    # group 0: prompt 10 + responses 5, 5, 30; group 1: prompt 50 + one response of 80 (> budget)
    chunks = segment_groups([10, 50], [[5, 5, 30], [80]], budget=40, packing="prompt")
    assert chunks == [(0, [0, 1]), (0, [2]), (1, [0])]
    assert segment_groups([10], [[5, 5]], budget=40, packing="sample") == [(0, [0]), (0, [1])]
    assert segment_groups([10], [[5, 5, 30]], budget=1000, packing="prompt") == [(0, [0, 1, 2])]
    # the former switch still reads as before
    assert segment_groups([10], [[5, 5]], budget=40, packing="sample") == [(0, [0]), (0, [1])]
    assert segment_groups([10], [[5, 5, 30]], 40, packing="prompt") == [(0, [0, 1]), (0, [2])]
    with pytest.raises(TypeError, match="group 0"):
        segment_groups([10], [[5, 5]], budget=40)  # the tree needs the ids
    with pytest.raises(ValueError, match="packing"):
        segment_groups([10], [[[1]]], budget=40, packing="shared")


def test_segment_groups_tree_cuts_runs_of_neighbouring_paths():
    # sorted: [1,2] [1,2,3,4] [1,2,3,4] [1,2,3,5,6] [1,9] [7]; each adds its length less what
    # it shares with the one before: 2, 2, 0, 2 -> 10 + 6 = 16; then [1,9] would add 1 > 16
    rs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2], [7], [1, 2, 3, 4], [1, 9]]
    assert segment_groups([10], [rs], budget=16, min_saved=0) == [(0, [0, 1, 2, 4]), (0, [3, 5])]
    # the second share repeats its ancestor [1] (a path stays whole): 10 + [1, 9] + [7]
    assert segment_cost(10, [rs[3], rs[5]], min_saved=0) == 13
    assert segment_groups([10], [rs], budget=100, min_saved=0) == [(0, [0, 1, 2, 3, 4, 5])]
    assert segment_cost(10, rs, min_saved=0) == 10 + tree_tokens(rs) == 10 + 8  # 1 2 3 4 5 6 9 7
    # nodes saving under 2 tokens copied into their children: [1] and [3] (the end [1, 2] is
    # kept): [1, 2] [3, 4] [3, 5, 6] [1, 9] [7]
    assert segment_cost(10, rs, min_saved=2) == 10 + 10
    assert segment_cost(10, rs, "prompt") == 10 + 18
    assert segment_cost(10, rs, "sample") == 6 * 10 + 18
    # a response longer than the budget alone: its own segment
    assert segment_groups([10], [[[1] * 50, [2]]], budget=20, min_saved=0) == [(0, [0]), (0, [1])]


def test_pack_tree_layout_positions_predictors_and_gather(processor, model):
    ((prompt, _),) = groups_for(processor, True, (1,))
    # sorted: [5], [7,8,4,4], [7,8,9] -> nodes [5] | [7,8] < [4,4], [9]
    packed = pack(
        [(prompt, [[7, 8, 9], [7, 8, 4, 4], [5]])], model.model.get_rope_index, min_saved=0
    )
    P = prompt["input_ids"].shape[1]
    assert packed.layout == [
        (0, P, [(P, P + 1, -1), (P + 1, P + 3, -1), (P + 3, P + 5, 1), (P + 5, P + 6, 1)])
    ]
    assert packed.inputs["input_ids"][0, P:].tolist() == [5, 7, 8, 4, 4, 9]
    assert packed.labels.tolist() == [5, 7, 8, 4, 4, 9]
    # a node's first token is predicted by the last token of its parent's path
    assert packed.predictors.tolist() == [P - 1, P - 1, P + 1, P + 2, P + 3, P + 2]
    assert packed.gather.tolist() == [1, 2, 5, 1, 2, 3, 4, 0] and packed.lengths == [3, 4, 1]
    f = int(packed.inputs["position_ids"][:, 0, :P].max()) + 1
    assert (
        packed.inputs["position_ids"][:, 0, P:].tolist() == [[f, f, f + 1, f + 2, f + 3, f + 2]] * 3
    )
    # nothing shared beyond the prompt: no gather, the same row as the shared prompt's
    flat = pack([(prompt, [[7, 8], [5]])], model.model.get_rope_index, "prompt")
    assert flat.gather is None and flat.inputs["input_ids"][0, P:].tolist() == [7, 8, 5]


def _attention_backward_elements(responses: int, n: int = 6, prompt: int = 10) -> int:
    from test_loss import _CountAllocations

    spans, at = [], prompt
    for _ in range(responses):
        spans.append((at, at + n))
        at += n
    q, k, v = (torch.randn(1, 2, at, 8, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    out, _ = packing.packed_attention(module, q, k, v, None, packed_layout=[(0, prompt, spans)])
    loss = out.sum()
    with _CountAllocations() as counter:
        loss.backward()
    return counter.elements


def test_packed_attention_backward_is_linear_in_responses():
    """Slicing each response out of the row gives every slice's backward a zero-filled gradient
    of the whole row: quadratic in the responses of a row. One split keeps it linear."""
    small, large = _attention_backward_elements(16), _attention_backward_elements(32)
    assert large <= 2.3 * small, (small, large)


# -- the token tree over Octopus groups ------------------------------------------------------


def octopus_group(processor, seed: int):
    """One group as Algorithm 1 forms it, as `(responses, samples)`: rollouts
    `o1_i + SC + o2_i + EOS` (rollout 2 without a correction: `o1 + EOS`; rollout 4 a duplicate
    of rollout 0, as sampling can give), each o1 with its own first token (the originals share
    only the prompt), then splices `o1_i + SC + o2_j + EOS`, which share `o1_i + SC` with
    original i; the splice (3, 1) re-encoded so that its last SC token differs from its
    source's (a merge across the boundary), so the tree branches inside SC there."""
    g = torch.Generator().manual_seed(seed)
    tok = processor.tokenizer
    plain, eos = min(tok.all_special_ids), tok.eos_token_id
    sc = tok.encode(SC, add_special_tokens=False)

    def rand(lo, hi):
        return torch.randint(0, plain, (int(torch.randint(lo, hi, (1,), generator=g)),),
                             generator=g).tolist()  # fmt: skip

    o1 = [[600 + i, *rand(2, 9)] for i in range(4)]
    o2 = [rand(2, 8) for _ in range(4)]
    o1.append(o1[0])
    o2.append(o2[0])
    correct = [(False, True), (True, True), (True, False), (False, False), (False, True)]
    samples = []
    for i in range(5):
        if i == 2:
            samples.append(Sample(o1[i] + [eos], "original", None, True, False, (i, i), len(o1[i])))
        else:
            samples.append(Sample(o1[i] + sc + o2[i] + [eos], "original", len(o1[i]) + len(sc),
                                  *correct[i], (i, i), len(o1[i])))  # fmt: skip
    for i, j in ((0, 1), (0, 3), (1, 0), (1, 3), (4, 1), (0, 1)):
        kind = ("c" if correct[i][0] else "w") + ("c" if correct[j][1] else "w")
        samples.append(Sample(o1[i] + sc + o2[j] + [eos], kind, len(o1[i]) + len(sc),
                              correct[i][0], correct[j][1], (i, j), len(o1[i])))  # fmt: skip
    merged = [t for t in range(plain) if t != sc[-1]][seed]  # the re-encoded boundary token
    samples.append(Sample(o1[3] + sc[:-1] + [merged] + o2[1][1:] + [eos], "wc",
                          len(o1[3]) + len(sc), False, True, (3, 1), len(o1[3])))  # fmt: skip
    return [s.ids for s in samples], samples


def test_octopus_group_tree_shares_what_the_ids_share(processor):
    responses, samples = octopus_group(processor, seed=0)
    nodes, ends = token_tree(responses)
    # the re-encoded splice (3, 1) branches from original 3 at its last SC token, not after SC
    branch = nodes[ends[-1]][0]
    assert branch == nodes[ends[3]][0]
    depth = 0
    while branch >= 0:
        depth += len(nodes[branch][1])
        branch = nodes[branch][0]
    assert depth == samples[3].o1_sc_len - 1
    # duplicates end at one node; the originals share nothing beyond the prompt
    assert ends[0] == ends[4] and ends[5] == ends[9] == ends[10]
    roots = [v for v, (up, _) in enumerate(nodes) if up < 0]
    assert len(roots) == 4  # the four distinct o1 first tokens
    saved = 1 - tree_tokens(responses) / sum(map(len, responses))
    assert saved > 0.3, saved


def _loss_inputs(samples, stage, seed):
    masks = [loss_masks(s, stage) for s in samples]
    width = max(len(s.ids) for s in samples)

    def padded(rows):
        return torch.stack([torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.float32), (0, width - len(r)))
                            for r in rows])  # fmt: skip

    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(len(samples), width, generator=g)
    ref = -torch.rand(len(samples), width, generator=g)
    adv = torch.randn(len(samples), generator=g)
    return padded([m[0] for m in masks]), padded([m[1] for m in masks]), old, ref, adv


@pytest.mark.parametrize(("budget", "min_saved"), [(None, 0), (260, 0), (None, 25)])
@pytest.mark.parametrize("stage", ["1", "2"])
def test_tree_gradients_equal_per_sample_on_octopus_groups(
    model, processor, stage, budget, min_saved
):
    """Stage I (Eq. 5: GSPO-token ratio over o2, k3 KL on o1) and Stage II (Eq. 2: the sequence
    ratio under the Sec. 4.3 masks) over two Octopus groups, the tree against plain per-sample
    forwards; with a budget that splits each group into shares (each repeating its ancestors),
    and with short shared nodes copied into their children."""
    prompts = [p for p, _ in groups_for(processor, True, (1, 1), seed=5)]
    built = [octopus_group(processor, seed=s) for s in (0, 1)]
    groups = [(p, rs) for p, (rs, _) in zip(prompts, built, strict=True)]
    samples = [s for _, ss in built for s in ss]
    policy_mask, kl_mask, old, ref, adv = _loss_inputs(samples, stage, seed=6)
    if stage == "1":
        assert kl_mask.sum() > 0 and (policy_mask == 0).any()

    def loss_of(logps):
        logp = torch.nn.utils.rnn.pad_sequence(logps, batch_first=True)
        if stage == "1":
            return policy_loss_with_kl(logp, old, ref, adv, policy_mask, kl_mask, kl_coef=0.5,
                                       ratio="sequence_token", clip_low=0.2, clip_high=0.3,
                                       agg="seq")[0]  # fmt: skip
        return policy_loss(logp, old, adv, policy_mask, ratio="sequence", clip_low=0.2,
                           clip_high=0.3, agg="token")[0]  # fmt: skip

    def tree_logprobs():
        prompt_lens = [p["input_ids"].shape[1] for p, _ in groups]
        cut = segment_groups(prompt_lens, [rs for _, rs in groups], budget or 10**9,
                             min_saved=min_saved)  # fmt: skip
        if budget:  # shares of a group: at least one split, every share in its own forward
            assert len(cut) > len(groups)
            rows = [[(groups[g][0], [groups[g][1][k] for k in ks])] for g, ks in cut]
        else:
            assert len(cut) == len(groups)
            rows = [groups]
        logps = [lp for row in rows for lp in
                 response_logprobs(model, pack(row, model.model.get_rope_index, "tree", min_saved),
                                   torch.device("cpu"))]  # fmt: skip
        order = [(g, k) for g, ks in cut for k in ks]
        at = {gk: i for i, gk in enumerate(order)}
        return [logps[at[g, k]] for g in range(len(groups)) for k in range(len(groups[g][1]))]

    if min_saved:  # some shared nodes copied into their children, some kept
        for _, rs in groups:
            kept = sum(len(ids) for _, ids in token_tree(rs, min_saved)[0])
            assert tree_tokens(rs) < kept < sum(map(len, rs)), (tree_tokens(rs), kept)
    with torch.no_grad():
        want = [reference_logprobs(model, p, r) for p, rs in groups for r in rs]
        got = tree_logprobs()
    assert [len(x) for x in got] == [len(x) for x in want]
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < TOL
    expected = grads_of(
        model, lambda: loss_of([reference_logprobs(model, p, r) for p, rs in groups for r in rs])
    )
    assert_same_grads(expected, grads_of(model, lambda: loss_of(tree_logprobs())))


def test_packings_differ_in_row_length_not_in_log_probs(model, processor):
    """The flag changes the row: the tree runs fewer tokens than the shared prompt, which runs
    fewer than a prompt per sample; the row is what `segment_cost` says."""
    ((prompt, _),) = groups_for(processor, False, (1,), seed=7)
    responses, _ = octopus_group(processor, seed=2)
    P = prompt["input_ids"].shape[1]
    rows = {}
    for mode in PACKINGS:
        packed = pack([(prompt, responses)], model.model.get_rope_index, mode, min_saved=0)
        rows[mode] = packed.inputs["input_ids"].shape[1]
        assert rows[mode] == segment_cost(P, responses, mode, min_saved=0)
    assert rows["tree"] < rows["prompt"] < rows["sample"], rows


ids_lists = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=8), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(ids_lists, st.sampled_from([0, 0, 1, 2, 3, 5, 8]))
def test_token_tree_paths_rebuild_every_response_and_the_tree_is_minimal(responses, min_saved):
    nodes, ends = token_tree(responses, min_saved)
    for k, r in enumerate(responses):
        path, v = [], ends[k]
        while v >= 0:
            assert nodes[v][0] < v  # pre-order: a parent before its children
            path.append(v)
            v = nodes[v][0]
        assert [t for v in reversed(path) for t in nodes[v][1]] == r
    assert all(ids for _, ids in nodes)  # no empty node
    children: dict[int, list[int]] = {}
    for v, (up, _) in enumerate(nodes):
        children.setdefault(up, []).append(v)
    for v, kids in children.items():  # a kept shared node saves what it must
        assert v < 0 or v in ends or len(nodes[v][1]) * (len(kids) - 1) >= min_saved
    tokens = sum(len(ids) for _, ids in nodes)
    assert tokens >= tree_tokens(responses)
    if min_saved:
        return
    for kids in children.values():  # no two children of a node start alike
        firsts = [nodes[v][1][0] for v in kids]
        assert len(set(firsts)) == len(firsts)
    for v in range(len(nodes)):  # a node with one child ends a response (else it would merge)
        assert len(children.get(v, [])) != 1 or v in ends
    # the tree holds each distinct non-empty prefix once: no tree over these paths is smaller
    prefixes = {tuple(r[:n]) for r in responses for n in range(1, len(r) + 1)}
    assert tokens == tree_tokens(responses) == len(prefixes)

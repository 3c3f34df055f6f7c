"""The packed, shared-prompt forward equals the plain per-sample forward: log-probs and the
gradients of every stage's loss, with and without images, for several group sizes."""

import pytest
import torch
from transformers import AttentionInterface

import packing
from augment import Sample, loss_masks
from data import synthetic_task
from loss import policy_loss, policy_loss_with_kl
from packing import pack, response_logprobs, segment_groups
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
        for shared, segments in ((True, groups), (False, per_sample)):
            got = response_logprobs(model, pack(segments, model.model.get_rope_index),
                                    torch.device("cpu"))  # fmt: skip
            assert [len(x) for x in got] == [len(x) for x in ref]
            worst = max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True))
            assert worst < TOL, (shared, worst)


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


def test_dropping_the_prompt_gradient_is_caught(model, processor):
    """If responses saw the prompt's keys and values without passing gradient back into them,
    the comparison above would fail: shown here by detaching them."""
    groups = groups_for(processor, True, (4,), seed=4)
    weights = torch.linspace(-1, 1, sum(len(r) for r in groups[0][1]))

    def loss():
        return (
            torch.cat(
                response_logprobs(
                    model, pack(groups, model.model.get_rope_index), torch.device("cpu")
                )
            )
            * weights
        ).sum()

    right = grads_of(model, loss)

    def prompt_detached(module, query, key, value, mask, packed_layout=None, **kw):
        def cut(x):  # the prompt spans of the row without their gradient
            pieces, at = [], 0
            for start, end, _ in packed_layout:
                pieces += [x[:, :, at:start], x[:, :, start:end].detach()]
                at = end
            return torch.cat([*pieces, x[:, :, at:]], dim=2)

        return packing.packed_attention(module, query, cut(key), cut(value), mask,
                                        packed_layout=packed_layout, **kw)  # fmt: skip

    AttentionInterface.register(packing.ATTENTION, prompt_detached)
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


def test_chunk_groups_splits_over_budget_and_never_drops():
    # group 0: prompt 10 + responses 5, 5, 30; group 1: prompt 50 + one response of 80 (> budget)
    chunks = segment_groups([10, 50], [[5, 5, 30], [80]], budget=40)
    assert chunks == [(0, [0, 1]), (0, [2]), (1, [0])]
    assert segment_groups([10], [[5, 5]], budget=40, shared=False) == [(0, [0]), (0, [1])]
    assert segment_groups([10], [[5, 5, 30]], budget=1000) == [(0, [0, 1, 2])]


def test_pack_layout_positions_and_predictors(processor, model):
    ((prompt, _),) = groups_for(processor, True, (1,))
    packed = pack([(prompt, [[7, 8, 9], [5]])], model.model.get_rope_index)
    P = prompt["input_ids"].shape[1]
    assert packed.layout == [(0, P, [(P, P + 3), (P + 3, P + 4)])]
    ids = packed.inputs["input_ids"][0]
    assert ids[P:].tolist() == [7, 8, 9, 5] and packed.labels.tolist() == [7, 8, 9, 5]
    # token 0 of each response is predicted from the prompt's last position
    assert packed.predictors.tolist() == [P - 1, P, P + 1, P - 1]
    pos = packed.inputs["position_ids"][:, 0]  # (3, L)
    first = int(pos[:, :P].max()) + 1
    assert pos[:, P:].tolist() == [[first, first + 1, first + 2, first]] * 3  # both start alike
    assert packed.inputs["pixel_values"].shape[0] == prompt["pixel_values"].shape[0]  # image once


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

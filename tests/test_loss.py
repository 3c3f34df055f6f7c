"""loss.py against an independent float64 brute force, hand-worked clips, masks, split invariance."""

import math

import pytest
import torch

from loss import (
    count_for,
    group_advantages,
    kl_k3,
    kl_loss,
    policy_loss,
    policy_loss_with_kl,
    sft_loss,
    token_logprobs,
)

RATIOS = ["token", "sequence", "sequence_token"]
AGGS = ["seq", "token"]


def brute_force(logp, old, adv, mask, *, ratio, clip_low, clip_high, clip_dual, agg):
    """Per-element loops over Python-level float64 scalars; autograd through the scalars."""
    B, T = len(mask), len(mask[0])
    seq_terms, tok_terms = [], []
    for b in range(B):
        trained = [t for t in range(T) if mask[b][t]]
        if not trained:
            continue
        seq_log = sum(logp[b][t] - old[b][t] for t in trained) / len(trained)
        terms = []
        for t in trained:
            if ratio == "token":
                log_r = logp[b][t] - old[b][t]
            elif ratio == "sequence":
                log_r = seq_log
            else:
                log_r = seq_log.detach() + logp[b][t] - logp[b][t].detach()
            r = torch.exp(log_r)
            a = adv[b]
            term = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if a < 0:
                term = torch.clamp(term, max=-a * clip_dual)
            terms.append(term)
        seq_terms.append(sum(terms) / len(terms))
        tok_terms += terms
    return sum(seq_terms) / len(seq_terms) if agg == "seq" else sum(tok_terms) / len(tok_terms)


def random_batch(seed, B=5, T=9, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.7).double()
    mask[0] = 0  # a sequence with nothing trained
    mask[1, :3] = 0  # a Stage-I-like prefix
    mask[1, 3:] = 1
    return logp, old, adv, mask


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clips", [(0.2, 0.28), (3e-4, 4e-4)])
def test_matches_brute_force_values_and_gradients(ratio, agg, seed, clips):
    logp, old, adv, mask = random_batch(seed)
    kw = dict(ratio=ratio, clip_low=clips[0], clip_high=clips[1], clip_dual=3.0, agg=agg)
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, **kw)
    loss.backward()
    scalars = [
        [logp[b, t].clone().requires_grad_(True) for t in range(logp.shape[1])]
        for b in range(logp.shape[0])
    ]
    ref = brute_force(scalars, old.tolist(), adv.tolist(), mask.tolist(), **kw)
    ref.backward()
    ref_grad = torch.tensor([[0.0 if s.grad is None else s.grad.item() for s in row] for row in scalars],
                            dtype=torch.float64)  # fmt: skip
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(x.grad, ref_grad, atol=1e-12)
    assert (x.grad[mask == 0] == 0).all()  # exactly zero on masked tokens


@pytest.mark.parametrize("ratio", RATIOS)
def test_stage1_mask_o1_logprobs_do_not_touch_the_policy_term(ratio):
    logp, old, adv, mask = random_batch(7, spread=0.01)
    kw = dict(ratio=ratio, clip_low=3e-4, clip_high=4e-4, agg="seq")
    base, _ = policy_loss(logp, old, adv, mask, **kw)
    wild = torch.where(mask == 0, logp - 50.0 * torch.rand_like(logp), logp)  # o1 / padding changed
    wild[2, mask[2] == 0] = float("-inf")
    changed, _ = policy_loss(wild, old, adv, mask, **kw)
    assert changed.item() == base.item()


# --------------------------------------------------------------------------- hand-worked


def one_token(logp_minus_old, a, *, clip_low=0.2, clip_high=0.28, ratio="token"):
    logp = torch.tensor([[math.log(0.5) + logp_minus_old]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    loss, m = policy_loss(logp, old, torch.tensor([a], dtype=torch.float64), torch.ones(1, 1),
                          ratio=ratio, clip_low=clip_low, clip_high=clip_high, agg="seq")  # fmt: skip
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_hand_worked_inside_clip_range():
    loss, grad, m = one_token(math.log(1.1), 2.0)  # r = 1.1 in [0.8, 1.28]
    assert loss == pytest.approx(-2.0 * 1.1) and grad == pytest.approx(-2.0 * 1.1)
    assert m["clip_high"] == 0 and m["clip_low"] == 0 and m["ratio"] == pytest.approx(1.1)


def test_hand_worked_above_clip_positive_advantage():
    loss, grad, m = one_token(math.log(1.5), 1.0)  # r = 1.5 > 1.28: clipped, no gradient
    assert loss == pytest.approx(-1.28) and grad == 0.0 and m["clip_high"] == 1.0


def test_hand_worked_below_clip_negative_advantage():
    loss, grad, m = one_token(math.log(0.5), -1.0)  # r = 0.5 < 0.8, A < 0: clipped at 0.8
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clip_low"] == 1.0
    loss, grad, _ = one_token(math.log(0.5), 1.0)  # same r, A > 0: the unclipped side is max
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)


def test_hand_worked_dual_clip():
    loss, grad, m = one_token(math.log(5.0), -1.0)  # r = 5 > 3: bounded by -A * 3
    assert loss == pytest.approx(3.0) and grad == 0.0 and m["clip_dual"] == 1.0
    loss, grad, m = one_token(math.log(2.0), -1.0)  # r = 2 < 3: -A r = 2 (above the 1.28 clip)
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0) and m["clip_dual"] == 0.0


def test_hand_worked_sequence_ratio_is_geometric_mean_over_trained_tokens():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64))
    logp = old + torch.log(torch.tensor([[100.0, 1.1, 1.21]], dtype=torch.float64))
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # token 0 is o1 + SC: not in the ratio (Eq. 5)
    loss, m = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, ratio="sequence",
                          clip_low=0.2, clip_high=0.28, agg="seq")  # fmt: skip
    s = math.sqrt(1.1 * 1.21)  # = 1.1**1.5 ~ 1.1537
    assert loss.item() == pytest.approx(-s) and m["ratio"] == pytest.approx(s)


# --------------------------------------------------------------------------- advantages, KL, SFT


def test_group_advantages():
    std0 = torch.tensor([1.0, 0.0]).std().item()  # unbiased: 0.7071
    adv = group_advantages(torch.tensor([1.0, 0.0]))
    assert adv.tolist() == pytest.approx([0.5 / (std0 + 1e-6), -0.5 / (std0 + 1e-6)])
    # mean 1, unbiased std 1: A = (r - 1) / (1 + 1e-6)
    expected = [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)]
    assert group_advantages(torch.tensor([0.0, 1.0, 2.0])).tolist() == pytest.approx(expected)
    assert group_advantages(torch.tensor([0.5, 0.5])).tolist() == [0.0, 0.0]  # equal rewards
    assert group_advantages(torch.tensor([7.0])).tolist() == [0.0]  # a group of one


def test_kl_k3_values_and_clamp():
    logp = torch.tensor([0.0, -1.0, 0.0, 0.0])
    ref = torch.tensor([0.0, 0.0, -1.0, 20.0])
    expected = [0.0, math.e - 1 - 1, math.exp(-1) + 1 - 1, 10.0]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_stage1_objective_is_policy_plus_kl_on_o1():
    logp, old, adv, mask = random_batch(3)
    ref = old + 0.1
    kl_mask = 1 - mask
    kw = dict(ratio="sequence_token", clip_low=3e-4, clip_high=4e-4, agg="seq")
    total, m = policy_loss_with_kl(logp, old, ref, adv, mask, kl_mask, kl_coef=0.01, **kw)
    pol, _ = policy_loss(logp, old, adv, mask, **kw)
    kl = kl_loss(logp, ref, kl_mask, agg="seq")
    assert total.item() == pytest.approx(pol.item() + 0.01 * kl.item())
    assert m["kl_o1"] == pytest.approx(kl.item())


def test_token_logprobs_and_sft_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 4), generator=g)
    lp = token_logprobs(logits, labels)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(lp.double(), ref, atol=1e-6)
    lp_t = token_logprobs(logits, labels, temperature=0.5)
    ref_t = torch.log_softmax(logits.double() / 0.5, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(lp_t.double(), ref_t, atol=1e-5)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    loss = sft_loss(token_logprobs(logits, labels), mask)
    assert loss.item() == pytest.approx(-(ref * mask).sum().item() / 5, rel=1e-6)
    loss.backward()
    assert (logits.grad[mask == 0] == 0).all()


def test_token_logprobs_chunks_equal_one_pass_with_gradients():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 13, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    whole = token_logprobs(logits, labels, 0.7, chunk=10**6)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), logits)
    for chunk in (1, 4, 7):
        parts = token_logprobs(logits, labels, 0.7, chunk=chunk)
        (grad,) = torch.autograd.grad((parts * weights).sum(), logits)
        assert torch.allclose(parts, whole, atol=1e-6) and torch.allclose(
            grad, grad_whole, atol=1e-6
        )


class _CountAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the elements of every tensor an op creates (what a backward allocates)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def _backward_elements(rows: int, T: int = 6, V: int = 50, chunk: int = 4) -> int:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (rows, T), generator=g)
    loss = token_logprobs(logits, labels, chunk=chunk).sum()
    with _CountAllocations() as counter:
        loss.backward()
    return counter.elements


def test_token_logprobs_backward_is_linear_in_rows():
    """Indexing the logits row by row makes each row's backward allocate a gradient of the full
    (B, T, V) size: quadratic in B. The chunks must cost their own size, so doubling the rows at
    most doubles what the backward allocates (a quadratic one would quadruple it)."""
    small, large = _backward_elements(8), _backward_elements(16)
    assert large <= 2.2 * small, (small, large)


# --------------------------------------------------------------------------- split invariance


def _kl_part(old, mask):
    """A reference and a KL mask that differ from the policy's: the first two tokens where the
    policy mask is 0 (o1's end in Stage I), so the two normalizers differ."""
    kl_mask = torch.zeros_like(mask)
    kl_mask[:, :2] = 1 - mask[:, :2]
    return old - 0.05, kl_mask


def _grad_by_splits(splits, ratio, agg, seed=11, stage1=False):
    logp, old, adv, mask = random_batch(seed, B=14, T=7)
    ref, kl_mask = _kl_part(old, mask)
    x = logp.clone().requires_grad_(True)
    kw = dict(ratio=ratio, clip_low=0.2, clip_high=0.28, agg=agg)
    pol_norm, kl_norm = count_for(mask, agg), count_for(kl_mask, agg)  # of the whole mini-batch
    bounds = torch.linspace(0, 14, splits + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sl = slice(lo, hi)
        if stage1:
            loss, _ = policy_loss_with_kl(x[sl], old[sl], ref[sl], adv[sl], mask[sl],
                                          kl_mask[sl], policy_normalizer=pol_norm,
                                          kl_normalizer=kl_norm, **kw)  # fmt: skip
        else:
            loss, _ = policy_loss(x[sl], old[sl], adv[sl], mask[sl], normalizer=pol_norm, **kw)
        loss.backward()
    return x.grad


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("stage1", [False, True])
def test_accumulated_gradient_does_not_depend_on_the_split(ratio, agg, stage1):
    whole = _grad_by_splits(1, ratio, agg, stage1=stage1)
    for splits in (2, 3, 7):
        assert torch.allclose(_grad_by_splits(splits, ratio, agg, stage1=stage1), whole, atol=1e-6)
    # and the one-piece accumulation is the plain mean loss's gradient (Stage I: each term over
    # its own mask's count of the batch)
    logp, old, adv, mask = random_batch(11, B=14, T=7)
    x = logp.clone().requires_grad_(True)
    kw = dict(ratio=ratio, clip_low=0.2, clip_high=0.28, agg=agg)
    if stage1:
        ref, kl_mask = _kl_part(old, mask)
        assert count_for(kl_mask, agg) != count_for(mask, agg)
        policy_loss_with_kl(x, old, ref, adv, mask, kl_mask, **kw)[0].backward()
    else:
        policy_loss(x, old, adv, mask, **kw)[0].backward()
    assert torch.allclose(x.grad, whole, atol=1e-12)


def test_bad_arguments():
    logp, old, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="ratio"):
        policy_loss(logp, old, adv, mask, ratio="seq", clip_low=0.2, clip_high=0.2, agg="seq")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, ratio="token", clip_low=0.2, clip_high=0.2, agg="mean")

"""The masked policy objective of Octopus (arXiv 2602.08503, Sec. 4.3, Eq. 1, 2, 5) as pure
tensor functions.

GRPO / DAPO (token ratio, Eq. 1), GSPO (sequence ratio, Eq. 2) and the released runs'
GSPO-token form in `policy_loss`, with per-token clipping and a dual clip for negative
advantages; Stage I's objective (Eq. 5: the policy loss over o2 only plus the k3 KL to the
reference on o1) in `policy_loss_with_kl`; SFT's NLL in `sft_loss`. No model, no process
group: torch.

Shapes: B sequences, T response positions (left-aligned, padded), V vocabulary.
`logp[b, t]` is the log-prob of response token t of sequence b; `mask[b, t]` is 1 where the
token is trained (padding and masked tokens 0; masked tokens stay in the context upstream).

Split invariance: every loss is a SUM of per-sequence (agg="seq") or per-token (agg="token")
terms divided by a `normalizer` (the count of sequences with trained tokens, or of trained
tokens). Pass the count of the whole mini-batch (one optimizer step), summed over its
micro-batches and ranks (`count_for`), and the gradients of the micro-batch losses add up to
the mini-batch's gradient whatever the split (packing.py defines the three batch words). (The
released code rescales each micro-batch by its own token count, which makes the KL weight
depend on how many o2 tokens share a micro-batch.)
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: keeps a stray ratio finite; clipping decides the rest
LOGPROB_CHUNK = 2048  # rows of logits turned into float32 at a time (token_logprobs)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean(r)) / (std(r) + eps) over the N samples of one prompt's group (arXiv
    2602.08503, the GRPO / GSPO group baseline); std unbiased (torch.std). rewards (N,) ->
    (N,). A group of one has no baseline and gets 0."""
    rewards = rewards.double()  # (N,)
    if len(rewards) < 2:
        return torch.zeros_like(rewards).float()
    return ((rewards - rewards.mean()) / (rewards.std() + eps)).float()


def count_for(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """The normalizer of `masked_mean` for this batch: sequences with at least one trained
    token (agg="seq") or trained tokens (agg="token"). Sum it over micro-batches and ranks."""
    if agg == "seq":
        return (mask.sum(-1) > 0).sum().double()
    if agg == "token":
        return mask.sum().double()
    raise ValueError(f"agg must be 'seq' or 'token', got {agg!r}")


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None
) -> torch.Tensor:
    """Aggregate (B, T) per-token values over mask = 1. "seq": mean over the tokens of each
    sequence, then over sequences; "token": mean over all tokens. With `normalizer`, the sum of
    the terms is divided by it instead of by this batch's own count (split invariance)."""
    mask = mask.to(values.dtype)
    zeroed = torch.where(mask > 0, values, torch.zeros_like(values))  # masked inf/nan never leak
    if agg == "seq":
        per_seq = zeroed.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        total = per_seq.sum()
    elif agg == "token":
        total = zeroed.sum()
    else:
        raise ValueError(f"agg must be 'seq' or 'token', got {agg!r}")
    denom = count_for(mask, agg) if normalizer is None else torch.as_tensor(normalizer)
    return total / denom.clamp(min=1).to(total.dtype)


def importance_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, ratio: str
) -> torch.Tensor:
    """log r per token (B, T). "token": log p - log p_old (Eq. 1). "sequence": the mean of that
    over the sequence's trained tokens, for every token (Eq. 2; over o2 only with the Stage I
    mask: Eq. 5). "sequence_token": value of "sequence", gradient of "token" per token
    (`sg[log s] + log p - sg[log p]`, the released runs)."""
    m = mask > 0
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))  # (B, T)
    if ratio == "token":
        out = log_ratio
    else:
        seq = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        if ratio == "sequence":
            out = seq.expand_as(logp)
        elif ratio == "sequence_token":
            out = seq.detach() + logp - logp.detach()
        else:
            raise ValueError(f"ratio must be token, sequence or sequence_token; got {ratio!r}")
    return out.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: str,
    clip_low: float,
    clip_high: float,
    clip_dual: float = 3.0,
    agg: str,
    normalizer=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (Eq. 1 / Eq. 2): per token `max(-A r, -A clip(r, 1 - eps_low, 1 +
    eps_high))`, and for A < 0 at most `-A * clip_dual`; aggregated by `agg`.

    logp, old_logp, mask: (B, T); advantages: (B,). Returns the loss and detached metrics:
    clip fractions (low: A < 0 and r < 1 - eps_low; high: A > 0 and r > 1 + eps_high), the
    dual-clip fraction, the approximate KL to the old policy (k3) and the mean ratio.
    """
    m = mask > 0
    log_r = importance_log_ratio(logp, old_logp, mask, ratio)  # (B, T)
    r = torch.exp(log_r)  # (B, T)
    adv = advantages.to(logp.dtype).unsqueeze(-1)  # (B, 1)
    unclipped = -adv * r  # (B, T)
    clipped = -adv * r.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss_tok = torch.maximum(unclipped, clipped)  # (B, T)
    dual = -adv * clip_dual  # (B, 1)
    loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, dual), loss_tok)  # (B, T)
    loss = masked_mean(loss_tok, mask, agg, normalizer)

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        neg, pos = (adv < 0).expand_as(m) & m, (adv > 0).expand_as(m) & m
        metrics = {
            "clip_low": ((r < 1.0 - clip_low) & neg).sum().item() / n.item(),
            "clip_high": ((r > 1.0 + clip_high) & pos).sum().item() / n.item(),
            "clip_dual": ((-adv * r > dual) & neg).sum().item() / n.item(),
            "approx_kl": (kl_k3(logp.detach(), old_logp) * m).sum().item() / n.item(),
            "ratio": (r * m).sum().item() / n.item(),
            "tokens": int(m.sum().item()),
        }
    return loss, metrics


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Low-variance KL estimator ("k3", Sec. 4.3): `exp(ref - logp) - (ref - logp) - 1`,
    clamped to [-10, 10]. Shapes as `logp`."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, kl_mask: torch.Tensor, *, agg: str, normalizer=None
) -> torch.Tensor:
    """The KL term of Eq. 5: k3 towards the reference, averaged over the KL mask (Stage I: the
    o1 tokens) with the same aggregation as the policy loss. Multiply by `Config.kl_coef`."""
    return masked_mean(kl_k3(logp, ref_logp), kl_mask, agg, normalizer)


def policy_loss_with_kl(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    policy_mask: torch.Tensor,
    kl_mask: torch.Tensor,
    *,
    ratio: str,
    clip_low: float,
    clip_high: float,
    clip_dual: float = 3.0,
    agg: str,
    kl_coef: float = 0.01,
    policy_normalizer=None,
    kl_normalizer=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss` on `policy_mask` plus `kl_coef` x the k3 KL to the reference on `kl_mask`.

    With Stage I's masks (`augment.loss_masks(sample, "1")`) this is Eq. 5, Stage I's objective
    (Sec. 4.3): the clipped surrogate over o2 alone (GSPO's sequence ratio taken over o2's
    tokens), plus 0.01 x KL on o1's tokens, which holds the first attempt near the reference
    while o2 learns to correct it. With a KL mask over the whole response it is a baseline's
    objective with a reference (`Config.kl_tokens="response"`, preset grpo-n16-released).
    Returns the loss and `policy_loss`'s metrics plus `kl_o1`, the KL's mean over `kl_mask`.
    """
    loss, metrics = policy_loss(
        logp, old_logp, advantages, policy_mask, ratio=ratio, clip_low=clip_low,
        clip_high=clip_high, clip_dual=clip_dual, agg=agg, normalizer=policy_normalizer,
    )  # fmt: skip
    kl = kl_loss(logp, ref_logp, kl_mask, agg=agg, normalizer=kl_normalizer)
    with torch.no_grad():  # logged as this batch's own mean, whatever the normalizer
        metrics["kl_o1"] = masked_mean(kl_k3(logp, ref_logp), kl_mask, agg).item()
    return loss + kl_coef * kl, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Cold-start SFT (Sec. 4.1): mean negative log-likelihood over the trained tokens (token
    aggregation). logp (B, T) from `token_logprobs`; mask (B, T)."""
    return masked_mean(-logp, mask, "token", normalizer)


# =============================================================================================
# Token log-probs from logits (what the losses above take as `logp`)
# =============================================================================================


def _logprobs_fp32(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = logits.float()  # (n, V)
    if temperature != 1.0:
        rows = rows / temperature
    return rows.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)  # (n,)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = LOGPROB_CHUNK
) -> torch.Tensor:
    """log p(label) per position: logits (..., T, V), labels (..., T) -> (..., T), float32.

    `logits[..., t, :]` must already be the prediction of `labels[..., t]` (shifted by the caller).
    Computed as gather - logsumexp in float32 over chunks of `chunk` positions, each under
    activation checkpointing: backward keeps only the logits themselves (bf16 on GPU) and
    recomputes one chunk's float32 softmax at a time, so no float32 copy of all the logits is
    ever held. The chunks are views (`split`), whose backward is a single concatenation: linear
    in the number of rows (indexing `logits[b]` row by row instead costs one full-size gradient
    per row, quadratic).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    pieces = []
    for rows, row_labels in zip(flat.split(chunk), flat_labels.split(chunk), strict=True):
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(  # (n,)
                checkpoint(_logprobs_fp32, rows, row_labels, temperature, use_reentrant=False)
            )
        else:
            pieces.append(_logprobs_fp32(rows, row_labels, temperature))  # (n,)
    return torch.cat(pieces).reshape(labels.shape)  # (..., T)

"""Octopus rollout augmentation (PAPER.md §3, Algorithm 1) and selective masks (§4).

n generated rollouts become up to N = 2n training samples: the n originals, plus spliced
samples `o1_i + SC + o2_j` (i != j) chosen so that the group holds about as many positives as
negatives, wrong->correct pairs first. `loss_masks` then says which tokens each sample trains
in Stage I (o2 only, KL on o1) and Stage II (everything, except o1 + SC of w->c / c->w samples).

Pure functions over token-id lists: no model, no engine, no process group.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from octopus import sc_span, split_response
from reward import Score, answer_span, format_reward, guarded_correction_reward, score


@dataclass
class Rollout:
    """One generated response, split and graded.

    `o1` / `o2`: token ids of each part cut right after its last `\\boxed{...}` (None when the
    part has no non-empty box, or, for `o2`, when there is no correction). `sc_at`: number of
    leading tokens of `ids` that are o1 + SC (a token straddling the boundary counts as o1 + SC);
    `o1_len`: number of leading tokens that are o1 alone (a straddling token is left out).
    """

    ids: list[int]
    o1: list[int] | None
    o2: list[int] | None
    o1_correct: bool
    o2_correct: bool
    final_correct: bool
    sc_at: int | None
    o1_len: int
    reward: float = 0.0  # the original's training reward (reward.score)
    o1_format: float = 0.0
    o2_format: float = 0.0


@dataclass
class Sample:
    """One training sample: an original rollout or a spliced `o1_i + SC + o2_j + EOS`."""

    ids: list[int]
    kind: str  # "original", "wc", "cc", "cw", "ww"
    sc_at: int | None
    o1_correct: bool
    o2_correct: bool
    source: tuple[int, int]  # (i, j): o1 from rollout i, o2 from rollout j
    o1_len: int = 0
    reward: float = 0.0


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE (GPT-2, Qwen) uses to spell raw bytes."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in keep]
    return {chr(b) for b in keep} | {chr(256 + i) for i in range(len(extra))}


_BYTE_LENGTHS: dict[int, list[int] | None] = {}


def _token_byte_lengths(tokenizer) -> list[int] | None:
    """UTF-8 length of every token id, or None for a tokenizer that is not byte-level BPE.
    Built once per tokenizer: one list lookup per token afterwards."""
    key = id(tokenizer)
    if key not in _BYTE_LENGTHS:
        alphabet, added = _byte_level_alphabet(), tokenizer.get_added_vocab()
        added_ids = {i: len(t.encode("utf-8")) for t, i in added.items()}
        lengths: list[int] | None = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in added_ids:
                lengths.append(added_ids[i])
            elif tok is not None and all(ch in alphabet for ch in tok):
                lengths.append(len(tok))  # one character per byte
            else:
                lengths = None
                break
        _BYTE_LENGTHS[key] = lengths
    return _BYTE_LENGTHS[key]


def _byte_ends(tokenizer, ids: list[int], text: str) -> list[int] | None:
    """Byte offset where each token ends in `text` (the decode of `ids`); None when that is
    not exact (not byte-level BPE, or invalid UTF-8 decoded as U+FFFD)."""
    table = _token_byte_lengths(tokenizer)
    if table is None or "\ufffd" in text or (ids and max(ids) >= len(table)):
        return None
    ends = list(itertools.accumulate(map(table.__getitem__, ids)))
    return ends if (ends[-1] if ends else 0) == len(text.encode("utf-8")) else None


def _prefix_chars(tokenizer, ids: list[int], k: int) -> int:
    return len(
        tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    )


def _first_token_reaching(
    tokenizer, ids: list[int], text: str, char: int, ends: list[int] | None
) -> int:
    """Smallest k such that the first k tokens decode to at least `char` characters."""
    if char <= 0:
        return 0
    if ends is not None:
        return bisect.bisect_left(ends, len(text[:char].encode("utf-8"))) + 1
    lo, hi = 0, len(ids)
    while lo < hi:  # fallback: O(log n) prefix decodes; no re-tokenization of the sampled text
        mid = (lo + hi) // 2
        if _prefix_chars(tokenizer, ids, mid) >= char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _last_token_within(
    tokenizer, ids: list[int], text: str, char: int, ends: list[int] | None
) -> int:
    """Largest k such that the first k tokens decode to at most `char` characters."""
    if ends is not None:
        return bisect.bisect_right(ends, len(text[:char].encode("utf-8")))
    k = _first_token_reaching(tokenizer, ids, text, char, None)
    return k if k == 0 or _prefix_chars(tokenizer, ids, k) <= char else k - 1


def _cut_after_answer(part: str) -> str | None:
    span = answer_span(part)
    if span is None or not part[span[0] : span[1]].strip():
        return None
    return part[: span[1] + 1]


def make_rollout(
    ids: list[int], tokenizer, ground_truth: str, *, graded: Score | None = None
) -> Rollout:
    """Split and grade one sampled response (Algorithm 1, step 1).

    `sc_at` comes from character offsets of the sampled tokens (prefix decodes), so the
    original ids are never re-tokenized; `o1` / `o2` are the cut part texts, encoded. Pass
    `graded` (reward.score of the same text) to reuse a batch grading instead of grading again.
    """
    body = list(ids)
    special = set(tokenizer.all_special_ids)
    while body and body[-1] in special:  # EOS / padding: not part of the text that is graded
        body.pop()
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    graded = graded if graded is not None else score(text, ground_truth)
    o1_text, o2_text = split_response(text)
    span = sc_span(text)
    if span is None:
        sc_at, o1_len = None, len(body)
    else:
        ends = _byte_ends(tokenizer, body, text)
        sc_at = _first_token_reaching(tokenizer, body, text, span[1], ends)
        o1_len = _last_token_within(tokenizer, body, text, len(text[: span[0]].rstrip()), ends)

    def encode(part: str | None) -> list[int] | None:
        cut = _cut_after_answer(part) if part is not None else None
        return None if cut is None else tokenizer.encode(cut, add_special_tokens=False)

    o2_correct = bool(graded.acc_o2) if o2_text is not None else False
    return Rollout(
        ids=list(ids),
        o1=encode(o1_text),
        o2=encode(o2_text),
        o1_correct=bool(graded.acc_o1),
        o2_correct=o2_correct,
        final_correct=bool(graded.acc_final),
        sc_at=sc_at,
        o1_len=o1_len,
        reward=graded.reward,
        o1_format=format_reward(o1_text),
        o2_format=format_reward(o2_text) if o2_text is not None else 0.0,
    )


def transition_kind(o1_correct: bool, o2_correct: bool) -> str:
    """ "wc", "cc", "cw" or "ww": (acc(o1), acc(o2)) as the paper names them."""
    return ("c" if o1_correct else "w") + ("c" if o2_correct else "w")


def _splice(rollouts: list[Rollout], i: int, j: int, sc_ids: list[int], eos_id: int) -> Sample:
    a, b = rollouts[i], rollouts[j]
    identical = a.o1 == b.o2
    r_prime = guarded_correction_reward(
        a.o1_correct, b.o2_correct, identical=identical, o1_answered=True, o2_format=b.o2_format
    )
    return Sample(
        ids=a.o1 + sc_ids + b.o2 + [eos_id],
        kind=transition_kind(a.o1_correct, b.o2_correct),
        sc_at=len(a.o1) + len(sc_ids),
        o1_correct=a.o1_correct,
        o2_correct=b.o2_correct,
        source=(i, j),
        o1_len=len(a.o1),
        reward=0.9 * r_prime + 0.1 * min(a.o1_format, b.o2_format),  # Eq. 6
    )


def _original(r: Rollout, i: int) -> Sample:
    return Sample(
        r.ids, "original", r.sc_at, r.o1_correct, r.o2_correct, (i, i), r.o1_len, r.reward
    )


def candidate_pool(
    rollouts: list[Rollout], *, same: bool = False
) -> dict[str, list[tuple[int, int]]]:
    """Every pair (i, j) with an o1 in rollout i and an o2 in rollout j, by kind (Alg. 1 step 2).
    i = j pairs only with `same` (the released code keeps them; the paper does not)."""
    pool: dict[str, list[tuple[int, int]]] = {"wc": [], "cc": [], "cw": [], "ww": []}
    for i, a in enumerate(rollouts):
        for j, b in enumerate(rollouts):
            if a.o1 is not None and b.o2 is not None and (i != j or same):
                pool[transition_kind(a.o1_correct, b.o2_correct)].append((i, j))
    return pool


def select_pairs(
    pool: dict[str, list[tuple[int, int]]],
    k: int,
    n: int,
    n_target: int,
    mode: str,
    rng: random.Random,
) -> list[tuple[int, int]]:
    """Which candidates join the group (Alg. 1 step 3), given k correct originals out of n."""
    need = max(n_target - n, 0)
    shuffled = {kind: rng.sample(pairs, len(pairs)) for kind, pairs in pool.items()}
    every = [p for kind in ("wc", "cc", "cw", "ww") for p in pool[kind]]
    if mode == "none" or need == 0:
        return []
    if mode == "random" or (mode == "paper" and k in (0, n)):
        # all-correct or all-wrong groups: any mix, otherwise every advantage is the same sign
        return rng.sample(every, min(need, len(every)))
    if mode == "paper":
        positives = shuffled["wc"] + shuffled["cc"]  # w->c first: the rare, informative signal
        negatives = rng.sample(
            shuffled["cw"] + shuffled["ww"], len(shuffled["cw"]) + len(shuffled["ww"])
        )
        n_pos = min(max(n_target // 2 - k, 0), len(positives), need)
        n_neg = min(need - n_pos, len(negatives))
        n_pos = min(need - n_neg, len(positives))  # negatives ran short: more positives
        return positives[:n_pos] + negatives[:n_neg]
    if mode == "released":
        quota = (n - k) // 2
        take = shuffled["wc"][:quota] + shuffled["cc"][:quota] + shuffled["cw"][:1]
        rest = shuffled["ww"] + shuffled["cw"][1:] + shuffled["wc"][quota:] + shuffled["cc"][quota:]
        return (take + rest)[:need]
    raise ValueError(f"augment mode must be paper, released, random or none; got {mode!r}")


def splice_group(
    rollouts: list[Rollout],
    n_target: int,
    sc_ids: list[int],
    eos_id: int,
    *,
    mode: str = "paper",
    rng: random.Random | None = None,
) -> list[Sample]:
    """The training group of one prompt (PAPER.md §3, Algorithm 1): the n originals first and
    unchanged, then spliced samples `o1_i + sc_ids + o2_j + [eos_id]`, no pair twice.

    `mode`: "paper" (balance positives and negatives, w->c first; the group may end smaller than
    `n_target` when the pool runs short, originals are never repeated), "released" (the
    authors' code: quotas of (n - k) // 2 w->c and c->c, one c->w, then w->w, more c->w, the
    rest; i = j pairs allowed; originals repeated to fill `n_target`), "random", "none".
    """
    rng = rng if rng is not None else random.Random(0)
    n = len(rollouts)
    k = sum(r.final_correct for r in rollouts)
    group = [_original(r, i) for i, r in enumerate(rollouts)]
    pool = candidate_pool(rollouts, same=mode == "released")
    for i, j in select_pairs(pool, k, n, n_target, mode, rng):
        group.append(_splice(rollouts, i, j, sc_ids, eos_id))
    if mode == "released":
        while len(group) < n_target and n > 0:
            group.append(group[(len(group) - n) % n])
    return group


def loss_masks(sample: Sample, stage: str) -> tuple[list[int], list[int]]:
    """Per-token `(policy_mask, kl_mask)` over `sample.ids` (PAPER.md §4, selective masking).

    Stage "1": o1 + SC get no policy gradient in every sample with a correction, and the KL to
    the reference covers the o1 tokens only. Stage "2": o1 + SC are masked only when o1 and o2
    disagree in correctness (w->c, c->w); no KL. Without a correction: all trained, no KL.
    Masked tokens stay in the context: the masks only select terms of the loss.
    """
    n = len(sample.ids)
    if sample.sc_at is None:
        return [1] * n, [0] * n
    cut = sample.sc_at
    if stage == "1":
        return [0] * cut + [1] * (n - cut), [1] * sample.o1_len + [0] * (n - sample.o1_len)
    if stage == "2":
        if sample.o1_correct != sample.o2_correct:
            return [0] * cut + [1] * (n - cut), [0] * n
        return [1] * n, [0] * n
    raise ValueError(f"stage must be '1' or '2', got {stage!r}")


def transition_counts(samples: list[Sample] | list[Rollout]) -> dict[str, int]:
    """Counts of w->c, c->c, c->w, w->w among samples with a correction, and of those without:
    the density of self-correction signal before and after augmentation."""
    counts = {"wc": 0, "cc": 0, "cw": 0, "ww": 0, "none": 0}
    for s in samples:
        counts["none" if s.sc_at is None else transition_kind(s.o1_correct, s.o2_correct)] += 1
    return counts
